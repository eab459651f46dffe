"""Shared pieces of the loop tests: a small config and readers of a run directory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainloop.config import load_config
from brainloop.driver import Loop

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
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



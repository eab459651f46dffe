"""Run summaries (brainloop.summary) on hand-computed cases, and ``brainloop summary`` without Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from brainloop.summary import distinct_n, summarize

REPO = Path(__file__).resolve().parents[1]


def _steps(rewards: list[float]) -> list[dict]:
    return [{"step": i, "reward_mean": r, "best_reward": r + 1, "kl_per_token": 0.01 * i, "kl_per_sequence": 0.1 * i,
             "mean_tokens": 10.0 + i, "distinct_2": 0.5, "step_seconds": 2.0 + i} for i, r in enumerate(rewards)]


def test_distinct_n_hand_case():
    # "a b a b": bigrams (a b), (b a), (a b) -> 2 distinct of 3; one-word texts have none.
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n(["a b", "a b"], 2) == 0.5


def test_summarize_hand_case():
    # 4 steps -> window 2: first [1, 2] mean 1.5, s.e. 0.5; last [4, 6] mean 5, s.e. 1;
    # gain 3.5 with s.e. sqrt(0.25 + 1).
    s = summarize(_steps([1.0, 2.0, 4.0, 6.0]))
    assert (s["steps"], s["window"]) == (4, 2)
    assert (s["reward_first"], s["reward_last"], s["reward_gain"]) == pytest.approx((1.5, 5.0, 3.5))
    assert (s["reward_first_se"], s["reward_last_se"]) == pytest.approx((0.5, 1.0))
    assert s["reward_gain_se"] == pytest.approx(math.sqrt(1.25))
    assert s["reward_gain_z"] == pytest.approx(3.5 / math.sqrt(1.25))
    assert s["best_reward"] == 7.0 and s["kl_per_token_last"] == pytest.approx(0.03)
    assert (s["mean_tokens_first"], s["mean_tokens_last"]) == (10.5, 12.5)
    assert s["seconds_per_step"] == 3.5  # median of 2, 3, 4, 5
    assert summarize([]) == {}


def test_summary_command_imports_neither_ray_nor_torch(tmp_path: Path):
    """``brainloop summary`` reads a run folder on a laptop: the summary code is core, not the driver."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _steps([1.0, 2.0, 4.0, 6.0])))
    code = ("import sys\nfrom brainloop.cli import main\nrc = main(['summary', sys.argv[1]])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'vllm'))\n"
            "print('HEAVY', heavy)\nsys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    assert "gain               +3.50000 (3.13 standard errors)" in out.stdout, out.stdout

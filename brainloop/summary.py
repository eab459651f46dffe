"""Run summaries from the per-step metrics: reward gain with standard errors, KL, length, diversity.

Core code (numpy only), so ``brainloop summary`` reads a run folder without importing Ray or a model
library; the driver writes ``summary.json`` with the same function at the end of a run.
"""

from __future__ import annotations

import math

import numpy as np


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of a set of texts (a diversity measure)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(steps: list[dict], window: int = 15) -> dict:
    """First/last window means of the reward with standard errors, KL, length, speed."""
    if not steps:
        return {}
    rewards = [s["reward_mean"] for s in steps]
    w = min(window, max(1, len(steps) // 2))
    first, last = np.array(rewards[:w]), np.array(rewards[-w:])

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    diff_se = math.sqrt(se(first) ** 2 + se(last) ** 2) if len(first) > 1 else float("nan")
    return {
        "steps": len(steps), "window": w,
        "reward_first": float(first.mean()), "reward_first_se": se(first),
        "reward_last": float(last.mean()), "reward_last_se": se(last),
        "reward_gain": float(last.mean() - first.mean()), "reward_gain_se": diff_se,
        "reward_gain_z": float((last.mean() - first.mean()) / diff_se) if diff_se and diff_se > 0 else float("nan"),
        "best_reward": float(max(s.get("best_reward", -math.inf) for s in steps)),
        "kl_per_token_last": float(steps[-1].get("kl_per_token", float("nan"))),
        "kl_per_sequence_last": float(steps[-1].get("kl_per_sequence", float("nan"))),
        "mean_tokens_first": float(np.mean([s["mean_tokens"] for s in steps[:w]])),
        "mean_tokens_last": float(np.mean([s["mean_tokens"] for s in steps[-w:]])),
        "distinct_2_first": float(np.mean([s["distinct_2"] for s in steps[:w]])),
        "distinct_2_last": float(np.mean([s["distinct_2"] for s in steps[-w:]])),
        "seconds_per_step": float(np.median([s["step_seconds"] for s in steps])),
    }

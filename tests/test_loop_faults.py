"""Asynchrony and faults on a real local Ray cluster: nothing lost, nothing duplicated.

- ``max_staleness: 1``: step t+1 is sampled while step t is scored (sampler timestamps vs reward
  timestamps in the Parquet log); off-policy samples are importance-weighted, on-policy ones get
  exactly 1.
- chaos: a reward worker is killed while its texts are in flight and the sampler is killed mid-run;
  the run finishes with every (step, prompt, sample) exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from brainloop.driver import Loop
from tests.loop_helpers import KEY, rollouts, small_config

pytestmark = pytest.mark.slow


def test_async_overlaps_sampling_with_rewards_and_weights_off_policy_samples(ray_cluster, tmp_path):
    cfg = small_config(4, algo={"max_staleness": 1})
    loop = Loop(cfg, tmp_path / "async")
    try:
        summary = loop.run()
    finally:
        loop.close()
    rows = rollouts(tmp_path / "async")
    assert summary["steps"] == 4 and len(rows) == 16 and not rows.duplicated(KEY).any()
    used = rows[rows["used_in_update"]]
    staleness = used["learner_version"] - used["adapter_version"]
    assert set(staleness[used["step"] == 0]) == {0}  # the first step has nothing to overlap with
    assert set(staleness[used["step"] > 0]) == {1}  # then always exactly one version behind, never more
    on_policy = used[staleness == 0]
    assert (on_policy["is_weight"] == 1.0).all()
    off_policy = used[staleness > 0]
    assert off_policy["is_weight"].between(0, cfg.algo.importance_cap).all()
    assert (off_policy["is_weight"] != 1.0).any()
    # Overlap: step t+1 is generated while step t is scored and learned from. (Step 1 is sampled
    # during step 0's rewards; later generations first load the adapter just pushed, which at this
    # tiny size can take as long as scoring four 12-token texts, so they overlap the update.)
    for t in range(3):
        scoring = rows.loc[rows.step == t, ["submitted_at", "scored_at", "updated_at"]]
        gen_next = rows.loc[rows.step == t + 1, ["sample_started_at", "sample_finished_at"]]
        end = scoring["scored_at"].max() if t == 0 else scoring["updated_at"].max()
        assert gen_next["sample_started_at"].min() < end, t
        assert gen_next["sample_finished_at"].max() > scoring["submitted_at"].min(), t
    # Reward ahead: once step t+1 is sampled, its texts go to the pool while step t's update runs,
    # so the reward of t+1 overlaps the update of t (the update of t ends after they were submitted).
    ahead = [rows.loc[rows.step == t + 1, "submitted_at"].min() < rows.loc[rows.step == t, "updated_at"].max()
             for t in range(3)]
    steps = [m for m in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in m]
    flagged = [json.loads(m)["scored_ahead"] for m in steps]
    assert any(ahead) and flagged[1:] == ahead and not flagged[0]


def _kill_when(condition, action, timeout_s: float = 300.0) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_chaos_reward_worker_and_sampler_killed_mid_run(ray_cluster, tmp_path):
    run_dir = tmp_path / "chaos"
    cfg = small_config(5)
    loop = Loop(cfg, run_dir)
    events: dict[str, float] = {}

    def rollout_steps() -> int:
        return len(list(Path(run_dir / "rollouts").glob("step_*.parquet")))

    def kill_worker() -> None:
        busy = {job.worker for job in list(loop.pool._in_flight.values())}
        victim = loop.pool.workers[min(busy)]
        ray.kill(victim, no_restart=False)  # Ray restarts it; its texts must be rescored
        events["worker_killed"] = time.time()

    def kill_sampler() -> None:
        ray.kill(loop.sampler, no_restart=False)
        events["sampler_killed"] = time.time()

    killers = [
        _kill_when(lambda: rollout_steps() >= 1 and getattr(loop, "pool", None) is not None
                   and loop.pool.in_flight > 0, kill_worker),
        _kill_when(lambda: rollout_steps() >= 3, kill_sampler),
    ]
    try:
        summary = loop.run()
    finally:
        loop.close()
    for thread in killers:
        thread.join(timeout=1)
    assert {"worker_killed", "sampler_killed"} <= set(events)
    rows = rollouts(run_dir)
    expected = pd.DataFrame([(s, p, i) for s in range(5) for p in range(2) for i in range(2)], columns=KEY)
    pd.testing.assert_frame_equal(rows[KEY], expected, check_dtype=False)  # every (step, prompt, sample) exactly once
    assert summary["steps"] == 5 and summary["adapter_version"] == 5  # training continued
    assert summary["sampler_restarts"] >= 1
    assert (rows["reward_attempts"] > 1).any()  # the killed worker's texts were rescored
    assert (rows["status"] == "ok").mean() >= 0.9, rows[["status", "error"]]

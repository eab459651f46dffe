"""``python -m bench.loop_speed --quick``: the whole benchmark, end to end, at tiny sizes.

A private local Ray cluster with the real vLLM sampler, learner and two reward workers runs sync and
async blocks of two steps, and the reference's sequential design runs two steps in-process; the
report must carry every variant, the ratios, the bounds and the machine description.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_rotates_and_bounds_are_hand_computed():
    from bench.loop_speed import bounds, schedule

    assert schedule(2) == [(0, "sync"), (0, "async"), (0, "reference"),
                           (1, "async"), (1, "reference"), (1, "sync")]
    # S=4, R=2, U=1, O=1 (step 8): overlap 8/max(4, 2, 1+1, 8/2) = 2; CPU 2 cores * 8 s / 4 CPU-s = 4.
    sync = {"sample_seconds_median": 4.0, "reward_seconds_median": 2.0, "update_seconds_median": 1.0,
            "step_seconds_median": 8.0, "cpu_seconds_median": 4.0}
    b = bounds(sync, cores=2)
    assert b["overlap_bound"] == pytest.approx(2.0) and b["cpu_bound"] == pytest.approx(4.0)
    assert b["async_bound"] == pytest.approx(2.0) and b["sample_share"] == pytest.approx(0.5)
    # Reward-bound (R = S + U, the matched-latency phase): S=2, R=5, U=3, O=0 -> 10/max(2, 5, 3, 5) = 2.
    reward_bound = {"sample_seconds_median": 2.0, "reward_seconds_median": 5.0, "update_seconds_median": 3.0,
                    "step_seconds_median": 10.0, "cpu_seconds_median": 5.0}
    assert bounds(reward_bound, cores=2)["overlap_bound"] == pytest.approx(2.0)
    # Update-bound: S=1, R=1, U=6, O=0 -> 8/max(1, 1, 6, 4) = 4/3.
    update_bound = {**reward_bound, "sample_seconds_median": 1.0, "reward_seconds_median": 1.0,
                    "update_seconds_median": 6.0, "step_seconds_median": 8.0}
    assert bounds(update_bound, cores=2)["overlap_bound"] == pytest.approx(4 / 3)


def test_matched_latency_fills_the_reward_stage_up_to_sample_plus_update():
    from bench.loop_speed import bench_config, matched_latency

    cfg = bench_config()  # 2 prompts x 4 completions, 2 workers: each worker scores 4 texts in turn
    sync = {"sample_seconds_median": 5.0, "update_seconds_median": 7.0, "reward_seconds_median": 2.0}
    assert matched_latency(sync, cfg) == pytest.approx((5.0 + 7.0 - 2.0) / 4)
    assert matched_latency({**sync, "reward_seconds_median": 20.0}, cfg) == 0.0


def test_summarise_drops_the_warmup_step():
    from bench.loop_speed import summarise_variant

    def step(wall: float) -> dict:
        return {"wall_seconds": wall, "sample_seconds": 1.0, "reward_seconds": 1.0, "update_seconds": 1.0,
                "cpu_seconds": wall, "mean_tokens": 8.0}

    blocks = [{"steps": [step(100.0), step(4.0), step(6.0)]}, {"steps": [step(50.0), step(5.0)]}]
    v = summarise_variant(blocks, cores=2)
    assert v["steps_measured"] == 3 and v["step_seconds_median"] == 5.0 and v["step_seconds_mean"] == 5.0
    assert v["other_seconds_median"] == pytest.approx(2.0) and v["cpu_utilisation"] == pytest.approx(0.5)


@pytest.mark.slow
def test_loop_speed_quick(tmp_path):
    out = tmp_path / "loop_speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.loop_speed", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "loop_speed" and report["quick"] is True
    for key in ("cpu_count", "cpu_model", "ram_bytes", "load_average", "versions", "date"):
        assert key in report["machine"]
    assert set(report["variants"]) == {"sync", "async", "reference"}
    for v in report["variants"].values():
        assert v["steps_measured"] == 1 and v["step_seconds_median"] > 0
        assert v["sample_seconds_median"] > 0 and v["update_seconds_median"] > 0 and v["cpu_seconds_median"] > 0
    for key in ("async_speedup", "reference_over_sync", "reference_over_async"):
        assert report["ratios"][key] > 0
    assert report["bounds"]["overlap_bound"] >= 1.0
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 2 and names[0].startswith("async vs sync speed-up, reward latency = sample + update")
    assert names[1].startswith("async vs sync speed-up, real pipeline")
    # Phase 2: the same loop with a simulated reward latency that fills the reward stage.
    real, matched = report["phases"]
    assert matched["phase"] == "reward latency = sample + update" and set(matched["variants"]) == {"sync", "async"}
    assert matched["simulated_latency_s_per_text"] == report["summary"]["matched_latency_s_per_text"] >= 0
    if matched["simulated_latency_s_per_text"] > 0.05:  # each worker sleeps it once per step here
        assert (matched["variants"]["sync"]["reward_latency_seconds_median"]
                > real["variants"]["sync"]["reward_latency_seconds_median"])
    assert matched["ratios"]["async_speedup"] > 0 and [b["variant"] for b in matched["blocks"]] == ["sync", "async"]
    assert report["settings"]["completions_per_step"] == 2
    assert [b["variant"] for b in report["blocks"]] == ["sync", "async", "reference"]
    # Async steps record their staleness: the second async step samples one version behind.
    async_steps = next(b for b in report["blocks"] if b["variant"] == "async")["steps"]
    assert max(s["staleness_max"] for s in async_steps) == 1
    assert "MISS" in proc.stdout or "MET" in proc.stdout
    # About 3 minutes on an idle 2-core machine; a loaded shared one takes longer.
    assert elapsed < 360 or os.getloadavg()[0] > 3, f"--quick took {elapsed:.0f} s"

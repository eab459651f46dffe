"""The benchmarks run and report what they claim to measure.

Pure helpers (worker-time accounting, percentiles, targets, run_all's headline) are checked on
hand-computed cases; pool_scaling, adapter_push and learner_memory run in ``--quick`` mode as
subprocesses (their own local Ray clusters, real Learner / Sampler / RewardPool) and their JSON
reports must have the expected keys, a described machine, and positive numbers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import percentile, table, target
from bench.pool_scaling import loss_split
from bench.run_all import headline

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cpu_count", "cpu_model", "ram_bytes", "load_average", "torch_threads", "versions", "date"}


# ---- pure helpers -------------------------------------------------------------------------------


def test_loss_split_hand_computed():
    # Two workers, run [0, 10], latency 2. Worker 0: calls (1,3) (4,6) (6,8): startup 1, gaps 1,
    # tail 2, busy 6. Worker 1: one call (0, 2.5): startup 0, tail 7.5, busy 2.5 (0.5 overshoot).
    # Worker-time 20; 4 calls x 2 s = 8 -> efficiency 0.4. The last call ends at 8: tail = imbalance
    # (worker 1 idle 2.5 .. 8) 5.5 + collect (both workers 8 .. 10) 4.
    split = loss_split([[(4, 6), (1, 3), (6, 8)], [(0, 2.5)]], 0.0, 10.0, 2.0)
    assert split == pytest.approx({"efficiency": 0.4, "startup": 0.05, "gaps": 0.05, "tail": 0.475,
                                   "overshoot": 0.025, "imbalance": 0.275, "collect": 0.2})
    parts = ("efficiency", "startup", "gaps", "tail", "overshoot")
    assert sum(split[k] for k in parts) == pytest.approx(1.0)
    assert split["imbalance"] + split["collect"] == pytest.approx(split["tail"])


def test_loss_split_idle_worker_is_imbalance():
    split = loss_split([[(0, 1)], []], 0.0, 1.0, 1.0)
    assert split == pytest.approx({"efficiency": 0.5, "startup": 0.0, "gaps": 0.0, "tail": 0.5, "overshoot": 0.0,
                                   "imbalance": 0.5, "collect": 0.0})


def test_percentile_matches_linear_interpolation():
    assert percentile([4, 1, 3, 2], 95) == pytest.approx(3.85)  # position 0.95 * 3 = 2.85 -> 3 + 0.85
    assert percentile([5.0], 95) == 5.0
    assert percentile([1, 2, 3], 50) == 2.0
    assert math.isnan(percentile([], 50))


def test_target_direction_and_reason():
    assert target("eff", 0.95, 0.9, True, "pool")["met"] is True
    missed = target("ratio", 0.8, 0.6, False, "fixed costs")
    assert missed["met"] is False and missed["why_missed"] == "fixed costs" and missed["goal"] == "<= 0.6"
    assert target("ratio", 0.5, 0.6, False, "x")["why_missed"] == ""


def test_headline_prefers_summary_then_top_level_numbers():
    assert headline({"summary": {"a": 1.0}, "b": 2}) == {"a": 1.0}
    got = headline({"machine": {"cpu_count": 2}, "build_s": 1.5, "quick": True,
                    "stages": {"n_texts": 3, "median_s": {"tts": 0.1}}, "rows": [1, 2]})
    assert got == {"build_s": 1.5, "stages.n_texts": 3}


def test_table_aligns_columns():
    text = table([{"a": 1, "b": 0.123456}, {"a": 10}], ["a", "b"], title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and len({len(line) for line in lines[1:3]}) == 1
    assert "0.1235" in text


# ---- the benchmarks, quick mode -----------------------------------------------------------------


def _run(module: str, out: Path, timeout_s: float) -> dict:
    """Run a bench in its own process group: on a timeout the group (the bench, its local Ray
    cluster, its actors) is terminated, so nothing it started outlives the test."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", module, "--quick", "--json", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{module} --quick took over {timeout_s:.0f}s:\n{stdout[-2000:]}{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert MACHINE_KEYS <= set(report["machine"]), report["machine"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["ram_bytes"] > 0
    assert len(report["load_average_before"]) == 3
    for t in report["targets"]:
        assert {"name", "value", "goal", "met", "why_missed"} <= set(t)
        assert t["met"] or t["why_missed"], f"a missed target must say why: {t}"
    return report


def _positive(summary: dict, keys: list[str]) -> None:
    for key in keys:
        value = summary[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.mark.slow
def test_pool_scaling_quick(tmp_path):
    report = _run("bench.pool_scaling", tmp_path / "pool.json", 300)
    summary = report["summary"]
    _positive(summary, ["pool_efficiency_n4_lat0.2", "ray_efficiency_n4_lat0.2", "pool_vs_ray_n4_lat0.2"])
    rows = report["rows"]
    assert {(r["workers"], r["mode"]) for r in rows} == {(1, "ray"), (1, "pool"), (4, "ray"), (4, "pool")}
    for r in rows:
        parts = r["efficiency"] + r["startup"] + r["gaps"] + r["tail"] + r["overshoot"]
        assert parts == pytest.approx(1.0, abs=1e-6)
        assert r["imbalance"] + r["collect"] == pytest.approx(r["tail"], abs=1e-6)
        assert 0 < r["efficiency"] <= 1.0
        assert r["calls_min"] >= 1 and r["calls_max"] >= r["calls_min"]
        assert r["throughput"] > 0 and r["texts"] > 0
    # Sleeping workers run in parallel: four must beat one clearly, even on a busy 2-core machine.
    thr = {r["workers"]: r["throughput"] for r in rows if r["mode"] == "pool"}
    assert thr[4] > 2.5 * thr[1]


@pytest.mark.slow
def test_adapter_push_quick(tmp_path):
    report = _run("bench.adapter_push", tmp_path / "push.json", 480)
    summary = report["summary"]
    _positive(summary, ["push_median_s", "push_p95_s", "export_median_s", "transfer_load_median_s",
                        "first_use_median_s", "second_use_median_s", "update_median_s", "adapter_bytes",
                        "probe_adapter_vs_base"])
    assert len(report["pushes"]) == 3
    assert report["loaded_versions_at_end"] == [2, 3]  # max_loaded_adapters = 2: the newest two
    assert report["config"]["rank"] == 32
    # r=32 on q,v,o,down of SmolLM2-135M: 30 layers x 32 x ((576+576) + (576+192) + (576+576) + (1536+576))
    assert summary["trainable_params"] == 30 * 32 * (1152 + 768 + 1152 + 2112)
    assert summary["probe_sampler_vs_learner"] < 0.05  # the pushed adapter is what the sampler serves
    for row in report["pushes"]:
        parts = row["export_s"] + row["transfer_load_s"] + row["first_use_s"]
        assert parts == pytest.approx(row["push_s"], rel=1e-6)


@pytest.mark.slow
def test_sampler_lora_quick(tmp_path):
    """vLLM's LoRA ops, the grouped ones and merged weights sample the same tokens under one seed;
    all four timed."""
    report = _run("bench.sampler_lora", tmp_path / "lora.json", 480)
    summary = report["summary"]
    _positive(summary, ["base_seconds", "vllm_seconds", "grouped_seconds", "merged_seconds", "grouped_over_vllm",
                        "grouped_over_base", "merged_over_grouped"])
    assert summary["identical_fraction"] == 1.0 and summary["max_logprob_diff"] < 1e-3
    assert summary["merged_identical_fraction"] == 1.0 and summary["merged_max_logprob_diff"] < 1e-3
    assert {r["variant"] for r in report["rows"]} == {"base", "vllm", "grouped", "merged"}
    assert all(r["tokens"] > 0 for r in report["rows"])


@pytest.mark.slow
def test_learner_memory_quick(tmp_path):
    report = _run("bench.learner_memory", tmp_path / "mem.json", 480)
    (comparison,) = report["comparisons"]
    _positive(comparison, ["peak_rss_adapter_disabled", "peak_rss_second_copy", "peak_ratio", "weights_one_copy"])
    ours, ref = comparison["variants"]["adapter_disabled"], comparison["variants"]["second_copy"]
    # The reference variant holds exactly two copies of the base weights, ours one (+ the LoRA).
    assert ref["weight_bytes"] == pytest.approx(2 * ours["weight_bytes"] - ours["lora_bytes"], rel=1e-6)
    assert ours["weight_bytes"] > 500e6  # 135M float32 parameters
    # With owned weights, the second copy costs at least most of a copy of real memory.
    assert comparison["peak_delta"] > 0.5 * comparison["weights_one_copy"]
    assert 0 < comparison["peak_ratio"] < 1
    assert [p["phase"] for p in ours["phases"]] == ["start", "imports", "loaded", "update1"]

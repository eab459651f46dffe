"""Reward-hacking guards and per-sample analysis: hand-computed cases (pure functions, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainloop import analysis, stats
from brainloop.config import ConfigError, GuardsConfig, load_config
from brainloop.guards import GUARD_NAMES, GuardMonitor

# ---------------------------------------------------------------------------- analysis


def test_selectivity_hand_case() -> None:
    roi = {"broca": 0.30, "global": 0.10, "v1": 0.05, "lateral_occipital": 0.15}
    out = analysis.selectivity(roi, ["broca"])
    assert out["target_response"] == pytest.approx(0.30)
    assert out["selectivity_global"] == pytest.approx(0.20)
    assert out["selectivity_control"] == pytest.approx(0.30 - 0.10)  # control mean (0.05 + 0.15) / 2
    # Two targets average; a missing region gives NaN, never a silent partial mean.
    roi2 = {**roi, "wernicke": 0.10}
    assert analysis.selectivity(roi2, ["broca", "wernicke"])["target_response"] == pytest.approx(0.20)
    assert math.isnan(analysis.selectivity({"broca": 0.3, "global": 0.1}, ["broca"])["selectivity_control"])
    with pytest.raises(ValueError, match="both target and control"):
        analysis.selectivity(roi, ["v1"])


def test_global_rise_is_not_selective() -> None:
    """A policy that raises every vertex by the same amount raises the target, not its selectivity."""
    before = {"broca": 0.2, "global": 0.1, "v1": 0.0, "lateral_occipital": 0.1}
    after = {k: v + 0.5 for k, v in before.items()}
    s0, s1 = analysis.selectivity(before, ["broca"]), analysis.selectivity(after, ["broca"])
    assert s1["target_response"] - s0["target_response"] == pytest.approx(0.5)
    assert s1["selectivity_global"] == pytest.approx(s0["selectivity_global"])
    assert s1["selectivity_control"] == pytest.approx(s0["selectivity_control"])


def test_text_statistics_hand_case() -> None:
    text = "The cat sat. The dog ran fast! Why?"
    out = analysis.text_statistics(text)
    # 8 words, 3 sentences; 3 punctuation marks; types: the, cat, sat, dog, ran, fast, why = 7
    assert out["sentence_length"] == pytest.approx(8 / 3)
    assert out["punctuation_rate"] == pytest.approx(3 / 8)
    assert out["type_token_ratio"] == pytest.approx(7 / 8)
    assert analysis.words("don't well-known café 1969,") == ["don't", "well-known", "café", "1969"]
    empty = analysis.text_statistics("🙂 ...")
    assert all(math.isnan(v) for v in empty.values())


def test_removed_fraction_speech_rate_and_nll() -> None:
    assert analysis.removed_token_fraction("hello **world** `x = 1` ok", "hello world ok") == pytest.approx(1 - 3 / 5)
    assert analysis.removed_token_fraction("", "") == 0.0
    assert analysis.words_per_second(10, 4.0) == 2.5 and math.isnan(analysis.words_per_second(3, 0.0))
    assert analysis.nll_per_token([-1.0, -2.0, -3.0]) == pytest.approx(2.0)
    assert math.isnan(analysis.nll_per_token([]))


def test_sample_measures_unscored_keeps_text_measures_only() -> None:
    out = analysis.sample_measures("One two. Three!", {}, scored=False, n_words=0, audio_seconds=0.0,
                                   removed_fraction=None, targets=["broca"], base_nll=1.5)
    assert list(out) == list(analysis.ANALYSIS_COLUMNS)
    assert math.isnan(out["selectivity_global"]) and math.isnan(out["words_per_second"])
    assert out["base_nll_per_token"] == 1.5 and out["sentence_length"] == pytest.approx(1.5)


def test_percent_change_ci_hand_case() -> None:
    base, trained = [1.0, 1.0, 1.0], [2.0, 3.0, 4.0]  # +200 %; the baseline has no spread
    ci = stats.bootstrap_percent_change_ci(base, trained, n_boot=2000, seed=0)
    assert ci.diff == pytest.approx(200.0)
    assert 100.0 <= ci.low <= ci.diff <= ci.high <= 300.0
    # A negative baseline keeps the sign of the change: -0.04 -> -0.02 is +50 %.
    assert stats.bootstrap_percent_change_ci([-0.04, -0.04], [-0.02, -0.02]).diff == pytest.approx(50.0)
    with pytest.raises(ValueError, match="baseline mean is 0"):
        stats.bootstrap_percent_change_ci([1.0, -1.0], [2.0, 3.0])
    # The same replicates as the difference interval: the percent interval is it divided by |base|.
    d = stats.bootstrap_diff_ci([2.0, 2.0, 2.0], [1.0, 3.0, 5.0], n_boot=500, seed=3)
    p = stats.bootstrap_percent_change_ci([2.0, 2.0, 2.0], [1.0, 3.0, 5.0], n_boot=500, seed=3)
    assert (p.low, p.high) == pytest.approx((50.0 * d.low, 50.0 * d.high))


# ---------------------------------------------------------------------------- guards


def _record(nll=2.0, sel=0.1, tokens=40.0, d2=0.9) -> dict:
    return {"base_nll_per_token": nll, "selectivity_global": sel, "selectivity_control": sel,
            "mean_tokens": tokens, "distinct_2": d2}


def test_guard_baseline_then_breaches() -> None:
    cfg = GuardsConfig(baseline_steps=2, max_base_nll_increase=0.5, max_selectivity_drop=0.05,
                       length_ratio=(0.5, 2.0), min_distinct_2_ratio=0.5)
    mon = GuardMonitor(cfg)
    assert mon.observe(0, _record(nll=2.0, tokens=40)) == [] and mon.baseline is None
    assert mon.observe(1, _record(nll=2.2, tokens=60)) == []  # baseline: nll 2.1, tokens 50
    assert mon.baseline["base_nll_per_token"] == pytest.approx(2.1)
    assert mon.observe(2, _record(nll=2.5, tokens=99)) == []  # within limits (2.6, [25, 100])
    hits = mon.observe(3, _record(nll=2.7, sel=0.0, tokens=24.0, d2=0.4))
    assert sorted(b.guard for b in hits) == ["base_nll", "distinct_2", "length", "selectivity_control",
                                             "selectivity_global"]
    nll = next(b for b in hits if b.guard == "base_nll")
    assert (nll.value, nll.baseline, nll.limit) == pytest.approx((2.7, 2.1, 2.6))
    assert "base_nll breached at step 3" in nll.message()
    metrics = mon.step_metrics(hits)
    assert metrics["guard_breaches"] == 5.0 and set(metrics) == {"guard_breaches", *(f"guard_{g}" for g in GUARD_NAMES)}
    assert mon.observe(4, _record(nll=float("nan"), tokens=50)) == []  # a missing value never breaches


def test_guard_state_round_trip_keeps_the_baseline() -> None:
    cfg = GuardsConfig(baseline_steps=1, length_ratio=(0.9, 1.1))
    mon = GuardMonitor(cfg)
    mon.observe(0, _record(tokens=100))
    mon.observe(1, _record(tokens=80))
    resumed = GuardMonitor(cfg)
    resumed.load_state_dict(mon.state_dict())
    assert resumed.baseline == mon.baseline and resumed.breaches == mon.breaches
    assert [b.guard for b in resumed.observe(2, _record(tokens=120))] == ["length"]


def test_guards_config_validation(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("guards: {control_regions: [v2]}\n")
    with pytest.raises(ConfigError, match="unknown control region"):
        load_config(path)
    path.write_text("guards: {length_ratio: [1.5, 2.0]}\n")
    with pytest.raises(ConfigError, match="length_ratio"):
        load_config(path)
    path.write_text("guards: {action: stop}\n")
    assert load_config(path).guards.action == "stop"
    np.testing.assert_equal(GuardsConfig().control_regions, list(analysis.DEFAULT_CONTROL_REGIONS))


def test_step_means_skip_missing_values() -> None:
    rows = [{"selectivity_global": 0.1, "base_nll_per_token": None},
            {"selectivity_global": 0.3, "base_nll_per_token": 2.0},
            {"selectivity_global": float("nan")}]
    out = analysis.step_means(rows)
    assert out["selectivity_global"] == pytest.approx(0.2) and out["base_nll_per_token"] == 2.0
    assert "words_per_second" not in out


def test_selective_spec_ignores_a_uniform_rise() -> None:
    from brainloop.reward_spec import RewardSpec, scalar_reward

    courses = {"broca": np.array([0.3, 0.5]), "global": np.array([0.1, 0.1])}
    lifted = {k: v + 1.0 for k, v in courses.items()}
    selective = RewardSpec(kind="selective", rois=["broca"])
    assert scalar_reward(selective, courses) == pytest.approx(0.3)  # mean(0.3, 0.5) - 0.1
    assert scalar_reward(selective, lifted) == pytest.approx(scalar_reward(selective, courses))
    plain = RewardSpec(kind="roi_mean", rois=["broca"])
    assert scalar_reward(plain, lifted) - scalar_reward(plain, courses) == pytest.approx(1.0)
    assert selective.describe() == "(mean(broca) - global)" and selective.target_regions() == ["broca"]
    assert RewardSpec(kind="weighted", weights={"broca": 1.0, "v1": 0.0}).target_regions() == ["broca"]


def test_control_regions_may_not_be_reward_targets(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("reward: {spec: {kind: roi_mean, rois: [v1]}}\n")
    with pytest.raises(ConfigError, match="also reward targets"):
        load_config(path)

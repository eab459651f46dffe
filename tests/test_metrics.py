"""The live metric set is fixed and documented: each role may report only its own documented names,
the documentation is generated from the same table, and the dashboard queries only those names."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from brainloop.analysis import ANALYSIS_COLUMNS
from brainloop.guards import GUARD_NAMES
from brainloop.metrics import BY_NAME, DOC_HEADER, METRICS, ROLES, RunMetrics, markdown_table, names
from brainloop.rois import ROI_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == DOC_HEADER + markdown_table(), \
        "regenerate with: python -m brainloop.metrics > docs/metrics.md"


def test_every_metric_has_one_role_and_a_description() -> None:
    assert {m.role for m in METRICS} == set(ROLES)
    assert all(m.description and m.kind in ("gauge", "histogram") for m in METRICS)
    assert len(BY_NAME) == len(METRICS)
    # the work each role does is reported by that role
    assert BY_NAME["reward_stage_seconds"].role == "reward-worker"
    assert BY_NAME["tokens_per_second"].role == "sampler"
    assert BY_NAME["kl_per_token"].role == "learner" and BY_NAME["grad_norm"].role == "learner"
    assert BY_NAME["pool_alive_workers"].role == "reward-pool"
    assert {f"roi_{r}" for r in ROI_NAMES} | {f"guard_{g}" for g in GUARD_NAMES} | set(ANALYSIS_COLUMNS) \
        <= set(names("driver"))


def test_a_role_refuses_undocumented_names() -> None:
    learner = RunMetrics("r", "learner")
    with pytest.raises(ValueError, match="not a documented gauge of role 'learner'"):
        learner.set({"reward_mean": 1.0})  # the driver's
    with pytest.raises(ValueError, match="not a documented gauge"):
        learner.set({"kl_per_tokn": 0.1})  # a typo
    with pytest.raises(ValueError, match="not a documented histogram"):
        learner.observe("kl_per_token", 0.1)  # a gauge observed as a histogram
    worker = RunMetrics("r", "reward-worker")
    with pytest.raises(ValueError, match="takes tags"):
        worker.observe("reward_stage_seconds", 0.1)  # without its stage
    with pytest.raises(ValueError, match="unknown metrics role"):
        RunMetrics("r", "trainer")


def test_select_keeps_only_the_roles_numeric_gauges() -> None:
    record = {"loss": 0.5, "kl_per_token": 0.01, "reward_mean": 0.2, "is_weights": [1.0], "version": 3,
              "update_s": 1.2, "skipped": True}
    assert RunMetrics("r", "learner").select(record) == {"loss": 0.5, "kl_per_token": 0.01, "version": 3.0}
    assert RunMetrics("r", "driver").select(record) == {"reward_mean": 0.2}


def test_run_metrics_travel_to_actors() -> None:
    m = pickle.loads(pickle.dumps(RunMetrics("run-a", "sampler")))
    assert (m.run, m.role) == ("run-a", "sampler")

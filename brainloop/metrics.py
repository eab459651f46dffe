"""Live metrics through ``ray.util.metrics`` (Prometheus, shown in the Ray dashboard's Metrics view).

Every metric is tagged with the run name and the role that reports it. Metric objects are made
lazily, once per process, so importing this module costs nothing.
"""

from __future__ import annotations

from functools import cache

LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


@cache
def _gauge(name: str, description: str):
    from ray.util.metrics import Gauge

    return Gauge(f"brainloop_{name}", description=description, tag_keys=("run", "role"))


@cache
def _histogram(name: str, description: str):
    from ray.util.metrics import Histogram

    return Histogram(f"brainloop_{name}", description=description, boundaries=LATENCY_BOUNDARIES,
                     tag_keys=("run", "role", "stage"))


class RunMetrics:
    def __init__(self, run: str) -> None:
        self.run = run

    def gauges(self, role: str, values: dict[str, float], prefix: str = "") -> None:
        for key, value in values.items():
            if value is None:
                continue
            _gauge(prefix + key, f"brainloop {prefix}{key}").set(float(value), tags={"run": self.run, "role": role})

    def latency(self, role: str, stage: str, seconds: float) -> None:
        _histogram("reward_stage_seconds", "reward pipeline latency per stage").observe(
            seconds, tags={"run": self.run, "role": role, "stage": stage})

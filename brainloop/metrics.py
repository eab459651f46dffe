"""Live metrics through ``ray.util.metrics`` (Prometheus, shown in the Ray dashboard's Metrics view).

The set of metrics is fixed and documented here (``METRICS``; ``python -m brainloop.metrics`` prints
the table in docs/metrics.md). Each metric belongs to the role that does the work and is reported
by it: reward latency by the reward workers, throughput by the sampler, the update's statistics by
the learner, the pool's size by the pool, per-step outcomes by the driver. A ``RunMetrics`` is bound
to one run and one role and refuses a name that is not documented for that role, so the exported
set cannot drift from this table. Prometheus shows each name with Ray's prefix,
``ray_brainloop_<name>``, tagged ``run`` and ``role`` (and ``stage`` for stage latencies). Metric
objects are made lazily, once per process, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from brainloop.analysis import ANALYSIS_COLUMNS
from brainloop.guards import GUARD_NAMES
from brainloop.rois import ROI_NAMES

LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
ROLES = ("driver", "sampler", "learner", "reward-worker", "reward-pool")


@dataclass(frozen=True)
class Metric:
    name: str
    role: str  # the role that reports it
    unit: str
    description: str
    kind: str = "gauge"  # or "histogram" (seconds, LATENCY_BOUNDARIES)
    tags: tuple[str, ...] = ()  # tags beyond run and role


def _driver() -> list[Metric]:
    step = [
        ("reward_mean", "reward", "mean reward of the step's scored samples"),
        ("reward_std", "reward", "standard deviation of the step's rewards"),
        ("reward_max", "reward", "largest reward of the step"),
        ("best_reward", "reward", "largest reward of the run so far"),
        ("num_samples", "samples", "completions sampled this step"),
        ("num_scored", "samples", "completions with a reward this step"),
        ("num_failed", "samples", "completions whose scoring failed this step"),
        ("num_unspeakable", "samples", "completions with no speakable words this step"),
        ("mean_tokens", "tokens", "mean completion length"),
        ("distinct_2", "ratio", "distinct bigrams over all bigrams of the step's completions"),
        ("temperature", "", "sampling temperature of the step"),
        ("staleness_max", "versions", "largest adapter-version lag of a sample used in the update"),
        ("step_seconds", "s", "wall time of the step's iteration"),
        ("sample_seconds", "s", "what the iteration waited for sampling (~0 when sampled ahead)"),
        ("reward_seconds", "s", "what the iteration waited for rewards (~0 when scored ahead)"),
        ("update_seconds", "s", "what the iteration waited for the update and the adapter push"),
        ("reward_latency_seconds", "s", "from the end of sampling to the step's last reward"),
        ("naturalness_seconds", "s", "what the iteration waited for the naturalness penalty's base log-probs"),
        ("guard_breaches", "guards", "guards breached this step"),
        ("probe_sampler_vs_learner", "nats/token", "probe: sampler vs learner log-prob gap of the newest adapter"),
        ("probe_adapter_vs_base", "nats/token", "probe: newest adapter vs base model log-prob gap"),
    ]
    out = [Metric(n, "driver", u, d) for n, u, d in step]
    out += [Metric(c, "driver", "", f"step mean of the rollouts' {c} column (brainloop.analysis)")
            for c in ANALYSIS_COLUMNS]
    out += [Metric(f"guard_{g}", "driver", "0/1", f"1 when the {g} guard was breached this step") for g in GUARD_NAMES]
    out += [Metric(f"roi_{r}", "driver", "BOLD", f"step mean of the predicted response in region {r}")
            for r in ROI_NAMES]
    return out


METRICS: tuple[Metric, ...] = (
    *_driver(),
    Metric("tokens_per_second", "sampler", "tokens/s", "generated tokens per second of the last generate call"),
    Metric("sampler_generate_seconds", "sampler", "s", "wall time of one generate call", kind="histogram"),
    Metric("sampler_threads", "sampler", "threads", "torch CPU threads of the last generate call "
           "(sampler.cpu_threads_alone in synchronous mode)"),
    Metric("sampler_adapter_version", "sampler", "version", "newest adapter version the sampler holds"),
    Metric("loss", "learner", "", "the update's loss (groups averaged)"),
    Metric("kl_per_token", "learner", "nats/token", "exact KL(policy || base) per completion token"),
    Metric("kl_per_sequence", "learner", "nats", "exact KL(policy || base) per completion"),
    Metric("ce", "learner", "nats/token", "the policy's negative log-likelihood of the completions"),
    Metric("is_weight_mean", "learner", "", "mean capped importance weight (1 on-policy)"),
    Metric("grad_norm", "learner", "", "gradient norm before clipping"),
    Metric("lr", "learner", "", "learning rate of the update"),
    Metric("version", "learner", "version", "adapter version after the update"),
    Metric("update_threads", "learner", "threads", "torch CPU threads of the update "
           "(learner.cpu_threads_alone in synchronous mode)"),
    Metric("reference_ahead_fraction", "learner", "ratio",
           "samples of the update whose pi_ref pass ran ahead of it (learner.reference_ahead)"),
    Metric("reference_ahead_seconds", "learner", "s", "the learner's time in pi_ref's pass over one step, ahead of "
           "its update (learner.reference_ahead)"),
    Metric("learner_update_compute_seconds", "learner", "s", "the learner's time inside one update",
           kind="histogram"),
    Metric("reward_stage_seconds", "reward-worker", "s", "reward pipeline latency of one text per stage",
           kind="histogram", tags=("stage",)),
    Metric("reward_text_seconds", "reward-worker", "s",
           "reward latency of one text (status: ok, unspeakable, failed or cache_hit)",
           kind="histogram", tags=("status",)),
    Metric("pool_target_workers", "reward-pool", "workers", "workers the pool is asked to hold"),
    Metric("pool_alive_workers", "reward-pool", "workers", "workers ready and scoring"),
    Metric("pool_pending_workers", "reward-pool", "workers", "workers waiting for cluster resources"),
    Metric("pool_starting_workers", "reward-pool", "workers", "workers placed and loading models"),
    Metric("pool_restarting_workers", "reward-pool", "workers", "workers Ray is restarting after a crash"),
    Metric("pool_draining_workers", "reward-pool", "workers", "workers finishing their texts before removal"),
    Metric("pool_waiting_texts", "reward-pool", "texts", "texts queued or being scored"),
    Metric("pool_queue_per_worker", "reward-pool", "texts/worker", "waiting texts per alive worker (autoscale input)"),
    Metric("queue_depth", "reward-pool", "texts", "texts queued, not yet sent to a worker"),
    Metric("in_flight", "reward-pool", "texts", "texts sent to workers, not yet back"),
    Metric("pool_worker_seconds", "reward-pool", "worker·s", "worker-seconds held by the pool so far"),
    Metric("pool_scale_ups", "reward-pool", "decisions", "scale-up decisions so far"),
    Metric("pool_scale_downs", "reward-pool", "decisions", "scale-down decisions so far"),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
assert len(BY_NAME) == len(METRICS), "metric names must be unique"


def names(role: str) -> list[str]:
    return [m.name for m in METRICS if m.role == role]


@cache
def _gauge(name: str):
    from ray.util.metrics import Gauge

    return Gauge(f"brainloop_{name}", description=BY_NAME[name].description, tag_keys=("run", "role"))


@cache
def _histogram(name: str):
    from ray.util.metrics import Histogram

    spec = BY_NAME[name]
    return Histogram(f"brainloop_{name}", description=spec.description, boundaries=LATENCY_BOUNDARIES,
                     tag_keys=("run", "role", *spec.tags))


class RunMetrics:
    """The metrics one role reports for one run. Picklable (only two strings), so the driver hands
    one to each actor it starts; without Ray (benchmarks, plain tests) pass ``None`` instead."""

    def __init__(self, run: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown metrics role {role!r} (one of {ROLES})")
        self.run, self.role = run, role

    def _spec(self, name: str, kind: str) -> Metric:
        spec = BY_NAME.get(name)
        if spec is None or spec.role != self.role or spec.kind != kind:
            raise ValueError(f"{name!r} is not a documented {kind} of role {self.role!r} (brainloop.metrics.METRICS)")
        return spec

    def set(self, values: Mapping[str, float | int | None]) -> None:
        """Set gauges; ``None`` leaves a gauge as it was."""
        for name, value in values.items():
            self._spec(name, "gauge")
            if value is not None:
                _gauge(name).set(float(value), tags={"run": self.run, "role": self.role})

    def observe(self, name: str, seconds: float, **tags: str) -> None:
        spec = self._spec(name, "histogram")
        if set(tags) != set(spec.tags):
            raise ValueError(f"{name} takes tags {spec.tags}, got {sorted(tags)}")
        if math.isfinite(seconds):
            _histogram(name).observe(seconds, tags={"run": self.run, "role": self.role, **tags})

    def select(self, record: Mapping[str, object]) -> dict[str, float]:
        """The numeric fields of ``record`` that are this role's documented gauges."""
        return {m.name: float(v) for m in METRICS if m.role == self.role and m.kind == "gauge"
                and isinstance(v := record.get(m.name), (int, float)) and not isinstance(v, bool)}


def markdown_table() -> str:
    """The documented metric set as a Markdown table (docs/metrics.md)."""
    lines = ["| metric (Prometheus: `ray_brainloop_<name>`) | reported by | kind | unit | meaning |",
             "|---|---|---|---|---|"]
    for m in METRICS:
        kind = m.kind + (f" ({', '.join(m.tags)})" if m.tags else "")
        lines.append(f"| `{m.name}` | {m.role} | {kind} | {m.unit} | {m.description} |")
    return "\n".join(lines) + "\n"


DOC_HEADER = """# Live metrics

brainloop's fixed metric set (generated from `brainloop/metrics.py` by `python -m brainloop.metrics`;
a test keeps the two equal). Every metric is tagged `run` and `role`; Prometheus and Grafana show it
as `ray_brainloop_<name>` (`monitoring/grafana_brainloop.json` queries only these). The per-step record
in `metrics.jsonl` carries the driver's and the learner's numbers as well.

"""


if __name__ == "__main__":
    import sys

    sys.stdout.write(DOC_HEADER + markdown_table())

"""Reward-hacking guards: is the policy still writing natural, varied text that drives the target?

Each step's means are compared with a baseline, the mean of the first ``baseline_steps`` steps of
the run (before the policy has moved far from the base model):

- ``base_nll``: the base model's negative log-likelihood per token of the completions (recorded by
  the learner from the KL term's adapter-disabled pass). A rise means text the base model finds
  unnatural.
- ``selectivity_global`` / ``selectivity_control``: target response minus the whole cortex / minus
  the control regions. A fall while the reward rises means the policy is raising activation
  everywhere, not in the target.
- ``length``: mean completion tokens outside ``[low, high] x`` baseline (length collapse or padding).
- ``distinct_2``: diversity below a fraction of baseline (mode collapse).

``GuardMonitor.observe`` is pure bookkeeping (no I/O): it returns the breaches of a step; the driver
logs them, exports them as metrics and, with ``action: stop``, ends the job. Its state (the
baseline) is saved in checkpoints, so a resumed run keeps the same baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from brainloop.config import GuardsConfig

# Step-record keys the guards read (the driver's per-step metrics).
WATCHED = ("base_nll_per_token", "selectivity_global", "selectivity_control", "mean_tokens", "distinct_2")
GUARD_NAMES = ("base_nll", "selectivity_global", "selectivity_control", "length", "distinct_2")


@dataclass(frozen=True)
class Breach:
    """One guard tripped at one step, with the numbers that tripped it."""

    step: int
    guard: str
    value: float
    baseline: float
    limit: float

    def message(self) -> str:
        return (f"guard {self.guard} breached at step {self.step}: {self.value:.5g} vs limit {self.limit:.5g} "
                f"(baseline {self.baseline:.5g})")


@dataclass
class GuardMonitor:
    cfg: GuardsConfig
    seen: dict[str, list[float]] = field(default_factory=dict)  # baseline steps' values per watched key
    breaches: list[Breach] = field(default_factory=list)

    @property
    def baseline(self) -> dict[str, float] | None:
        """Mean of each watched key over the baseline steps (NaN-free), or None until they are in."""
        if any(len(self.seen.get(k, [])) < self.cfg.baseline_steps for k in ("mean_tokens",)):
            return None
        out = {}
        for key in WATCHED:
            finite = [v for v in self.seen.get(key, []) if math.isfinite(v)]
            out[key] = sum(finite) / len(finite) if finite else math.nan
        return out

    def observe(self, step: int, record: Mapping[str, Any]) -> list[Breach]:
        """Feed one step's metrics; returns the breaches of this step (none during the baseline)."""
        base = self.baseline
        if base is None:
            for key in WATCHED:
                value = record.get(key)
                self.seen.setdefault(key, []).append(float(value) if value is not None else math.nan)
            return []
        found = [b for b in self._check(step, record, base) if b is not None]
        self.breaches.extend(found)
        return found

    def _check(self, step: int, rec: Mapping[str, Any], base: Mapping[str, float]) -> list[Breach | None]:
        cfg = self.cfg

        def value(key: str) -> float:
            v = rec.get(key)
            return float(v) if v is not None else math.nan

        def below(guard: str, key: str, limit: float) -> Breach | None:
            v = value(key)
            return Breach(step, guard, v, base[key], limit) if v < limit else None  # NaN never breaches

        def above(guard: str, key: str, limit: float) -> Breach | None:
            v = value(key)
            return Breach(step, guard, v, base[key], limit) if v > limit else None

        out: list[Breach | None] = []
        if cfg.max_base_nll_increase is not None and math.isfinite(base["base_nll_per_token"]):
            out.append(above("base_nll", "base_nll_per_token", base["base_nll_per_token"] + cfg.max_base_nll_increase))
        if cfg.max_selectivity_drop is not None:
            for key in ("selectivity_global", "selectivity_control"):
                if math.isfinite(base[key]):
                    out.append(below(key, key, base[key] - cfg.max_selectivity_drop))
        if cfg.length_ratio is not None and base["mean_tokens"] > 0:
            low, high = cfg.length_ratio
            out.append(below("length", "mean_tokens", low * base["mean_tokens"]))
            out.append(above("length", "mean_tokens", high * base["mean_tokens"]))
        if cfg.min_distinct_2_ratio is not None and base["distinct_2"] > 0:
            out.append(below("distinct_2", "distinct_2", cfg.min_distinct_2_ratio * base["distinct_2"]))
        return out

    def step_metrics(self, breaches: list[Breach]) -> dict[str, float]:
        """Per-step metric values: 1.0 for each guard breached this step, else 0.0, and the total."""
        hit = {b.guard for b in breaches}
        return {"guard_breaches": float(len(breaches)), **{f"guard_{g}": float(g in hit) for g in GUARD_NAMES}}

    # ---- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "breaches": [asdict(b) for b in self.breaches]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen = {k: [float(x) for x in v] for k, v in state.get("seen", {}).items()}
        self.breaches = [Breach(**b) for b in state.get("breaches", [])]

"""From region time courses to one scalar reward.

A reward spec says which cortical response we want: the mean activation of a region (the reference:
Broca), a weighted sum of regions (raise one, lower another: a specification such as "more
language, less default-mode"), or a region's response *selective* against the whole-cortex mean
(``kind: selective``; ``contrast`` is its older name). Time is averaged over all TRs, or a window of
them.

When to use ``selective``: a brain reward is easiest to raise by raising everything (louder, denser
speech drives most of cortex). ``roi_mean`` rewards that; ``selective`` does not, because a uniform
rise cancels in target - global. Use it when the claim to be made is about the target region.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from brainloop.rois import ROI_NAMES, SUMMARY_NAMES


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["roi_mean", "weighted", "selective", "contrast"] = "roi_mean"
    rois: list[str] = Field(default_factory=lambda: ["broca"])
    weights: dict[str, float] = Field(default_factory=dict)
    direction: Literal["maximize", "minimize"] = "maximize"
    tr_window: tuple[int, int] | None = None  # [first, last) TR indices; None = all

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        known = set(ROI_NAMES) | set(SUMMARY_NAMES)
        names = list(self.weights) if self.kind == "weighted" else list(self.rois)
        if not names:
            raise ValueError(f"reward spec {self.kind!r} names no region")
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown region(s) {unknown}; known: {sorted(known)}")
        if self.tr_window is not None and not 0 <= self.tr_window[0] < self.tr_window[1]:
            raise ValueError(f"tr_window must be [start, stop) with 0 <= start < stop, got {self.tr_window}")
        return self

    def target_regions(self) -> list[str]:
        """Regions the spec is about (weighted specs: those with non-zero weight)."""
        if self.kind == "weighted":
            return [r for r, w in self.weights.items() if w != 0]
        return list(self.rois)

    def describe(self) -> str:
        sign = "" if self.direction == "maximize" else "-"
        if self.kind == "weighted":
            body = " + ".join(f"{w:g}*{r}" for r, w in self.weights.items())
        elif self.kind in ("selective", "contrast"):
            body = f"mean({', '.join(self.rois)}) - global"
        else:
            body = f"mean({', '.join(self.rois)})"
        return f"{sign}({body})"


def time_mean(course: np.ndarray, window: tuple[int, int] | None) -> float:
    """Mean of a (T,) time course, restricted to [start, stop) TRs when a window is given."""
    if window is not None:
        course = course[window[0] : window[1]]
    if course.size == 0:
        raise ValueError(f"TR window {window} selects no TR of a {course.size}-TR prediction")
    return float(np.mean(course))


def scalar_reward(spec: RewardSpec, roi_courses: dict[str, np.ndarray]) -> float:
    """Apply a spec to region time courses (name -> (T,), as from ``rois.roi_means``)."""
    def region(name: str) -> float:
        return time_mean(roi_courses[name], spec.tr_window)

    if spec.kind == "roi_mean":
        value = float(np.mean([region(r) for r in spec.rois]))
    elif spec.kind == "weighted":
        value = float(sum(w * region(r) for r, w in spec.weights.items()))
    else:
        value = float(np.mean([region(r) for r in spec.rois])) - region("global")
    return value if spec.direction == "maximize" else -value

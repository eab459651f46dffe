"""What a completion is, beyond its reward: selectivity, speech facts and text statistics.

A brain reward is easy to please in ways nobody wants — louder activation everywhere instead of in
the target region, unnatural text, tricks of the speech synthesiser. These pure functions turn a
scored completion into the numbers that answer "what did the policy learn?"; they run per sample
in the driver (Parquet columns and step metrics), in ``brainloop eval`` and in ``brainloop report``.

- **Selectivity**: the target regions' response minus the whole-cortex mean (``global``), and minus
  the mean of a control set of regions (default: the early visual regions ``v1`` and
  ``lateral_occipital``, which spoken language should not drive). A policy that only raises global
  activation raises the target but not its selectivity.
- **Speech facts**: words per second of the synthesised speech, its length, and the fraction of the
  completion's tokens that text normalisation removed before speech (markup, emoji, code: text the
  listener never hears but the reward model never sees either).
- **Text statistics**: mean sentence length in words, punctuation marks per word, type-token ratio.

Every function here is numpy/stdlib only and takes plain values (no model library).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

# Early visual cortex: spoken language should not drive it; a reward gain that shows up here too
# is not specific to the target.
DEFAULT_CONTROL_REGIONS: tuple[str, ...] = ("v1", "lateral_occipital")

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)  # letters/digits, inner ' ’ - kept
_SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def region_mean(roi: Mapping[str, float | None], names: Sequence[str]) -> float:
    """Mean of the named regions' (time-mean) responses; NaN when any is missing."""
    if not names:
        raise ValueError("no region named")
    values = [roi.get(n) for n in names]
    if any(v is None for v in values):
        return math.nan
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def selectivity(roi: Mapping[str, float | None], targets: Sequence[str],
                controls: Sequence[str] = DEFAULT_CONTROL_REGIONS) -> dict[str, float]:
    """Target response, and its selectivity against the whole cortex and against the control regions.

    ``roi`` maps region name -> time-mean response (as ``ScoreResult.roi``). Returns
    ``target_response`` (mean of ``targets``), ``selectivity_global`` (target - ``global``) and
    ``selectivity_control`` (target - mean of ``controls``). NaN where a region is missing (a
    completion that was not scored).
    """
    overlap = sorted(set(targets) & set(controls))
    if overlap:
        raise ValueError(f"regions {overlap} are both target and control")
    target = region_mean(roi, targets)
    return {
        "target_response": target,
        "selectivity_global": target - region_mean(roi, ["global"]),
        "selectivity_control": target - region_mean(roi, controls),
    }


def words(text: str) -> list[str]:
    """Word tokens (letters/digits with inner apostrophes or hyphens), in order."""
    return _WORD.findall(text)


def removed_token_fraction(original: str, spoken: str) -> float:
    """Fraction of the completion's word tokens that normalisation removed before speech (0..1).

    Counts word tokens (see ``words``) before and after; 0 for a completion without any.
    """
    n_before = len(words(original))
    if n_before == 0:
        return 0.0
    return max(0.0, 1.0 - len(words(spoken)) / n_before)


def words_per_second(n_words: int, audio_seconds: float) -> float:
    """Speech rate; NaN without audio."""
    return n_words / audio_seconds if audio_seconds > 0 else math.nan


def text_statistics(text: str) -> dict[str, float]:
    """Mean sentence length (words), punctuation marks per word, type-token ratio (lower-cased).

    Sentences end at ``.``, ``!``, ``?`` or ``…`` followed by white space or the end; trailing
    text without an end mark counts as a sentence. NaN for a text without words.
    """
    tokens = words(text)
    if not tokens:
        return {"sentence_length": math.nan, "punctuation_rate": math.nan, "type_token_ratio": math.nan}
    sentences = [s for s in _SENTENCE_END.split(text) if words(s)]
    return {
        "sentence_length": len(tokens) / max(1, len(sentences)),
        "punctuation_rate": len(_PUNCT.findall(text)) / len(tokens),
        "type_token_ratio": len({t.lower() for t in tokens}) / len(tokens),
    }


def nll_per_token(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token (nats) of a completion's token log-probs; NaN if empty."""
    return -float(np.mean(np.asarray(logprobs, dtype=np.float64))) if len(logprobs) else math.nan


# The per-sample analysis columns, in the order the rollouts and eval samples store them.
ANALYSIS_COLUMNS: tuple[str, ...] = (
    "target_response", "selectivity_global", "selectivity_control", "base_nll_per_token", "words_per_second",
    "removed_token_fraction", "sentence_length", "punctuation_rate", "type_token_ratio",
)


def sample_measures(completion: str, roi: Mapping[str, float | None], *, scored: bool, n_words: int,
                    audio_seconds: float, removed_fraction: float | None, targets: Sequence[str],
                    controls: Sequence[str] = DEFAULT_CONTROL_REGIONS,
                    base_nll: float | None = None) -> dict[str, float]:
    """Every analysis column of one completion (``ANALYSIS_COLUMNS``), NaN where not measured.

    ``scored`` False (unspeakable or failed): no brain or speech measures, text measures only.
    ``removed_fraction`` is the pipeline's ``removed_token_fraction``; ``base_nll`` the base model's
    NLL per token when known.
    """
    nan = math.nan
    out = selectivity(roi, targets, controls) if scored else {
        "target_response": nan, "selectivity_global": nan, "selectivity_control": nan}
    out["base_nll_per_token"] = nan if base_nll is None else float(base_nll)
    out["words_per_second"] = words_per_second(n_words, audio_seconds) if scored else nan
    out["removed_token_fraction"] = nan if removed_fraction is None or not scored else float(removed_fraction)
    out.update(text_statistics(completion))
    return {k: out[k] for k in ANALYSIS_COLUMNS}


def step_means(rows: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Per-step metrics: the mean of each analysis column over the step's rows where it is finite.

    A column with no finite value this step is left out (a step where nothing was scored has no
    selectivity), so guards and dashboards never see a mean of nothing.
    """
    out: dict[str, float] = {}
    for col in ANALYSIS_COLUMNS:
        values = [float(v) for r in rows if isinstance(v := r.get(col), (int, float)) and math.isfinite(float(v))]
        if values:
            out[col] = float(np.mean(values))
    return out

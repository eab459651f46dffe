"""Time and layer bookkeeping of TRIBE v2's feature stages (pure numpy, no model library).

Each rule below restates what ``neuralset==0.0.2`` does (read, not copied), because the official
encoder weights were trained on features built exactly this way:

- **Layer groups** (``HuggingFaceMixin._aggregate_layers`` with ``layer_aggregation="group_mean"``):
  for ``n`` hidden states and relative depths ``layers_to_use``, the cut points are
  ``sorted(set(int(f * (n - 1)) for f in layers_to_use))`` (``int`` truncates), the last cut gets
  ``+1``, and consecutive cuts bound the groups: 29 states -> ``[14:21], [21:29]``; 25 -> ``[12:18],
  [18:25]``; 31 (SmolLM2-135M) -> ``[15:22], [22:31]``.
- **Layer sub-selection** (``_layer_subselection``, active when an extractor has ``cache_n_layers``):
  ``int(round(x)) for x in np.linspace(0, n - 1, cache_n_layers)`` keeps ``cache_n_layers`` states
  *before* the group rule runs on them. TRIBE's released config sets ``cache_n_layers=20``; the text
  extractor applies it (inside ``_aggregate_tokens``) and the audio extractor never calls it. For
  Llama-3.2-3B this turns the groups into hidden states ``{13,15,16,18,19}`` and
  ``{21,22,24,25,27,28}`` rather than ``[14:21]`` and ``[21:29]`` — see ``layer_group_indices``.
- **Rounding**: ``neuralset.base.Frequency.to_ind`` is ``int(round(seconds * hz))`` on Python floats,
  i.e. round-half-to-even ("banker's rounding"): at 2 Hz, 0.25 s -> bin 0, 0.75 s -> bin 2,
  1.25 s -> bin 2. ``round`` below is Python's built-in on floats for the same reason.
- **Words -> 2 Hz bins** (``TimedArray.__iadd__`` / ``_overlap_slice``, ``aggregation="sum"``): a word
  is clipped to the segment ``[0, n_bins / hz)``; it covers ``round(hz * clipped_duration)`` bins
  (at least 1) from bin ``round(hz * clipped_start)``; a run that would pass the last bin is moved
  left so that it ends on the last bin; words sharing a bin are summed; a word starting at or after
  the segment end (or ending before 0) is dropped.
- **Audio 50 Hz -> 2 Hz** (``BaseAudio._get_data``): ``torch.nn.functional.interpolate`` with its
  default ``mode="nearest"`` to ``round(2 * piece_seconds)`` steps per audio piece, then cut to each
  segment and added at the piece's own start (``place_frames``).
- **Segments and TRs** (``tribev2/main.py`` ``Data.get_loaders``, ``demo_utils.py``
  ``TribeModel.predict``): a helper event spans the earliest event start to the latest stop; 100 s
  windows are laid from its start (the last one incomplete), each binned on its own grid from its own
  start, and the 1 s TRs overlapping an event are kept: ``upstream_timeline``. Sentence events start
  1e-6 s before their first word, so a first word at t = 0 starts the windows at -1e-6 s.
- **Audio pieces** (``ChunkEvents(max_duration=60, min_duration=30)``): ``audio_chunks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np


def n_bins_for(seconds: float, hz: float = 2.0) -> int:
    """Number of feature steps of a segment lasting ``seconds`` (upstream: ``max(1, round(hz * s))``)."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return max(1, round(float(seconds) * float(hz)))


def _cut_points(n_states: int, layers_to_use: Sequence[float]) -> list[int]:
    if n_states < 1:
        raise ValueError(f"need at least one hidden state, got {n_states}")
    if not layers_to_use:
        raise ValueError("layers_to_use is empty")
    for f in layers_to_use:
        if not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"layers_to_use entries must lie in [0, 1], got {f}")
    return sorted({int(float(f) * (n_states - 1)) for f in layers_to_use})


def layer_group_bounds(
    n_hidden_states: int, layers_to_use: Sequence[float] = (0.5, 0.75, 1.0)
) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` hidden-state ranges averaged by ``group_mean``.

    Upstream returns a single un-grouped layer when only one distinct cut point remains (for
    example one hidden state); we return it as the one group ``(i, i + 1)`` so that callers always
    get a (groups, dim) array.
    """
    cuts = _cut_points(n_hidden_states, layers_to_use)
    if len(cuts) == 1:
        return [(cuts[0], cuts[0] + 1)]
    cuts[-1] += 1
    return list(pairwise(cuts))


def subselect_layers(n_hidden_states: int, cache_n_layers: int | None) -> list[int]:
    """Hidden-state indices kept by upstream's ``cache_n_layers`` sub-selection (all if None/too large)."""
    if cache_n_layers is None or cache_n_layers >= n_hidden_states:
        return list(range(n_hidden_states))
    if cache_n_layers < 2:
        raise ValueError(f"cache_n_layers must be None or >= 2, got {cache_n_layers}")
    return [round(float(x)) for x in np.linspace(0, n_hidden_states - 1, cache_n_layers)]


def layer_group_indices(
    n_hidden_states: int,
    layers_to_use: Sequence[float] = (0.5, 0.75, 1.0),
    cache_n_layers: int | None = None,
) -> list[list[int]]:
    """Hidden-state indices averaged into each group, after the optional sub-selection."""
    kept = subselect_layers(n_hidden_states, cache_n_layers)
    return [kept[a:b] for a, b in layer_group_bounds(len(kept), layers_to_use)]


def bin_word_features(
    word_features: np.ndarray,
    starts: Sequence[float],
    durations: Sequence[float],
    n_bins: int,
    hz: float = 2.0,
    segment_start: float = 0.0,
) -> np.ndarray:
    """Sum per-word vectors ``(n_words, G, D)`` onto the ``(G, D, n_bins)`` grid of one segment.

    The grid starts at ``segment_start`` (upstream: each 100 s segment's own start, see
    ``upstream_timeline``); times are in seconds on the passage's timeline.
    """
    feats = np.asarray(word_features)
    if feats.ndim != 3:
        raise ValueError(f"word_features must be (n_words, G, D), got shape {feats.shape}")
    if not len(feats) == len(starts) == len(durations):
        raise ValueError(f"{len(feats)} feature rows, {len(starts)} starts, {len(durations)} durations")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    out = np.zeros((feats.shape[1], feats.shape[2], n_bins), dtype=np.float32)
    seg_start = float(segment_start)
    seg_stop = seg_start + n_bins / float(hz)  # upstream: TimedArray.start + n_samples / frequency
    for vec, start, duration in zip(feats, starts, durations, strict=True):
        start, duration = float(start), float(duration)
        if duration < 0:
            raise ValueError(f"negative word duration {duration}")
        lo, hi = max(start, seg_start), min(start + duration, seg_stop)
        if hi < lo or (hi == lo and duration > 0):
            continue  # no overlap with the segment (also: a word starting exactly at its end)
        first = round((lo - seg_start) * hz)
        count = max(1, round((hi - lo) * hz))
        first = min(first, n_bins - count)  # upstream's right-edge rule: keep the run inside
        out[:, :, first : first + count] += vec[:, :, None]
    return out


# ---- upstream's timeline: segments, TRs kept, audio chunks ------------------------------------------------
def _grid_slice(grid_start: float, n: int, hz: float, start: float, duration: float) -> tuple[int, int] | None:
    """``(first index, count)`` of a sampled array's samples overlapping ``[start, start + duration)``.

    ``TimedArray._overlap_slice`` for an array with a time axis: ``None`` when they do not overlap (or
    only touch, both having a duration); otherwise rounded start and length (at least one sample),
    moved left so the run ends inside the array.
    """
    grid_duration = n / hz
    lo = max(start, grid_start)
    hi = min(start + duration, grid_start + grid_duration)
    if hi < lo or (hi == lo and grid_duration and duration):
        return None
    if not grid_duration:
        return None
    first = round((lo - grid_start) * hz)
    count = max(1, round((hi - lo) * hz))
    first = min(first, n - count)
    if first < 0:
        raise RuntimeError(f"no room for {count} samples in an array of {n}")
    return first, count


def place_frames(frames: np.ndarray, frames_start: float, segment_start: float, n_bins: int,
                 hz: float = 2.0) -> np.ndarray:
    """Add a ``(G, D, n)`` array sampled at ``hz`` from ``frames_start`` onto one segment's grid.

    Upstream: the audio extractor cuts each audio event's features to the segment
    (``TimedArray.overlap``) and adds the cut into the segment's array (``TimedArray.__iadd__``);
    both steps round their own start and length, which is reproduced here step by step.
    """
    out = np.zeros((*frames.shape[:2], n_bins), dtype=np.float32)
    n = frames.shape[-1]
    seg_duration = n_bins / hz
    cut = _grid_slice(frames_start, n, hz, segment_start, seg_duration)
    if cut is None:
        return out
    first, count = cut
    sub, sub_start = frames[..., first : first + count], first / hz + frames_start
    into = _grid_slice(segment_start, n_bins, hz, sub_start, count / hz)
    back = _grid_slice(sub_start, count, hz, segment_start, seg_duration)
    if into is None or back is None:
        return out
    out[..., into[0] : into[0] + into[1]] += sub[..., back[0] : back[0] + back[1]]
    return out


def audio_chunks(duration: float, sample_rate: float, max_duration: float = 60.0,
                 min_duration: float = 30.0) -> list[tuple[float, float]]:
    """``(start, duration)`` of the pieces upstream's ``ChunkEvents(max_duration=60, min_duration=30)`` cuts.

    Cut points every ``max_duration`` s; a cut is dropped when the piece before or after it (measured
    to the neighbouring *candidate* cut, rounded to the sample rate's decimals) would be shorter than
    ``min_duration``. So 100 s -> [0, 60) + [60, 100); 80 s -> one piece; 130 s -> [0, 60) + [60, 130).
    """
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    n = max(0, math.ceil(duration / max_duration - 1e-9))  # strided windows, incomplete kept
    cuts = sorted({float(t) for t in np.arange(n) * max_duration if 0 < t < duration})
    if min_duration and cuts:
        decimals = max(0, int(-np.floor(np.log10(1 / sample_rate))) + 1)
        before = np.round(np.diff(cuts, prepend=0), decimals)
        after = np.round(np.diff(cuts, append=duration), decimals)
        cuts = [t for t, b, a in zip(cuts, before, after, strict=True) if b >= min_duration and a >= min_duration]
    out, start = [], 0.0
    for stop in [*cuts, duration]:
        out.append((start, stop - start))
        start = stop
    return out


@dataclass(frozen=True)
class Timeline:
    """The 100 s segments upstream predicts for one passage, and the 1 s TRs ``TribeModel.predict`` keeps."""

    start: float  # earliest event start (-1e-6 when the first word starts at 0: its Sentence event)
    stop: float
    segment_starts: tuple[float, ...]
    kept_trs: tuple[int, ...]  # per segment: leading TRs that overlap an event

    @property
    def n_trs(self) -> int:
        return sum(self.kept_trs)


def upstream_timeline(extents: Sequence[tuple[float, float]], segment_seconds: float = 100.0,
                      tr: float = 1.0) -> Timeline:
    """Segments and kept TRs from the events' ``(start, stop)`` (audio pieces, words, text, sentences).

    Upstream (``tribev2/main.py`` ``Data.get_loaders``) adds one helper event spanning the earliest start
    to the latest stop, cuts it into back-to-back ``segment_seconds`` windows (the last one incomplete,
    i.e. ``ceil(span / 100)`` windows), and ``TribeModel.predict`` keeps each 1-TR piece of a window
    that overlaps at least one event: ``ceil(span)`` TRs in all.
    """
    if not extents:
        raise ValueError("no events")
    t0 = min(a for a, _ in extents)
    duration = max(b for _, b in extents) - t0
    stop = t0 + duration
    events = [*extents, (t0, stop)]
    n = max(0, math.ceil(duration / segment_seconds - 1e-9))
    starts = tuple(float(x) for x in t0 + np.arange(n) * segment_seconds)
    kept = []
    for s in starts:
        pieces = [s + t for t in np.arange(0, segment_seconds - 1e-2, tr)]
        keep = [any(a < p + tr and b > p for a, b in events) for p in pieces]
        if keep != sorted(keep, reverse=True):  # the helper event makes them one block from the start
            raise RuntimeError("non-contiguous TRs kept")
        kept.append(sum(keep))
    return Timeline(t0, stop, starts, tuple(kept))


def nearest_indices(n_src: int, n_out: int) -> np.ndarray:
    """Source index of each output step for ``F.interpolate(mode="nearest", size=n_out)``.

    PyTorch (aten ``nearest_idx``) copies when sizes match, halves when ``n_out == 2 n_src``, else
    takes ``min(floor(k * s), n_src - 1)`` with ``s = float32(n_src / n_out)`` computed in float32;
    the float32 arithmetic is reproduced so that exact-integer products round the same way.
    """
    if n_src < 1 or n_out < 0:
        raise ValueError(f"bad sizes n_src={n_src} n_out={n_out}")
    k = np.arange(n_out)
    if n_out == n_src:
        return k
    if n_out == 2 * n_src:
        return k >> 1
    scale = np.float32(n_src) / np.float32(n_out)
    idx = np.floor(k.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_src - 1)


def resample_nearest(
    features: np.ndarray,
    src_hz: float,
    dst_hz: float,
    n_bins: int,
    duration: float | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling of ``(G, D, T_src)`` frames onto a ``(G, D, n_bins)`` grid.

    Upstream resamples to ``round(dst_hz * duration)`` steps, where ``duration`` is the length of
    the audio event in seconds (not ``T_src / src_hz``: the two can round differently), then places
    them from bin 0 of the segment. Pass ``duration`` for that exact behaviour; without it the
    frame count ``T_src / src_hz`` stands in for it.
    """
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must be (G, D, T), got shape {feats.shape}")
    n_src = feats.shape[-1]
    seconds = n_src / float(src_hz) if duration is None else float(duration)
    n_out = round(seconds * float(dst_hz))
    out = np.zeros((*feats.shape[:2], n_bins), dtype=feats.dtype)
    if n_src == 0 or n_out == 0:
        return out
    picked = feats[..., nearest_indices(n_src, n_out)]
    m = min(n_out, n_bins)
    out[..., :m] = picked[..., :m]
    return out

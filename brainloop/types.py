"""Plain data records that cross actor boundaries.

Everything here is a dataclass of builtins and numpy arrays so it pickles cheaply through
Ray's object store and imports no model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class WordEvent:
    """One spoken word: its original text and where it sits in the audio (seconds)."""

    text: str
    start: float
    duration: float


@dataclass
class Speech:
    """Mono waveform plus, when the TTS engine knows them, exact word timings."""

    waveform: np.ndarray  # float32, shape (n_samples,)
    sample_rate: int
    words: list[WordEvent] | None = None

    @property
    def seconds(self) -> float:
        return len(self.waveform) / float(self.sample_rate)


@dataclass
class ScoreResult:
    """What the reward pool returns for one text.

    ``status`` is "ok" (scored), "unspeakable" (nothing a TTS engine can read: empty, emoji only),
    or "failed" (an error in a stage, a timeout, a dead worker after all retries). Only "ok"
    results carry a reward; the others carry the reason in ``error``.
    """

    status: str
    reward: float | None = None
    roi: dict[str, float] = field(default_factory=dict)  # 20 regions + hemispheres + global, time-mean
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    n_trs: int = 0
    n_words: int = 0
    audio_seconds: float = 0.0
    truncated: bool = False
    english: bool = True
    error: str | None = None
    cache_hit: bool = False
    encoder_trained: bool = False  # False: an untrained (seeded random) embedded encoder
    worker: str = ""
    attempts: int = 1
    prediction_path: str | None = None
    # Fidelity to TRIBE v2 (README "Fidelity to TRIBE v2"): the spaCy pipeline that split sentences for
    # the word contexts ("en_core_web_lg" as upstream, or "sentencizer"), how many words got a context
    # (upstream drops words it cannot locate in its rewritten text), and whether the encoder and every
    # feature setting came from an official TRIBE release (config.yaml + best.ckpt).
    splitter: str = ""
    n_words_kept: int = 0
    official_release: bool = False
    # Word tokens of the text that normalisation removed before speech (markup, emoji, code), 0..1.
    removed_token_fraction: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

"""All the records shared between layers, in one place.

Speech and scoring (``WordEvent``, ``Speech``, ``ScoreResult``: reward workers -> driver), sampling
(``Completion``: sampler -> driver), the update (``TrainSample``, ``TrainGroup``: driver -> learner) and
the reward -> advantage rule's per-sample outcome (``SampleOutcome``: ``algo.build_groups`` -> rollout
log). Everything here is a dataclass of builtins and numpy arrays so it pickles cheaply through Ray's
object store and imports no model library.
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


@dataclass
class Completion:
    """One sampled completion, as the rest of the pipeline sees it."""

    prompt_index: int
    sample_index: int
    text: str  # decoded without special tokens (no EOS)
    token_ids: list[int]  # sampled ids, cut after the first EOS (which is kept when finish is "stop")
    logprobs: list[float]  # sampler log-prob of each token in token_ids (temperature-1, raw logits)
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached)
    adapter_version: int  # 0 = base model
    prompt_token_ids: list[int] = field(default_factory=list)  # the chat-formatted prompt the learner conditions on
    started_at: float = 0.0  # unix time the generate call started / finished in the sampler
    finished_at: float = 0.0


@dataclass
class TrainSample:
    """One completion to learn from (token ids as the sampler produced them)."""

    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including EOS when the completion stopped; never padding
    sampler_logprobs: list[float]
    advantage: float
    adapter_version: int


@dataclass
class TrainGroup:
    """The N completions of one prompt; advantages were normalised within it."""

    samples: list[TrainSample]


@dataclass(frozen=True)
class SampleOutcome:
    """What the reward -> advantage rule (``algo.build_groups``) made of one completion.

    ``reward`` is the reward recorded for it (the brain reward, or ``reward.unspeakable_reward`` for an
    unspeakable text when one is given), None when it has none (failed, excluded, non-finite);
    ``advantage`` its group advantage, None when it has none; ``used`` whether it is in the update.
    """

    reward: float | None
    advantage: float | None
    used: bool

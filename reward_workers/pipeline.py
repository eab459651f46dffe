"""Text -> speech -> word timings -> features -> TRIBE encoder -> cortical response -> reward.

Every stage is a backend chosen in ``reward.pipeline`` of the config; the models are loaded once,
when the pipeline is built. ``score(text)`` never raises: bad input becomes an "unspeakable"
outcome and a failing stage a "failed" one, each with its reason.

The model's settings come from a TRIBE v2 release (``config.yaml`` + ``best.ckpt``,
``reward_workers.release``): the official one (``encoder: {kind: official, release: facebook/tribev2}``)
or, for the embedded default, a small random one written in the same format on first use, so both run
the same loading code. ``predict_speech`` is the seam from speech and its words to the prediction, in
upstream's order: word contexts (``word_context``), per-word text features, audio pieces, 100 s
segments from the first event (``binning.upstream_timeline``), the encoder per segment, and the TRs
``TribeModel.predict`` keeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from brainloop import rois
from brainloop.analysis import removed_token_fraction
from brainloop.models import cache_dir
from brainloop.reward_spec import RewardSpec, scalar_reward
from brainloop.threads import set_torch_threads
from brainloop.types import ScoreResult

logger = logging.getLogger(__name__)
UPSTREAM_SPLITTER = "en_core_web_lg"  # what the official package splits sentences with

# Incremented when a change to this pipeline changes the numbers it produces: old cache entries
# then no longer match. 2: upstream word contexts, per-segment binning, release settings, audio pieces.
PIPELINE_VERSION = 2


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def upstream_word_order(words: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of ``words`` in upstream's event order: by start, then longer first (stable)."""
    return sorted(range(len(words)), key=lambda i: (float(words[i]["start"]), -float(words[i]["duration"])))


class TribePipeline:
    """Our implementation of the TRIBE v2 text path, stage by stage, configured by a release."""

    def __init__(self, pipeline: dict, spec: dict | RewardSpec, use_cache: bool = True) -> None:
        from reward_workers import release as rel
        from reward_workers.word_context import load_splitter

        if pipeline.get("torch_threads"):
            set_torch_threads(int(pipeline["torch_threads"]))  # works beside a vLLM-CPU engine in this process
        self.cfg = pipeline
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)
        self.use_cache = use_cache
        self.device = pipeline["device"]
        self.splitter = load_splitter(pipeline.get("spacy_model", "en_core_web_lg"))
        self.max_context_len = int(pipeline["max_context_words"])
        enc = pipeline["encoder"]
        if enc["kind"] == "official" and enc.get("release"):
            self.release_dir: Path | None = rel.resolve_release(enc["release"])
            config = rel.load_release_config(self.release_dir / rel.CONFIG_NAME)
            self.settings = rel.release_settings(config)
            self._build_extractors(enc.get("text_model") or self.settings.text_model,
                                   enc.get("audio_model") or self.settings.audio_model)
            self._load_release_encoder(config)
            self.official_release, self.encoder_trained = True, True
        elif enc["kind"] == "official":  # a bare architecture config + weights (no release config)
            from reward_workers.encoder import load_fmri_encoder

            if not (enc.get("config") and enc.get("weights")):
                raise ValueError("reward.pipeline.encoder kind 'official' needs 'release' (or 'config' + 'weights')")
            self.release_dir = None
            self.settings = rel.release_settings(rel.embedded_release_config(
                pipeline["text_model"], pipeline["audio_model"], {}, pipeline["text_cache_n_layers"]))
            self._build_extractors(pipeline["text_model"], pipeline["audio_model"])
            self.encoder = load_fmri_encoder(enc["config"], enc["weights"], device=self.device)
            self.official_release, self.encoder_trained = False, True
        else:  # embedded: a small random TRIBE written as a release, then loaded like the official one
            from reward_workers.encoder import embedded_encoder_config

            config = rel.embedded_release_config(pipeline["text_model"], pipeline["audio_model"], {},
                                                 pipeline["text_cache_n_layers"])
            self.settings = rel.release_settings(config)
            self._build_extractors(pipeline["text_model"], pipeline["audio_model"])
            encoder_cfg = embedded_encoder_config(
                {"text": self.text.feature_dims, "audio": self.audio.feature_dims}, hidden=enc["hidden"],
                depth=enc["depth"], heads=enc["heads"], low_rank_head=enc["low_rank_head"],
                n_output_timesteps=self.settings.duration_trs,
            )
            config["brain_model_config"] = encoder_cfg["brain_model_config"]
            self.release_dir = rel.build_embedded_release(cache_dir() / "tribe_releases", config, encoder_cfg,
                                                          seed=enc["seed"])
            written = rel.load_release_config(self.release_dir / rel.CONFIG_NAME)
            if rel.release_settings(written) != self.settings:
                raise RuntimeError(f"{self.release_dir}: release settings changed on the round trip")
            self._load_release_encoder(written)
            self.official_release, self.encoder_trained = False, False
        self.encoder.eval().to(self.device)
        self.masks = rois.roi_masks()
        self.cache_key_base = json.dumps(
            {"version": PIPELINE_VERSION, "pipeline": pipeline, "spec": self.spec.model_dump(mode="json"),
             "settings": rel.settings_dict(self.settings), "splitter": self.splitter.name,
             "release": str(self.release_dir) if self.official_release else None},
            sort_keys=True,
        )

    @classmethod
    def from_release(cls, release_dir: str | Path, *, text_model: str | None = None, audio_model: str | None = None,
                     device: str = "cpu", spec: dict | RewardSpec | None = None, pipeline: dict | None = None,
                     use_cache: bool = False) -> TribePipeline:
        """A pipeline whose model and every feature setting come from a TRIBE release directory (or hub id).

        ``text_model`` / ``audio_model`` replace the model ids of the release's config (a local directory
        or a hub id); ``pipeline`` sets the other stages (TTS, word timing; defaults otherwise).
        """
        from brainloop.config import PipelineConfig

        cfg = PipelineConfig().model_dump()
        cfg.update(pipeline or {})
        cfg["device"] = device
        cfg["encoder"] = {**cfg["encoder"], "kind": "official", "release": str(release_dir),
                          "text_model": text_model, "audio_model": audio_model}
        return cls(cfg, spec if spec is not None else RewardSpec(), use_cache=use_cache)

    def _build_extractors(self, text_model: str, audio_model: str) -> None:
        from reward_workers.audio_features import AudioFeatureExtractor
        from reward_workers.text_features import TextFeatureExtractor

        st = self.settings
        self.text = TextFeatureExtractor(text_model, layers_to_use=st.text_layers,
                                         max_context_words=self.max_context_len, device=self.device,
                                         cache_n_layers=st.text_cache_n_layers)
        self.audio = AudioFeatureExtractor(None if audio_model == "embedded:small" else audio_model,
                                           layers_to_use=st.audio_layers, device=self.device, hz=st.frequency)

    def _load_release_encoder(self, config: Mapping[str, Any]) -> None:
        from reward_workers import release as rel
        from reward_workers.encoder import encoder_from_state_dict

        assert self.release_dir is not None
        state, build_args = rel.load_checkpoint(self.release_dir / rel.CHECKPOINT_NAME)
        enc_cfg = rel.encoder_config(config, build_args)
        ours = {"text": list(self.text.feature_dims), "audio": list(self.audio.feature_dims)}
        for name, dims in ours.items():
            theirs = enc_cfg["feature_dims"].get(name)
            if theirs is None or list(theirs) != dims:
                raise rel.ReleaseError(f"the release's encoder expects {name} features {theirs}, the configured "
                                       f"{name} model gives {dims}")
        if enc_cfg["n_output_timesteps"] != self.settings.duration_trs:
            raise rel.ReleaseError(f"encoder pools to {enc_cfg['n_output_timesteps']} steps, segments have "
                                   f"{self.settings.duration_trs} TRs")
        self.encoder = encoder_from_state_dict(enc_cfg, state, build_args, device=self.device)

    # ---- cache -------------------------------------------------------------------------------
    def cache_key(self, text: str) -> str:
        return hashlib.sha256((self.cache_key_base + "\x00" + text).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return cache_dir() / "reward_cache" / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> ScoreResult | None:
        path = self._cache_path(key)
        if not (self.use_cache and path.is_file()):
            return None
        try:
            result = ScoreResult(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            return None  # a torn or outdated entry is recomputed
        result.cache_hit = True
        return result

    def _cache_put(self, key: str, result: ScoreResult) -> None:
        if not self.use_cache or result.status == "failed":
            return
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(result.__dict__))
        tmp.replace(path)  # atomic: concurrent workers never see half an entry

    # ---- stages ------------------------------------------------------------------------------
    def predict_speech(self, waveform: np.ndarray, sample_rate: int, words: Sequence[Mapping[str, Any]],
                       timer: _Timer | None = None, facts: dict | None = None) -> np.ndarray:
        """(n_TR, 20484) predicted BOLD at 1/TR Hz for speech and its words, as ``TribeModel.predict`` returns.

        ``words``: ``{"text", "start", "duration"}`` (seconds from the start of ``waveform``), what a
        transcript holds. ``facts``, when given, receives what the stages found (splitter, words kept).
        """
        from reward_workers.encoder import predict_segment_batch

        timer = timer or _Timer()
        segments, timeline = self.speech_segments(waveform, sample_rate, words, timer, facts)
        with timer.stage("encoder"):
            return predict_segment_batch(self.encoder, segments, timeline.kept_trs)

    def speech_segments(self, waveform: np.ndarray, sample_rate: int, words: Sequence[Mapping[str, Any]],
                        timer: _Timer | None = None, facts: dict | None = None) -> tuple[dict[str, np.ndarray], Any]:
        """The encoder's inputs: ``{"text", "audio"}`` -> (n_segments, groups, D, bins), and the ``Timeline``."""
        from reward_workers.binning import audio_chunks, bin_word_features, place_frames, upstream_timeline
        from reward_workers.word_context import sentence_extents, word_contexts

        timer = timer or _Timer()
        st = self.settings
        wav = np.asarray(waveform)
        seconds = len(wav) / float(sample_rate)
        order = upstream_word_order(words)
        texts = [str(words[i]["text"]) for i in order]
        starts = [float(words[i]["start"]) for i in order]
        durations = [float(words[i]["duration"]) for i in order]
        n_bins = max(1, round(st.segment_seconds * st.frequency))
        with timer.stage("text_features"):
            extents: list[tuple[float, float]] = []
            kept: list[int] = []
            if texts:
                ctx = word_contexts(texts, self.splitter, max_context_len=self.max_context_len,
                                    starts=starts, durations=durations)
                kept = ctx.kept
                word_feats = self.text.context_features([ctx.contexts[i] for i in kept], [texts[i] for i in kept])
                extents += sentence_extents(starts, durations, ctx.located)
                first = min(starts)  # the Text event spans all words, located or not
                extents.append((first, first + (max(a + b for a, b in zip(starts, durations, strict=True)) - first)))
                extents += [(starts[i], starts[i] + durations[i]) for i in kept]
        chunks = audio_chunks(seconds, sample_rate)
        extents += [(a, a + b) for a, b in chunks]
        timeline = upstream_timeline(extents, st.segment_seconds, st.tr)
        segments: dict[str, np.ndarray] = {}
        if kept:
            segments["text"] = np.stack([
                bin_word_features(word_feats, [starts[i] for i in kept], [durations[i] for i in kept], n_bins,
                                  st.frequency, segment_start=s0)
                for s0 in timeline.segment_starts])
        with timer.stage("audio_features"):
            pieces = self.audio.chunk_features(wav, sample_rate, chunks)
            segments["audio"] = np.stack([
                sum(place_frames(frames, start, s0, n_bins, st.frequency) for start, frames in pieces)
                for s0 in timeline.segment_starts])
        if facts is not None:
            facts.update(splitter=self.splitter.name, n_words_kept=len(kept))
        return segments, timeline

    def tts_options(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Options for ``tts.synthesize``: the config's voice (espeak), then ``extra`` on top (a speech
        variant of ``brainloop eval --voices``: an espeak voice or rate, a gTTS accent)."""
        base: dict[str, Any] = {"voice": self.cfg["tts_voice"]} if self.cfg["tts"] == "espeak" else {}
        return {**base, **(extra or {})}

    def predict(self, text: str, timer: _Timer | None = None,
                tts_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """(n_TR, 20484) predicted BOLD at 1 Hz, and facts about the input. Raises on bad input."""
        from reward_workers.speakable import looks_english, make_speakable
        from reward_workers.tts import synthesize
        from reward_workers.word_timing import word_events

        timer = timer or _Timer()
        cfg = self.cfg
        with timer.stage("normalise"):
            speakable = make_speakable(text, cfg["max_chars"])
        with timer.stage("tts"):
            speech = synthesize(speakable.text, cfg["tts"], **self.tts_options(tts_options))
        with timer.stage("word_timing"):
            events = word_events(speech, speakable.text, cfg["word_timing"], model=cfg["asr_model"])
        facts: dict[str, Any] = {}
        words = [{"text": e.text, "start": e.start, "duration": e.duration} for e in events]
        prediction = self.predict_speech(speech.waveform, speech.sample_rate, words, timer, facts)
        if cfg.get("simulated_latency_s"):  # benchmarks only: GPU time we cannot spend here (no CPU used)
            with timer.stage("simulated_latency"):
                time.sleep(cfg["simulated_latency_s"])
        facts.update(n_words=len(events), audio_seconds=speech.seconds, truncated=speakable.truncated,
                     english=looks_english(speakable.text), official_release=self.official_release,
                     removed_token_fraction=removed_token_fraction(text, speakable.text))
        return prediction, facts

    def score(self, text: str, prediction_dir: str | None = None,
              tts_options: Mapping[str, Any] | None = None) -> ScoreResult:
        """Score ``text``; never raises (bad input: "unspeakable", a failing stage: "failed").

        ``tts_options`` speaks it differently (``brainloop eval --voices``); they are part of the cache key.
        """
        from reward_workers.speakable import UnspeakableText

        key = self.cache_key(text if not tts_options else text + "\x00" + json.dumps(tts_options, sort_keys=True))
        cached = self._cache_get(key)
        if cached is not None and (prediction_dir is None or cached.prediction_path):
            return cached
        timer = _Timer()
        try:
            prediction, facts = self.predict(text, timer, tts_options)
            with timer.stage("scoring"):
                courses = rois.roi_means(prediction, self.masks)
                reward = scalar_reward(self.spec, courses)
            if not np.isfinite(reward):
                raise FloatingPointError(f"non-finite reward {reward}")
            result = ScoreResult(
                status="ok", reward=reward, roi={k: float(v.mean()) for k, v in courses.items()},
                timings=timer.timings, n_trs=int(prediction.shape[0]), encoder_trained=self.encoder_trained,
                **facts,
            )
            if prediction_dir is not None:
                path = Path(prediction_dir) / f"{key}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, prediction.astype(np.float32))
                result.prediction_path = str(path)
        except UnspeakableText as exc:
            return ScoreResult(status="unspeakable", error=str(exc), timings=timer.timings,
                               encoder_trained=self.encoder_trained, official_release=self.official_release,
                               splitter=self.splitter.name)
        except Exception as exc:  # a stage failed: recorded per sample, never crashes the run
            return ScoreResult(status="failed", error=f"{type(exc).__name__}: {exc}",
                               timings=timer.timings, encoder_trained=self.encoder_trained,
                               official_release=self.official_release, splitter=self.splitter.name)
        self._cache_put(key, result)
        return result


class OfficialTribePipeline:
    """``reward.pipeline.backend: tribev2`` — the official package as the oracle (GPU image).

    Wraps ``tribev2.TribeModel.from_pretrained``, ``get_events_dataframe`` and ``predict``; the
    package is not on PyPI and pins torch<2.7, so it lives in the reward-worker image.
    """

    def __init__(self, pipeline: dict, spec: dict | RewardSpec) -> None:
        try:
            from tribev2 import TribeModel
        except ImportError as exc:
            raise ImportError(
                "reward.pipeline.backend 'tribev2' needs the official tribev2 package (reward-worker image, "
                "docker/reward-worker.Dockerfile); it is not installable from PyPI"
            ) from exc
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)
        self.model = TribeModel.from_pretrained(pipeline["tribev2_checkpoint"])
        self.masks = rois.roi_masks()
        self.encoder_trained = True

    def score(self, text: str, prediction_dir: str | None = None,
              tts_options: Mapping[str, Any] | None = None) -> ScoreResult:
        timer = _Timer()
        if tts_options:  # upstream speaks with its own gTTS settings: a variant cannot be honoured
            return ScoreResult(status="failed", error=f"the tribev2 backend cannot use speech variants ({tts_options})",
                               encoder_trained=True, official_release=True, splitter=UPSTREAM_SPLITTER)
        try:
            # get_events_dataframe reads a .txt path; the directory (and the file) go when it returns or fails.
            with tempfile.TemporaryDirectory(prefix="brainloop-tribev2-") as tmp:
                path = os.path.join(tmp, "text.txt")
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
                with timer.stage("events"):
                    events = self.model.get_events_dataframe(text_path=path)
            with timer.stage("predict"):
                prediction, _segments = self.model.predict(events=events)
            courses = rois.roi_means(np.asarray(prediction), self.masks)
            reward = scalar_reward(self.spec, courses)
            return ScoreResult(status="ok", reward=reward, roi={k: float(v.mean()) for k, v in courses.items()},
                               timings=timer.timings, n_trs=int(np.asarray(prediction).shape[0]),
                               encoder_trained=True, official_release=True, splitter=UPSTREAM_SPLITTER)
        except Exception as exc:
            return ScoreResult(status="failed", error=f"{type(exc).__name__}: {exc}", timings=timer.timings,
                               encoder_trained=True, official_release=True, splitter=UPSTREAM_SPLITTER)


def build_pipeline(pipeline: dict, spec: dict | RewardSpec, use_cache: bool = True):
    if pipeline["backend"] == "tribev2":
        return OfficialTribePipeline(pipeline, spec)
    return TribePipeline(pipeline, spec, use_cache=use_cache)

"""Text -> speech -> word timings -> features -> TRIBE encoder -> cortical response -> reward.

Every stage is a backend chosen in ``reward.pipeline`` of the config; the models are loaded once,
when the pipeline is built. ``score(text)`` never raises: bad input becomes an "unspeakable"
outcome and a failing stage a "failed" one, each with its reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from brainloop import rois
from brainloop.models import cache_dir
from brainloop.reward_spec import RewardSpec, scalar_reward
from brainloop.types import ScoreResult

# Incremented when a change to this pipeline changes the numbers it produces: old cache entries
# then no longer match.
PIPELINE_VERSION = 1


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


class TribePipeline:
    """Our implementation of the TRIBE v2 text path, stage by stage."""

    def __init__(self, pipeline: dict, spec: dict | RewardSpec, use_cache: bool = True) -> None:
        import torch

        from reward_workers.audio_features import AudioFeatureExtractor
        from reward_workers.encoder import embedded_encoder_config, load_fmri_encoder
        from reward_workers.text_features import TextFeatureExtractor

        if pipeline.get("torch_threads"):
            torch.set_num_threads(int(pipeline["torch_threads"]))
        self.cfg = pipeline
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)
        self.use_cache = use_cache
        self.text = TextFeatureExtractor(pipeline["text_model"], max_context_words=pipeline["max_context_words"],
                                         device=pipeline["device"], cache_n_layers=pipeline["text_cache_n_layers"])
        self.audio = AudioFeatureExtractor(pipeline["audio_model"], device=pipeline["device"])
        enc = pipeline["encoder"]
        if enc["kind"] == "official":
            self.encoder = load_fmri_encoder(enc["config"], enc["weights"])
            self.encoder_trained = True
        else:
            config = embedded_encoder_config(
                {"text": self.text.feature_dims, "audio": self.audio.feature_dims},
                hidden=enc["hidden"], depth=enc["depth"], heads=enc["heads"], low_rank_head=enc["low_rank_head"],
            )
            self.encoder = load_fmri_encoder(config, None, seed=enc["seed"])
            self.encoder_trained = False
        self.encoder.eval().to(pipeline["device"])
        self.masks = rois.roi_masks()
        self.cache_key_base = json.dumps(
            {"version": PIPELINE_VERSION, "pipeline": pipeline, "spec": self.spec.model_dump(mode="json")},
            sort_keys=True,
        )

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
    def predict(self, text: str, timer: _Timer | None = None) -> tuple[np.ndarray, dict]:
        """(n_TR, 20484) predicted BOLD at 1 Hz, and facts about the input. Raises on bad input."""
        import torch

        from reward_workers.binning import bin_word_features, n_bins_for
        from reward_workers.encoder import predict_segments
        from reward_workers.speakable import looks_english, make_speakable
        from reward_workers.tts import synthesize
        from reward_workers.word_timing import word_events

        timer = timer or _Timer()
        cfg = self.cfg
        with timer.stage("normalise"):
            speakable = make_speakable(text, cfg["max_chars"])
        with timer.stage("tts"):
            speech = synthesize(speakable.text, cfg["tts"], voice=cfg["tts_voice"])
        with timer.stage("word_timing"):
            events = word_events(speech, speakable.text, cfg["word_timing"], model=cfg["asr_model"])
        n_bins = n_bins_for(speech.seconds)
        with timer.stage("text_features"):
            words = self.text.word_features([e.text for e in events])
            text_feats = bin_word_features(words, [e.start for e in events], [e.duration for e in events], n_bins)
        with timer.stage("audio_features"):
            audio_feats = self.audio.features(speech.waveform, speech.sample_rate, n_bins)
        with timer.stage("encoder"), torch.no_grad():
            prediction = predict_segments(self.encoder, {"text": torch.from_numpy(text_feats),
                                                         "audio": torch.from_numpy(audio_feats)})
        if cfg.get("simulated_latency_s"):  # benchmarks only: GPU time we cannot spend here (no CPU used)
            with timer.stage("simulated_latency"):
                time.sleep(cfg["simulated_latency_s"])
        facts = {"n_words": len(events), "audio_seconds": speech.seconds, "truncated": speakable.truncated,
                 "english": looks_english(speakable.text)}
        return prediction, facts

    def score(self, text: str, prediction_dir: str | None = None) -> ScoreResult:
        from reward_workers.speakable import UnspeakableText

        key = self.cache_key(text)
        cached = self._cache_get(key)
        if cached is not None and (prediction_dir is None or cached.prediction_path):
            return cached
        timer = _Timer()
        try:
            prediction, facts = self.predict(text, timer)
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
                               encoder_trained=self.encoder_trained)
        except Exception as exc:  # a stage failed: recorded per sample, never crashes the run
            return ScoreResult(status="failed", error=f"{type(exc).__name__}: {exc}",
                               timings=timer.timings, encoder_trained=self.encoder_trained)
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

    def score(self, text: str, prediction_dir: str | None = None) -> ScoreResult:
        import tempfile

        timer = _Timer()
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
                handle.write(text)
            with timer.stage("events"):
                events = self.model.get_events_dataframe(text_path=handle.name)
            with timer.stage("predict"):
                prediction, _segments = self.model.predict(events=events)
            courses = rois.roi_means(np.asarray(prediction), self.masks)
            reward = scalar_reward(self.spec, courses)
            return ScoreResult(status="ok", reward=reward, roi={k: float(v.mean()) for k, v in courses.items()},
                               timings=timer.timings, n_trs=int(np.asarray(prediction).shape[0]),
                               encoder_trained=True)
        except Exception as exc:
            return ScoreResult(status="failed", error=f"{type(exc).__name__}: {exc}", timings=timer.timings,
                               encoder_trained=True)


def build_pipeline(pipeline: dict, spec: dict | RewardSpec, use_cache: bool = True):
    if pipeline["backend"] == "tribev2":
        return OfficialTribePipeline(pipeline, spec)
    return TribePipeline(pipeline, spec, use_cache=use_cache)

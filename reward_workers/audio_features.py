"""Wav2Vec2-BERT audio features, TRIBE v2's audio stage, on the 2 Hz grid of the text features.

Upstream (``neuralset==0.0.2`` ``BaseAudio`` / ``HuggingFaceAudio`` / ``Wav2VecBert``, read, not
copied), per audio event:

1. resample to the feature extractor's 16 kHz (upstream: ``julius.ResampleFrac``; here
   ``scipy.signal.resample_poly``, a different anti-aliasing filter: the waveforms differ slightly
   near the band edge), average channels to mono;
2. z-score over the whole event: ``(x - mean) / (1e-8 + std)`` with torch's default unbiased std;
3. ``SeamlessM4TFeatureExtractor`` (80 log-mel bins at 100 Hz, per-bin normalisation, pairs of
   frames stacked -> 160 features at 50 Hz), then ``Wav2Vec2BertModel`` with
   ``output_hidden_states=True`` and no attention mask -> ``n_layers + 1`` hidden states;
4. ``group_mean`` over the hidden-state groups of ``layers_to_use=[0.5, 0.75, 1.0]`` (25 states ->
   ``[12:18]`` and ``[18:25]``; no ``cache_n_layers`` sub-selection on this path upstream);
5. nearest-neighbour resampling to ``round(2 * seconds)`` steps at 2 Hz, placed from bin 0.

Long audio: upstream cuts events longer than 60 s into 30–90 s chunks (``ChunkEvents``) that are
encoded independently. ``frames`` likewise encodes audio over ``max_chunk_seconds`` (60) in equal
chunks of at most that length and concatenates their frames; attention cost stays linear in the
audio length (one 226 s passage took 132 s in one piece on the embedded model, 2-core CPU). The
chunk boundaries are equal splits, not upstream's exact ones.

Production loads ``facebook/w2v-bert-2.0`` from the hub. The embedded default (``None`` or
``"embedded:small"``) builds a small Wav2Vec2-BERT from a config with seeded random weights and a
``SeamlessM4TFeatureExtractor`` constructed in code, so it runs offline on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from typing import Any

import numpy as np

from reward_workers.binning import layer_group_bounds, resample_nearest

EMBEDDED_SOURCES = (None, "embedded:small")
MODEL_RATE = 16_000  # Hz, what SeamlessM4TFeatureExtractor / w2v-bert-2.0 expect
FRAME_RATE = 50.0  # Hz of the model's output frames (100 Hz fbank, stride 2)

# A small Wav2Vec2-BERT: cheap on two CPU cores (~0.5 M parameters), same layer-group rule.
EMBEDDED_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 8,  # 9 hidden states -> groups [4:6] and [6:9]
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "output_hidden_size": 64,
    "conv_depthwise_kernel_size": 15,
    "layerdrop": 0.0,
    "apply_spec_augment": False,
}


def to_mono(waveform: np.ndarray) -> np.ndarray:
    """``(n,)`` or ``(n, channels)`` -> ``(n,)`` float64 (upstream averages channels)."""
    wav = np.asarray(waveform, dtype=np.float64)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise ValueError(f"waveform must be (n_samples,) or (n_samples, channels), got {wav.shape}")
    return wav


def resample_to(wav: np.ndarray, rate: int, target: int = MODEL_RATE) -> np.ndarray:
    """Polyphase resampling between integer rates (upstream also requires integer rates)."""
    if int(rate) != rate or rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {rate}")
    rate = int(rate)
    if rate == target:
        return wav
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(wav, target // g, rate // g)


def zscore(wav: np.ndarray) -> np.ndarray:
    """Upstream's ``(x - mean) / (1e-8 + std)`` with an unbiased std (torch's default)."""
    if wav.size < 2:
        raise ValueError("need at least two samples to z-score")
    return (wav - wav.mean()) / (1e-8 + wav.std(ddof=1))


class AudioFeatureExtractor:
    """Loads a Wav2Vec2-BERT once; ``features`` maps a waveform to ``(G, D, n_bins)`` at 2 Hz."""

    def __init__(
        self,
        model_source: str | None = None,
        layers: Sequence[tuple[int, int]] | None = None,
        layers_to_use: Sequence[float] = (0.5, 0.75, 1.0),
        device: str = "cpu",
        seed: int = 0,
        hz: float = 2.0,
    ) -> None:
        import torch

        self.model_source = model_source
        self.device = torch.device(device)
        self.hz = float(hz)
        if model_source in EMBEDDED_SOURCES:
            self.model, self.feature_extractor = self._build_embedded(seed)
        else:
            self.model, self.feature_extractor = self._load(model_source)
        self.model.to(self.device).eval()
        n_states = int(self.model.config.num_hidden_layers) + 1
        self.layer_groups = (
            [(int(a), int(b)) for a, b in layers] if layers is not None
            else layer_group_bounds(n_states, tuple(layers_to_use))
        )
        for a, b in self.layer_groups:
            if not 0 <= a < b <= n_states:
                raise ValueError(f"layer group {(a, b)} outside the model's {n_states} hidden states")
        self.hidden_size = int(self.model.config.hidden_size)

    @staticmethod
    def _build_embedded(seed: int) -> tuple[Any, Any]:
        import torch
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

        config = Wav2Vec2BertConfig(**EMBEDDED_CONFIG)
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            model = Wav2Vec2BertModel(config)
        # Default arguments = w2v-bert-2.0's preprocessing (80 mel bins, 16 kHz, stride 2), except the
        # padding value, which w2v-bert-2.0's preprocessor_config sets to 1.
        return model, SeamlessM4TFeatureExtractor(padding_value=1.0)

    @staticmethod
    def _load(source: str) -> tuple[Any, Any]:
        from transformers import AutoFeatureExtractor, Wav2Vec2BertModel

        from brainloop.models import resolve_model

        path = resolve_model(source)
        try:
            return Wav2Vec2BertModel.from_pretrained(path), AutoFeatureExtractor.from_pretrained(path)
        except OSError as err:  # a hub id offline, or no such repository
            raise RuntimeError(
                f"could not load audio model {source!r} (resolved to {path!r}): {err}. Hub ids need network "
                "access or a populated Hugging Face cache; offline, use model_source=None "
                "(the embedded small Wav2Vec2-BERT)."
            ) from err

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(layer groups, hidden size) of one time step."""
        return len(self.layer_groups), self.hidden_size

    def frames(self, waveform: np.ndarray, sample_rate: int, max_chunk_seconds: float = 60.0) -> np.ndarray:
        """``(G, D, T)`` float32 group-mean hidden states at the model's ~50 Hz frame rate."""
        wav = resample_to(to_mono(waveform), sample_rate)
        n_chunks = max(1, int(np.ceil(len(wav) / (max_chunk_seconds * MODEL_RATE))))
        if n_chunks == 1:
            return self._encode(wav)
        return np.concatenate([self._encode(chunk) for chunk in np.array_split(wav, n_chunks)], axis=-1)

    def _encode(self, wav: np.ndarray) -> np.ndarray:
        import torch

        wav = zscore(wav).astype(np.float32)
        inputs = self.feature_extractor(wav, sampling_rate=MODEL_RATE, return_tensors="pt")
        feats = inputs["input_features"].to(self.device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            # Upstream passes no attention mask (its padding frame, if any, counts as audio).
            states = self.model(feats, output_hidden_states=True).hidden_states
            groups = torch.stack([torch.stack(states[a:b]).mean(0)[0] for a, b in self.layer_groups])
        return groups.transpose(1, 2).float().cpu().numpy()  # (G, T, D) -> (G, D, T)

    def features(self, waveform: np.ndarray, sample_rate: int, n_bins: int) -> np.ndarray:
        """``(G, D, n_bins)`` float32 features on the 2 Hz grid that starts with the audio."""
        seconds = len(np.asarray(waveform)) / float(sample_rate)
        frames = self.frames(waveform, sample_rate)
        return resample_nearest(frames, FRAME_RATE, self.hz, n_bins, duration=seconds)

"""Wav2Vec2-BERT audio features, TRIBE v2's audio stage, on the 2 Hz grid of the text features.

Upstream (``neuralset==0.0.2`` ``BaseAudio`` / ``HuggingFaceAudio`` / ``Wav2VecBert``, read, not
copied), per audio event:

1. resample to the feature extractor's 16 kHz with the same windowed-sinc filter as upstream's
   ``julius.ResampleFrac`` (24 zero crossings, Hann window, cut-off at 0.945 of the lower Nyquist rate;
   ``resample_sinc``, float32), average channels to mono;
2. z-score over the whole event: ``(x - mean) / (1e-8 + std)`` with torch's default unbiased std;
3. ``SeamlessM4TFeatureExtractor`` (80 log-mel bins at 100 Hz, per-bin normalisation, pairs of
   frames stacked -> 160 features at 50 Hz), then ``Wav2Vec2BertModel`` with
   ``output_hidden_states=True`` and no attention mask -> ``n_layers + 1`` hidden states;
4. ``group_mean`` over the hidden-state groups of ``layers_to_use=[0.5, 0.75, 1.0]`` (25 states ->
   ``[12:18]`` and ``[18:25]``; no ``cache_n_layers`` sub-selection on this path upstream);
5. nearest-neighbour resampling to ``round(2 * seconds)`` steps at 2 Hz, placed from bin 0.

Long audio, as upstream: ``ChunkEvents(max_duration=60, min_duration=30)`` cuts the audio event at
60 s, 120 s, ... unless a piece would be shorter than 30 s (``binning.audio_chunks``: 100 s -> 60 + 40,
80 s -> one piece, 130 s -> 60 + 70); each piece is read on its own (``round(offset * rate)`` samples
from ``round(start * rate)``), z-scored and encoded separately, resized to ``round(2 * duration)``
steps (nearest) and placed on each 100 s segment's grid from its own start (``binning.place_frames``).
``chunk_features`` does that; ``features`` puts the pieces on one grid from t = 0.

Production loads ``facebook/w2v-bert-2.0`` from the hub. The embedded default (``None`` or
``"embedded:small"``) builds a small Wav2Vec2-BERT from a config with seeded random weights and a
``SeamlessM4TFeatureExtractor`` constructed in code, so it runs offline on a CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from math import gcd
from typing import Any

import numpy as np

from reward_workers.binning import audio_chunks, layer_group_bounds, nearest_indices, place_frames

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


@functools.lru_cache(maxsize=8)
def sinc_kernels(old: int, new: int, zeros: int = 24, rolloff: float = 0.945) -> tuple[Any, int]:
    """``(new, 1, 2 * width + old)`` float32 filters and ``width`` for ``old -> new`` (rates divided by their gcd).

    Output sample ``i`` of each block of ``new`` interpolates the input with a sinc low-pass at
    ``rolloff * min(old, new) / 2`` (in units of the reduced rates), Hann-windowed over ``zeros``
    zero crossings and normalised to unit sum: the bandlimited interpolation of J. O. Smith, as
    ``julius.ResampleFrac`` builds it, so the waveform upstream encodes is reproduced to float round-off.
    """
    import torch

    cutoff = min(new, old) * rolloff
    width = math.ceil(zeros * old / cutoff)
    taps = torch.arange(-width, width + old).float()
    rows = []
    for i in range(new):
        t = ((-i / new + taps / old) * cutoff).clamp(-zeros, zeros) * math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
        kernel = sinc * torch.cos(t / zeros / 2) ** 2
        rows.append(kernel / kernel.sum())
    return torch.stack(rows).view(new, 1, -1), width


def resample_sinc(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``(n,)`` at ``rate`` -> ``(floor(n * target / rate),)`` float32 at ``target``, edges padded by replication."""
    import torch
    import torch.nn.functional as F

    g = gcd(rate, target)
    old, new = rate // g, target // g
    kernels, width = sinc_kernels(old, new)
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32)).view(1, 1, -1)
    x = F.pad(x, (width, width + old), mode="replicate")
    y = F.conv1d(x, kernels, stride=old).transpose(1, 2).reshape(-1)  # (blocks, new) interleaved
    return y[: math.floor(new * len(wav) / old)].numpy()


def resample_to(wav: np.ndarray, rate: int, target: int = MODEL_RATE) -> np.ndarray:
    """Resample between integer rates as upstream (``resample_sinc``; upstream also requires integer rates)."""
    if int(rate) != rate or rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {rate}")
    rate = int(rate)
    if rate == target:
        return wav
    return resample_sinc(wav, rate, target)


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

    def frames(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """``(G, D, T)`` float32 group-mean hidden states at the model's ~50 Hz frame rate, in one piece."""
        return self._encode(resample_to(to_mono(waveform), sample_rate))

    def chunk_features(self, waveform: np.ndarray, sample_rate: int,
                       chunks: list[tuple[float, float]] | None = None) -> list[tuple[float, np.ndarray]]:
        """``[(piece start s, (G, D, round(hz * piece duration)) float32)]``, one entry per upstream piece."""
        wav = to_mono(waveform)
        seconds = len(wav) / float(sample_rate)
        if chunks is None:
            chunks = audio_chunks(seconds, sample_rate)
        out = []
        for start, duration in chunks:
            first, count = round(start * sample_rate), round(duration * sample_rate)
            frames = self._encode(resample_to(wav[first : first + count], sample_rate))
            n = round(duration * self.hz)  # upstream: Frequency(2).to_ind(event.duration)
            if frames.shape[-1] != n:
                frames = frames[..., nearest_indices(frames.shape[-1], n)]  # F.interpolate(..., mode="nearest")
            out.append((start, frames))
        return out

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
        """``(G, D, n_bins)`` float32 features on the 2 Hz grid that starts with the audio (t = 0)."""
        out = np.zeros((*self.feature_dims, n_bins), dtype=np.float32)
        for start, frames in self.chunk_features(waveform, sample_rate):
            out += place_frames(frames, start, 0.0, n_bins, self.hz)
        return out

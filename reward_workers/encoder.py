"""TRIBE v2's fMRI encoder (``FmriEncoder``) in plain torch.

The official model is ``tribev2.model.FmriEncoderModel`` built through ``neuraltrain==0.0.2`` around an
``x-transformers==1.27.20`` ``Encoder``. Those packages pin old torch versions and pull heavy
dependencies, so brainloop re-implements the same function here and loads the official state dict
*strictly* (same key names and shapes, so a released ``best.ckpt`` loads as is). Parity with the official
code is proven by ``shared/fixtures/tribe_encoder_parity`` (tests/test_encoder.py).

What the official model computes, for each modality ``m`` present in the batch (``x_m``: B, L, D, T):

1. layer aggregation: ``cat`` flattens (L, D) -> L*D (``mean`` averages over L), time moves last -> (B, T, L*D);
2. projector: one ``nn.Linear`` to ``hidden // n_modalities`` (``extractor_aggregation="cat"``) or ``hidden``
   (``"sum"``). A modality missing from the batch is replaced by zeros *after* its projector (so its bias is
   not added);
3. modalities are concatenated along features in ``feature_dims`` order (or summed);
4. optional depthwise temporal smoothing; then, unless ``linear_baseline``: combiner (``nn.Linear`` or
   identity when ``combiner: null``), plus the learned ``time_pos_embed[:, :T]``, then the transformer;
5. transformer (x-transformers ``Encoder`` semantics): pre-norm blocks alternating attention and
   feed-forward. Each block: ``x = branch(norm(x)) + x * residual_scale`` (``scale_residual`` scales the
   *skip* path, not the branch). Norm: ScaleNorm ``x / max(||x||, 1e-12) * sqrt(dim) * g`` with one scalar g.
   Attention: bias-free q/k/v/out projections, ``dim_head = hidden // heads``, scores scaled by
   ``dim_head ** -0.5``, softmax in float32, rotary position embedding on the first ``rotary_dim`` channels of
   each head of q and k (``rotary_dim = max(dim_head // 2, 32)``, ``inv_freq = 10000 ** (-arange(0, r, 2) / r)``,
   angles ``pos * inv_freq`` repeated twice, "rotate-half" pairing channel i with i + r/2). Feed-forward:
   Linear(dim, 4 dim) -> exact GELU -> Linear(4 dim, dim), with biases. A final norm closes the stack;
6. optional bias-free low-rank head ``Linear(hidden, low_rank_head)``;
7. average-subject predictor (neuraltrain ``SubjectLayers`` with ``average_subjects``): the shared
   "dropout subject" row ``weights[n_subjects]`` (in, n_outputs) and ``bias[n_subjects]``;
8. adaptive average pooling over time to ``n_output_timesteps`` (skipped with ``pool_outputs=False``).

Output: (B, n_outputs, T_out); for TRIBE, n_outputs = 20484 fsaverage5 vertices (left hemisphere first).
The module is inference-only: training-time regularisers of the official model (modality/temporal/subject
dropout, attention dropout) are accepted in the config but have no effect here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_VERTICES = 20484  # fsaverage5, both hemispheres

# Defaults of ``neuraltrain.models.transformer.TransformerEncoder`` (neuraltrain 0.0.2). The FmriEncoder
# overwrites the three dropout keys with its own ``dropout`` (default 0) before building.
ENCODER_DEFAULTS: dict[str, Any] = {
    "heads": 8,
    "depth": 12,
    "cross_attend": False,
    "causal": False,
    "attn_flash": False,
    "attn_dropout": 0.1,
    "ff_mult": 4,
    "ff_dropout": 0.0,
    "use_scalenorm": True,
    "use_rmsnorm": False,
    "rel_pos_bias": False,
    "alibi_pos_bias": False,
    "rotary_pos_emb": True,
    "rotary_xpos": False,
    "residual_attn": False,
    "scale_residual": True,
    "layer_dropout": 0.0,
}
# Options whose non-default values change the function and are not implemented here.
_UNSUPPORTED_ENCODER_OPTIONS = ("cross_attend", "rel_pos_bias", "alibi_pos_bias", "rotary_xpos", "residual_attn")

# Defaults of the official ``FmriEncoder`` config when a key is absent (DESIGN.md §2).
BRAIN_MODEL_DEFAULTS: dict[str, Any] = {
    "hidden": 256,
    "max_seq_len": 1024,
    "time_pos_embedding": True,
    "low_rank_head": None,
    "dropout": 0.0,
    "extractor_aggregation": "cat",
    "layer_aggregation": "cat",
    "linear_baseline": False,
    "temporal_smoothing": None,
    "subject_embedding": False,
    "modality_dropout": 0.0,
    "temporal_dropout": 0.0,
}
_BRAIN_MODEL_KEYS = set(BRAIN_MODEL_DEFAULTS) | {"name", "projector", "combiner", "encoder", "subject_layers"}
_MLP_KEYS = {"name", "input_size", "hidden_sizes", "norm_layer", "activation_layer", "bias", "dropout"}
_SUBJECT_LAYER_KEYS = {"name", "n_subjects", "bias", "init_id", "mode", "subject_dropout", "average_subjects"}
_SMOOTHING_KEYS = {"name", "kernel_size", "sigma"}


class EncoderConfigError(ValueError):
    """The config asks for something the official FmriEncoder cannot be, or this module does not support."""


class EncoderLoadError(ValueError):
    """The weights do not match the architecture built from the config (strict loading)."""


# ----------------------------------------------------------------------------------------------------------
# Config resolution: one frozen record with every architectural choice, so the module never reads raw dicts.


@dataclass(frozen=True)
class EncoderSpec:
    """Every architectural choice of one FmriEncoder, resolved from a config dict."""

    feature_dims: tuple[tuple[str, int, int], ...]  # (modality, layer groups, dim), concatenation order
    n_outputs: int
    n_output_timesteps: int
    hidden: int
    max_seq_len: int
    time_pos_embedding: bool
    low_rank_head: int | None
    layer_aggregation: str  # "cat" | "mean"
    extractor_aggregation: str  # "cat" | "sum"
    projector_bias: bool
    combiner: bool  # a Linear combiner (True) or identity (False)
    combiner_bias: bool
    linear_baseline: bool
    smoothing_kernel: int | None
    smoothing_sigma: float | None
    heads: int
    depth: int
    ff_mult: int
    norm: str  # "scale" | "rms" | "layer"
    rotary: bool
    rotary_dim: int
    scale_residual: bool
    causal: bool
    n_subjects: int
    subject_bias: bool

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.feature_dims)

    @property
    def projector_out(self) -> int:
        if self.extractor_aggregation == "cat":
            return self.hidden // len(self.feature_dims)
        return self.hidden

    @property
    def dim_head(self) -> int:
        return self.hidden // self.heads


def _check_keys(section: str, given: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise EncoderConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(allowed)}")


def _resolve_mlp(section: str, cfg: Any) -> tuple[bool, bool]:
    """(present, bias) of a neuraltrain ``Mlp`` with no hidden layer, i.e. one ``nn.Linear``."""
    if cfg is None:
        return False, False
    if not isinstance(cfg, Mapping):
        raise EncoderConfigError(f"{section} must be a mapping (an Mlp config) or null, got {cfg!r}")
    _check_keys(section, cfg, _MLP_KEYS)
    if cfg.get("name", "Mlp") != "Mlp":
        raise EncoderConfigError(f"{section}: only an Mlp is supported, got name={cfg['name']!r}")
    if cfg.get("hidden_sizes"):
        # torchvision MLP with hidden layers: never used by the released TRIBE v2 and not implemented.
        raise EncoderConfigError(f"{section}: hidden_sizes={cfg['hidden_sizes']} (an MLP with hidden layers) "
                                 "is not supported; only the single-Linear form is")
    return True, bool(cfg.get("bias", True))


def _resolve_encoder_kwargs(bmc: Mapping[str, Any], resolved: Mapping[str, Any] | None) -> dict[str, Any]:
    enc = bmc.get("encoder", {})
    if enc is None:
        raise EncoderConfigError("brain_model_config.encoder: null (no transformer) is not supported")
    _check_keys("brain_model_config.encoder", enc, set(ENCODER_DEFAULTS) | {"name"})
    if enc.get("name", "TransformerEncoder") != "TransformerEncoder":
        raise EncoderConfigError(f"brain_model_config.encoder: name {enc['name']!r} is not TransformerEncoder")
    kwargs = {**ENCODER_DEFAULTS, **{k: v for k, v in enc.items() if k != "name"}}
    # FmriEncoder.model_post_init: the encoder's dropouts follow the brain model's ``dropout``.
    dropout = bmc.get("dropout", BRAIN_MODEL_DEFAULTS["dropout"])
    for key in ("attn_dropout", "ff_dropout", "layer_dropout"):
        kwargs[key] = dropout
    if resolved is not None:
        # A config that records the kwargs actually given to x-transformers must agree with ours.
        for key, value in resolved.items():
            if key != "name" and key in kwargs and kwargs[key] != value:
                raise EncoderConfigError(f"resolved_encoder_kwargs[{key!r}] = {value!r} but the "
                                         f"brain_model_config resolves to {kwargs[key]!r}")
    return kwargs


def _resolve_subject_layers(cfg: Mapping[str, Any], bmc: Mapping[str, Any]) -> tuple[int, bool]:
    """(n_subjects, bias) of the average-subject predictor."""
    if "subject_layers" in cfg:
        sl = dict(cfg["subject_layers"])
    else:
        # TribeModel.from_pretrained sets average_subjects=True and n_subjects=0 on brain_model_config's own
        # subject_layers (neuraltrain defaults otherwise).
        base = bmc.get("subject_layers", {})
        if base is None:
            raise EncoderConfigError("brain_model_config.subject_layers is null; the FmriEncoder needs one")
        sl = {"n_subjects": 0, "bias": True, "subject_dropout": None, **dict(base), "average_subjects": True}
        sl["n_subjects"] = 0
    _check_keys("subject_layers", sl, _SUBJECT_LAYER_KEYS)
    if not sl.get("average_subjects", False):
        raise EncoderConfigError("subject_layers.average_subjects must be true: brainloop predicts the "
                                 "average subject and passes no subject ids")
    if not sl.get("subject_dropout"):
        raise EncoderConfigError("subject_layers.average_subjects needs subject_dropout set (the averaged "
                                 "weights are the extra 'dropout subject' row)")
    return int(sl.get("n_subjects", 200)), bool(sl.get("bias", True))


def resolve_config(config: Mapping[str, Any] | str | Path) -> EncoderSpec:
    """Resolve a config in the fixture's ``config.json`` format (or a path to one) into an ``EncoderSpec``.

    Top-level keys used: ``brain_model_config``, ``feature_dims`` ({modality: [layer_groups, dim]}, order =
    concatenation order), ``n_outputs``, ``n_output_timesteps``, optional ``subject_layers`` (resolved) and
    ``resolved_encoder_kwargs`` (cross-checked). Other top-level keys are metadata and ignored.
    """
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    for key in ("brain_model_config", "feature_dims", "n_outputs", "n_output_timesteps"):
        if key not in config:
            raise EncoderConfigError(f"config lacks {key!r}")
    bmc = dict(config["brain_model_config"])
    _check_keys("brain_model_config", bmc, _BRAIN_MODEL_KEYS)
    if bmc.get("name", "FmriEncoder") != "FmriEncoder":
        raise EncoderConfigError(f"brain_model_config.name is {bmc['name']!r}, not FmriEncoder")
    opts = {**BRAIN_MODEL_DEFAULTS, **bmc}
    if opts["subject_embedding"]:
        raise EncoderConfigError("subject_embedding=true needs subject ids; not supported")

    dims = []
    for name, tup in config["feature_dims"].items():
        if tup is None:
            raise EncoderConfigError(f"feature_dims[{name!r}] is null (a modality without a projector); "
                                     "not supported")
        n_layers, dim = (int(v) for v in tup)
        dims.append((str(name), n_layers, dim))
    if not dims:
        raise EncoderConfigError("feature_dims is empty")

    hidden = int(opts["hidden"])
    if opts["layer_aggregation"] not in ("cat", "mean"):
        raise EncoderConfigError(f"layer_aggregation {opts['layer_aggregation']!r} not in ('cat', 'mean')")
    if opts["extractor_aggregation"] not in ("cat", "sum"):
        raise EncoderConfigError(f"extractor_aggregation {opts['extractor_aggregation']!r} is not supported "
                                 "(only 'cat' and 'sum')")
    projector, projector_bias = _resolve_mlp("brain_model_config.projector", bmc.get("projector", {}))
    if not projector:
        raise EncoderConfigError("brain_model_config.projector: null is not a valid projector")
    combiner, combiner_bias = _resolve_mlp("brain_model_config.combiner", bmc.get("combiner", {}))
    if opts["extractor_aggregation"] == "cat" and not combiner and hidden % len(dims):
        raise EncoderConfigError(f"hidden ({hidden}) must be divisible by the number of modalities "
                                 f"({len(dims)}) when there is no combiner")

    smoothing = opts["temporal_smoothing"]
    kernel = sigma = None
    if smoothing is not None:
        _check_keys("brain_model_config.temporal_smoothing", smoothing, _SMOOTHING_KEYS)
        kernel = int(smoothing.get("kernel_size", 9))
        sigma = smoothing.get("sigma")

    enc = _resolve_encoder_kwargs(bmc, config.get("resolved_encoder_kwargs"))
    for key in _UNSUPPORTED_ENCODER_OPTIONS:
        if enc[key]:
            raise EncoderConfigError(f"encoder option {key}=True is not supported")
    heads = int(enc["heads"])
    if hidden % heads:
        raise EncoderConfigError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    dim_head = hidden // heads
    # x-transformers: rotary_emb_dim = max(dim_head // 2, 32); neuraltrain refuses dim_head < 32.
    rotary_dim = max(dim_head // 2, 32)
    if enc["rotary_pos_emb"] and dim_head < 32:
        raise EncoderConfigError(f"dim_head = hidden // heads = {dim_head} < 32: x-transformers clamps the "
                                 "rotary dimension to 32 (neuraltrain refuses this config)")
    if enc["use_scalenorm"] and enc["use_rmsnorm"]:
        raise EncoderConfigError("use_scalenorm and use_rmsnorm are exclusive")
    norm = "scale" if enc["use_scalenorm"] else "rms" if enc["use_rmsnorm"] else "layer"

    n_subjects, subject_bias = _resolve_subject_layers(config, bmc)
    low_rank = opts["low_rank_head"]
    return EncoderSpec(
        feature_dims=tuple(dims),
        n_outputs=int(config["n_outputs"]),
        n_output_timesteps=int(config["n_output_timesteps"]),
        hidden=hidden,
        max_seq_len=int(opts["max_seq_len"]),
        time_pos_embedding=bool(opts["time_pos_embedding"]),
        low_rank_head=None if low_rank is None else int(low_rank),
        layer_aggregation=opts["layer_aggregation"],
        extractor_aggregation=opts["extractor_aggregation"],
        projector_bias=projector_bias,
        combiner=combiner,
        combiner_bias=combiner_bias,
        linear_baseline=bool(opts["linear_baseline"]),
        smoothing_kernel=kernel,
        smoothing_sigma=None if sigma is None else float(sigma),
        heads=heads,
        depth=int(enc["depth"]),
        ff_mult=int(enc["ff_mult"]),
        norm=norm,
        rotary=bool(enc["rotary_pos_emb"]),
        rotary_dim=rotary_dim,
        scale_residual=bool(enc["scale_residual"]),
        causal=bool(enc["causal"]),
        n_subjects=n_subjects,
        subject_bias=subject_bias,
    )


# ----------------------------------------------------------------------------------------------------------
# Pure math (unit-tested on hand-computed cases).


def scale_norm(x: Tensor, g: Tensor) -> Tensor:
    """ScaleNorm: ``x / max(||x||_2, 1e-12) * sqrt(dim) * g`` over the last axis (g: one scalar or per-dim)."""
    return F.normalize(x, dim=-1) * (x.shape[-1] ** 0.5) * g


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0) -> Tensor:
    """Inverse frequencies ``base ** (-2i / rotary_dim)`` for i < rotary_dim / 2 (x-transformers' layout)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rotary_angles(seq_len: int, inv_freq: Tensor) -> Tensor:
    """(seq_len, 2 * len(inv_freq)) angles ``pos * inv_freq``, the half repeated twice (rotate-half layout)."""
    pos = torch.arange(seq_len, device=inv_freq.device).to(inv_freq.dtype)
    angles = torch.outer(pos, inv_freq)
    return torch.cat((angles, angles), dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) for the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` channels of ``x`` (..., T, d); the rest pass through unchanged."""
    rot = angles.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    head = head * angles.cos() + rotate_half(head) * angles.sin()
    return torch.cat((head, tail), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Modules. Attribute names follow the official state-dict layout so checkpoints load strictly.


class _ScaleNorm(nn.Module):
    def __init__(self, per_dim: int | None = None) -> None:
        super().__init__()
        # ScaleNorm has one gain; RMSNorm (per_dim) one per channel — same formula otherwise.
        self.g = nn.Parameter(torch.ones(per_dim or 1))

    def forward(self, x: Tensor) -> Tensor:
        return scale_norm(x, self.g)


def _make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "scale":
        return _ScaleNorm()
    if kind == "rms":
        return _ScaleNorm(per_dim=dim)
    return nn.LayerNorm(dim, bias=False)  # x-transformers' LayerNorm on torch >= 2.1


class _Rotary(nn.Module):
    def __init__(self, rotary_dim: int) -> None:
        super().__init__()
        # Persistent buffer: official checkpoints carry it (and it is loaded from them).
        self.register_buffer("inv_freq", rotary_inv_freq(rotary_dim))

    def forward(self, seq_len: int) -> Tensor:
        return rotary_angles(seq_len, self.inv_freq)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, angles: Tensor | None) -> Tensor:
        b, t, _ = x.shape

        def split(z: Tensor) -> Tensor:  # (B, T, H*d) -> (B, H, T, d)
            return z.view(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        # Default SDPA scale is dim_head ** -0.5, as x-transformers' Attention.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        inner = dim * mult
        # Index layout (0: Linear+GELU, 1: dropout slot, 2: Linear) gives the official key names ff.0.0 / ff.2.
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Identity(),
                                nn.Linear(inner, dim))

    def forward(self, x: Tensor, angles: Tensor | None = None) -> Tensor:
        return self.ff(x)


class _Residual(nn.Module):
    def __init__(self, dim: int, scale: bool) -> None:
        super().__init__()
        self.residual_scale = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, branch: Tensor, skip: Tensor) -> Tensor:
        if self.residual_scale is not None:
            skip = skip * self.residual_scale
        return branch + skip


class _Transformer(nn.Module):
    """Pre-norm stack of (attention, feed-forward) blocks with rotary positions and a final norm."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        dim = spec.hidden
        self.layers = nn.ModuleList()
        for _ in range(spec.depth):
            for branch in (_SelfAttention(dim, spec.heads, spec.causal), _FeedForward(dim, spec.ff_mult)):
                # [norms, branch, residual]; norms holds only the pre-branch norm (key "<i>.0.0.g").
                norms = nn.ModuleList([_make_norm(spec.norm, dim)])
                self.layers.append(nn.ModuleList([norms, branch, _Residual(dim, spec.scale_residual)]))
        self.rotary_pos_emb = _Rotary(spec.rotary_dim) if spec.rotary else None
        self.final_norm = _make_norm(spec.norm, dim)

    def forward(self, x: Tensor) -> Tensor:
        angles = self.rotary_pos_emb(x.shape[1]) if self.rotary_pos_emb is not None else None
        for norms, branch, residual in self.layers:
            x = residual(branch(norms[0](x), angles), x)
        return self.final_norm(x)


class _AverageSubjectLinear(nn.Module):
    """neuraltrain ``SubjectLayers`` in average-subject mode: the shared 'dropout subject' row."""

    def __init__(self, in_dim: int, out_dim: int, n_subjects: int, bias: bool) -> None:
        super().__init__()
        self.n_subjects = n_subjects
        rows = n_subjects + 1  # + the dropout-subject row (subject_dropout is required)
        self.weights = nn.Parameter(torch.randn(rows, in_dim, out_dim) / in_dim**0.5)
        self.bias = nn.Parameter(torch.randn(rows, out_dim) / in_dim**0.5) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, O, T)
        out = torch.einsum("btc,co->bot", x, self.weights[self.n_subjects])
        if self.bias is not None:
            out = out + self.bias[self.n_subjects][None, :, None]
        return out


class FmriEncoder(nn.Module):
    """TRIBE v2's FmriEncoder (average subject, inference). Build with ``load_fmri_encoder``."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_outputs = spec.n_outputs
        self.n_output_timesteps = spec.n_output_timesteps
        self.projectors = nn.ModuleDict()
        for name, n_layers, dim in spec.feature_dims:
            in_dim = n_layers * dim if spec.layer_aggregation == "cat" else dim
            self.projectors[name] = nn.Linear(in_dim, spec.projector_out, bias=spec.projector_bias)
        cat_dim = spec.projector_out * len(spec.feature_dims) if spec.extractor_aggregation == "cat" else spec.hidden
        self.combiner = nn.Linear(cat_dim, spec.hidden, bias=spec.combiner_bias) if spec.combiner else nn.Identity()
        if spec.low_rank_head is not None:
            self.low_rank_head = nn.Linear(spec.hidden, spec.low_rank_head, bias=False)
        bottleneck = spec.low_rank_head or spec.hidden
        self.predictor = _AverageSubjectLinear(bottleneck, spec.n_outputs, spec.n_subjects, spec.subject_bias)
        if spec.smoothing_kernel is not None:
            k = spec.smoothing_kernel
            self.temporal_smoothing = nn.Conv1d(spec.hidden, spec.hidden, k, padding=k // 2, bias=False,
                                                groups=spec.hidden)
            if spec.smoothing_sigma is not None:
                x = torch.arange(k, dtype=torch.float32) - k // 2
                kernel = torch.exp(-0.5 * (x / spec.smoothing_sigma) ** 2)
                self.temporal_smoothing.weight.data[:] = (kernel / kernel.sum()).view(1, 1, -1)
        if not spec.linear_baseline:
            if spec.time_pos_embedding:
                self.time_pos_embed = nn.Parameter(torch.randn(1, spec.max_seq_len, spec.hidden))
            self.encoder = _Transformer(spec)

    def _aggregate(self, features: Mapping[str, Tensor]) -> Tensor:
        """Project each present modality; zero-fill missing ones after their projector; (B, T, H)."""
        spec = self.spec
        unknown = sorted(set(features) - set(spec.modalities))
        if unknown:
            raise ValueError(f"unknown modality key(s) {unknown}; this encoder knows {list(spec.modalities)}")
        present = [name for name in spec.modalities if name in features]
        if not present:
            raise ValueError(f"no modality given; expected some of {list(spec.modalities)}")
        ref = features[present[0]]
        b, t = ref.shape[0], ref.shape[-1]
        device = self.predictor.weights.device
        parts = []
        for name, n_layers, dim in spec.feature_dims:
            if name not in features:
                parts.append(torch.zeros(b, t, spec.projector_out, device=device, dtype=torch.float32))
                continue
            x = features[name].to(device=device, dtype=torch.float32)
            if x.ndim == 3:  # (B, D, T): one layer group, as upstream accepts
                x = x.unsqueeze(1)
            if x.ndim != 4 or tuple(x.shape) != (b, n_layers, dim, t):
                raise ValueError(f"features[{name!r}] has shape {tuple(features[name].shape)}; expected "
                                 f"(B={b}, L={n_layers}, D={dim}, T={t})")
            x = x.flatten(1, 2) if spec.layer_aggregation == "cat" else x.mean(dim=1)
            parts.append(self.projectors[name](x.transpose(1, 2)))
        return torch.cat(parts, dim=-1) if spec.extractor_aggregation == "cat" else torch.stack(parts).sum(0)

    def forward(self, features: Mapping[str, Tensor], pool_outputs: bool = True) -> Tensor:
        """``features[m]``: (B, L, D, T) per present modality -> (B, n_outputs, T_out)."""
        x = self._aggregate(features)
        if hasattr(self, "temporal_smoothing"):
            x = self.temporal_smoothing(x.transpose(1, 2)).transpose(1, 2)
        if not self.spec.linear_baseline:
            x = self.combiner(x)
            if hasattr(self, "time_pos_embed"):
                if x.shape[1] > self.time_pos_embed.shape[1]:
                    raise ValueError(f"{x.shape[1]} time steps exceed max_seq_len "
                                     f"{self.time_pos_embed.shape[1]}; split the input into segments")
                x = x + self.time_pos_embed[:, : x.shape[1]]
            x = self.encoder(x)
        if hasattr(self, "low_rank_head"):
            x = self.low_rank_head(x)
        out = self.predictor(x)  # (B, O, T)
        return F.adaptive_avg_pool1d(out, self.n_output_timesteps) if pool_outputs else out


# ----------------------------------------------------------------------------------------------------------
# Loading.


def build_fmri_encoder(config: Mapping[str, Any] | str | Path, *, seed: int = 0,
                       device: str | torch.device | None = None) -> FmriEncoder:
    """Build the architecture with seeded random weights (official init scheme); the caller's RNG is untouched.

    ``device="meta"`` builds shapes only (no memory), e.g. to inspect the full-size key set.
    """
    spec = resolve_config(config)
    meta = torch.device(device or "cpu").type == "meta"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialise on the CPU (seeded CPU generator) so weights do not depend on the target device.
        with torch.device("meta" if meta else "cpu"):
            model = FmriEncoder(spec)
    if not meta and device is not None:
        model = model.to(device)
    return model.eval()


def _read_state_dict(weights: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """A safetensors file as is, or a Lightning checkpoint's ``state_dict`` without the ``model.`` prefix."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise EncoderLoadError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return state, ckpt.get("model_build_args")


def _check_build_args(spec: EncoderSpec, build_args: Mapping[str, Any]) -> None:
    """The checkpoint records how it was built; it must match the config (incl. modality order)."""
    ours = {"feature_dims": [[n, l_, d] for n, l_, d in spec.feature_dims], "n_outputs": spec.n_outputs,
            "n_output_timesteps": spec.n_output_timesteps}
    theirs: dict[str, Any] = {}
    if "feature_dims" in build_args:
        theirs["feature_dims"] = [[str(n), *(int(v) for v in tup)] for n, tup in build_args["feature_dims"].items()]
    for key in ("n_outputs", "n_output_timesteps"):
        if key in build_args:
            theirs[key] = int(build_args[key])
    for key, value in theirs.items():
        if ours[key] != value:
            raise EncoderLoadError(f"checkpoint model_build_args[{key!r}] = {value} but the config gives "
                                   f"{ours[key]}")


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor]) -> None:
    """Raise ``EncoderLoadError`` naming every missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing key(s): {missing}")
    if unexpected:
        problems.append(f"unexpected key(s): {unexpected}")
    if shapes:
        problems.append(f"shape mismatch: {shapes}")
    if problems:
        raise EncoderLoadError("encoder weights do not match the config; " + "; ".join(problems))


def load_fmri_encoder(config: Mapping[str, Any] | str | Path, weights: str | Path | None = None, *,
                      seed: int = 0, device: str | torch.device = "cpu") -> FmriEncoder:
    """Build the FmriEncoder from ``config`` and load ``weights`` strictly (eval mode, float32).

    ``weights``: a ``.safetensors`` state dict (official key names), or an official Lightning ``best.ckpt``
    (``state_dict`` with the ``model.`` prefix stripped; its ``model_build_args`` are checked against the
    config). ``None`` gives seeded random weights (``seed``), as the embedded default uses.
    """
    if weights is None:
        return build_fmri_encoder(config, seed=seed, device=device)
    state, build_args = _read_state_dict(weights)
    return encoder_from_state_dict(config, state, build_args, device=device)


def encoder_from_state_dict(config: Mapping[str, Any] | str | Path, state: Mapping[str, Tensor],
                            build_args: Mapping[str, Any] | None = None, *,
                            device: str | torch.device = "cpu") -> FmriEncoder:
    """Build the architecture of ``config`` and load ``state`` (official key names) strictly, eval mode."""
    model = build_fmri_encoder(config, device="meta")  # shapes only: no second copy of a 177 M model
    if build_args is not None:
        _check_build_args(model.spec, build_args)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    state = {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Embedded default and long inputs.


def embedded_encoder_config(feature_dims: Mapping[str, tuple[int, int]], hidden: int = 192, depth: int = 2,
                            heads: int = 3, low_rank_head: int | None = 64, n_output_timesteps: int = 100,
                            n_outputs: int = N_VERTICES, max_seq_len: int = 1024) -> dict[str, Any]:
    """A config (fixture ``config.json`` format) for a small FmriEncoder of the official layout.

    Defaults mirror the released model's choices (cat aggregation, no combiner, ScaleNorm + rotary +
    scale_residual, low-rank head, average subject) at a CPU-friendly size. ``hidden`` must split evenly
    across modalities and heads, with ``hidden // heads >= 32`` (the rotary constraint).
    """
    config = {
        "brain_model_config": {
            "name": "FmriEncoder",
            "hidden": hidden,
            "max_seq_len": max_seq_len,
            "low_rank_head": low_rank_head,
            "extractor_aggregation": "cat",
            "layer_aggregation": "cat",
            "combiner": None,
            "encoder": {"depth": depth, "heads": heads},
            "subject_layers": {"subject_dropout": 0.1},
            "subject_embedding": False,
        },
        "subject_layers": {"n_subjects": 0, "bias": True, "subject_dropout": 0.1, "average_subjects": True},
        "feature_dims": {name: [int(l_), int(d)] for name, (l_, d) in feature_dims.items()},
        "n_outputs": n_outputs,
        "n_output_timesteps": n_output_timesteps,
    }
    resolve_config(config)  # fail here, not at first use
    return config


def predict_segments(encoder: FmriEncoder, features: Mapping[str, Tensor | np.ndarray], input_hz: float = 2.0,
                     segment_seconds: float = 100.0, batch_size: int = 4) -> np.ndarray:
    """Predict a stimulus of any length at 1 Hz: (n_TR, n_outputs) float32, n_TR = ceil(T_in / input_hz).

    Features on one grid from t = 0. The reward pipeline instead bins each upstream segment on its own
    grid from the segment's own start and keeps upstream's TRs (``predict_segment_batch``).

    ``features[m]``: (L, D, T_in) at ``input_hz``. The input is cut into back-to-back segments of
    ``segment_seconds`` (200 steps -> 100 outputs by default); the last, partial segment is zero-padded to
    full length and the output trimmed to the stimulus length. This is what upstream does: neuralset's
    ``list_segments(stride=duration, stride_drop_incomplete=False)`` makes ``ceil(span / stride)`` full-length
    windows, the last one running past the stimulus end where the feature extractors yield zeros (no events);
    ``TribeModel.predict`` then splits each window into 1-TR pieces and, with ``remove_empty_segments``, drops
    the TRs past the end (no events there). A modality missing from ``features`` is zero-filled after its
    projector, as in ``forward``.
    """
    steps_f = segment_seconds * input_hz
    steps = round(steps_f)
    n_out = round(segment_seconds)  # 1 Hz output
    if abs(steps_f - steps) > 1e-9 or abs(segment_seconds - n_out) > 1e-9 or steps <= 0:
        raise ValueError(f"segment_seconds={segment_seconds} at input_hz={input_hz} must give whole input steps "
                         "and whole seconds")
    if encoder.n_output_timesteps != n_out:
        raise ValueError(f"encoder pools to {encoder.n_output_timesteps} steps per segment but a "
                         f"{segment_seconds} s segment at 1 Hz needs {n_out}")
    if not features:
        raise ValueError("no features given")
    tensors = {name: torch.as_tensor(x, dtype=torch.float32) for name, x in features.items()}
    lengths = {name: x.shape[-1] for name, x in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"modalities differ in length: {lengths}")
    t_in = next(iter(lengths.values()))
    if t_in == 0:
        raise ValueError("empty input (0 time steps)")
    n_tr = math.ceil(t_in / input_hz - 1e-9)
    n_seg = math.ceil(t_in / steps)
    segmented = {}
    for name, x in tensors.items():
        if x.ndim != 3:
            raise ValueError(f"features[{name!r}] must be (L, D, T), got shape {tuple(x.shape)}")
        x = F.pad(x, (0, n_seg * steps - t_in))  # zeros past the stimulus end, as upstream's extractors
        segmented[name] = x.unflatten(-1, (n_seg, steps)).permute(2, 0, 1, 3)  # (n_seg, L, D, steps)
    outs = []
    with torch.inference_mode():
        for start in range(0, n_seg, batch_size):
            batch = {name: x[start : start + batch_size] for name, x in segmented.items()}
            outs.append(encoder(batch, pool_outputs=True).transpose(1, 2).flatten(0, 1))  # (b * n_out, O)
    return torch.cat(outs)[:n_tr].cpu().numpy().astype(np.float32, copy=False)


def predict_segment_batch(encoder: FmriEncoder, segments: Mapping[str, Tensor | np.ndarray],
                          kept_trs: list[int] | tuple[int, ...], batch_size: int = 4) -> np.ndarray:
    """Rows of ``TribeModel.predict``: ``segments[m]`` is (n_seg, L, D, T_seg) per present modality.

    Each segment is predicted on its own (pooled to the encoder's output steps) and its first
    ``kept_trs[k]`` rows are kept, concatenated in segment order -> (sum(kept_trs), n_outputs) float32.
    """
    tensors = {name: torch.as_tensor(x, dtype=torch.float32) for name, x in segments.items()}
    counts = {x.shape[0] for x in tensors.values()}
    if len(counts) != 1 or counts.pop() != len(kept_trs):
        raise ValueError(f"segment counts {[x.shape[0] for x in tensors.values()]} vs {len(kept_trs)} kept lists")
    if any(k > encoder.n_output_timesteps or k < 0 for k in kept_trs):
        raise ValueError(f"kept TRs {kept_trs} exceed {encoder.n_output_timesteps} outputs per segment")
    rows = []
    with torch.inference_mode():
        for start in range(0, len(kept_trs), batch_size):
            batch = {name: x[start : start + batch_size] for name, x in tensors.items()}
            out = encoder(batch, pool_outputs=True).transpose(1, 2)  # (b, n_out, O)
            for j in range(out.shape[0]):
                rows.append(out[j, : kept_trs[start + j]])
    if not rows:
        raise ValueError("no segments")
    return torch.cat(rows).cpu().numpy().astype(np.float32, copy=False)

"""LoRA adapters merged into the base weights: the sampler's CPU path with no LoRA ops at all.

A LoRA adapter changes a linear layer's weight from ``W`` to ``W + scale * B @ A``. vLLM serves
adapters with extra ops on every adapted projection of every token step; on CPU, even with the
grouped ops (``actors.vllm_cpu_lora``), that costs about a third more than the base model's
sampling (SmolLM2-135M, rank 16 on q/k/v/o: 18.3 s vs 13.6 s for 8 x 64 tokens, one thread), and an
engine built with LoRA enabled pays most of it even for the base model. The sampler runs one
adapter version per call, so it can instead write ``W + scale * B @ A`` into the engine's linear
layers when the version changes (0.15 s for SmolLM2-135M) and sample with plain matmuls. TRL's
vLLM path does the same (it merges the adapter and loads the merged weights into vLLM).

The math is the adapter's, evaluated in a different order: ``x @ (W + s B A).T`` instead of
``x @ W.T + s (x @ A.T) @ B.T``; float32 rounding differs (log-probs within ~1e-4, the same samples
in tests/test_sampler.py). In bfloat16 or float16 the sum ``W + s B A`` would round away most of a
young adapter's update (a relative change of ~1e-3 against bf16's 4e-3 spacing), so merging is
refused for any dtype but float32.

This module is pure torch and safetensors (no vLLM): reading PEFT adapter files, the merged and
packed weights. ``actors.engines.VllmEngine`` puts them into the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."  # PEFT's prefix of module names in a saved adapter
# adapter_config.json features a merge cannot reproduce (or that this code does not implement):
# refused with a clear error rather than merged wrongly.
UNSUPPORTED_FEATURES = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, [], ()),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None, [], ()),
    "trainable_token_indices": (None, [], {}),
}


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's factors per adapted module: ``factors[module] = (A (r, in), B (out, r))``;
    the module's weight becomes ``W + scale * B @ A``. Module names are the base model's
    (``model.layers.0.self_attn.q_proj``)."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float


def read_peft_adapter(directory: str | Path) -> LoraAdapter:
    """The factors and scale of a PEFT LoRA adapter directory (adapter_config.json and
    adapter_model.safetensors), with a clear error for anything a merge would get wrong."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key, allowed in UNSUPPORTED_FEATURES.items():
        if config.get(key) not in allowed:
            raise ValueError(f"{directory}: adapter_config.json sets {key}={config[key]!r}, which merged "
                             "adapters do not support (sampler.cpu_lora_ops: grouped serves it)")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{directory}: unexpected tensor {key!r} in a LoRA adapter")
            continue
        b_key = key[: -len(".lora_A.weight")] + ".lora_B.weight"
        if b_key not in tensors:
            raise ValueError(f"{directory}: {key} has no matching {b_key}")
        b = tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{directory}: {key} is {tuple(a.shape)} and its lora_B {tuple(b.shape)}; "
                             "expected (r, in) and (out, r) (a linear layer)")
        module = key[: -len(".lora_A.weight")]
        factors[module.removeprefix(PEFT_PREFIX)] = (a, b)
    if not factors:
        raise ValueError(f"{directory}: no LoRA factors in adapter_model.safetensors")
    return LoraAdapter(factors, scale)


def check_fits(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise a clear error unless ``weight + scale * b @ a`` can be formed in float32."""
    if weight.dtype != torch.float32:
        raise ValueError(f"merged adapters need float32 weights, got {weight.dtype}: in lower precision "
                         "W + BA rounds away small updates (use sampler.cpu_lora_ops: grouped)")
    if weight.shape != (b.shape[0], a.shape[1]):
        raise ValueError(f"adapter factors {tuple(b.shape)} @ {tuple(a.shape)} do not fit a weight of "
                         f"shape {tuple(weight.shape)}")


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale * b @ a`` in float32 (a new tensor; ``weight`` is left as it is)."""
    check_fits(weight, a, b)
    return torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=scale)


def engine_module(module: str, packed: Mapping[str, Sequence[str]]) -> tuple[str, int]:
    """Where a base model's linear module lives in an engine that packs some of them into one layer
    (vLLM: ``packed_modules_mapping``, e.g. ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``):
    (engine module name, index of its shard), shard 0 for a module that is not packed."""
    parent, _, leaf = module.rpartition(".")
    for packed_name, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{packed_name}" if parent else packed_name, list(parts).index(leaf)
    return module, 0


def engine_modules(modules: Sequence[str], packed: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The engine modules that hold ``modules``, each with the base model's modules of all its
    shards in order (a packed layer is rewritten whole, so every shard is needed)."""
    out: dict[str, list[str]] = {}
    for module in modules:
        name, _ = engine_module(module, packed)
        if name not in out:
            parent, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, [leaf])
            out[name] = [f"{parent}.{p}" if parent else p for p in parts]
    return out


def packed_weights(base: Mapping[str, torch.Tensor], adapter: LoraAdapter | None,
                   layout: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """Each engine module's full weight: its shards (``layout``, from ``engine_modules``) stacked
    along the output dimension, each the base weight plus the adapter's update where it has one.
    ``adapter=None``: the base model's weights."""
    factors = adapter.factors if adapter is not None else {}
    out = {}
    for name, parts in layout.items():
        shards = []
        for part in parts:
            if part in factors:
                a, b = factors[part]
                shards.append(merged_weight(base[part], a, b, adapter.scale))  # type: ignore[union-attr]
            else:
                shards.append(base[part])
        out[name] = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
    return out

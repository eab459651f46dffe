"""The grouped LoRA ops for vLLM-CPU (actors/vllm_cpu_lora.py) against vLLM's own torch ops.

vLLM 0.32's ``vllm.lora.ops.torch_ops`` are the oracle: same inputs, same output tensors, within
1e-6 relative (a GEMM per adapter instead of a per-token batched product changes summation order
only). The engine-level check (a real vLLM sampler under both ops) is in tests/test_sampler.py.
"""

from __future__ import annotations

import pytest
import torch

from actors import vllm_cpu_lora

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

TOKENS, IN, OUT, RANK, ADAPTERS = 7, 24, 40, 8, 3
INDEX_CASES = {
    "one adapter": [1] * TOKENS,
    "mixed": [0, 2, 2, 1, 0, 1, 2],
    "no adapter (-1) among others": [-1, 0, 0, -1, 2, 2, 1],
}


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().clamp_min(1e-12)
    assert float((ours - theirs).abs().max() / scale) <= 1e-6


def _tensors(seed: int, stacked: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(ADAPTERS, RANK, IN, generator=g)  # shrink weights: (adapters, rank, in)
    b = torch.randn(ADAPTERS, OUT, RANK, generator=g)  # expand weights: (adapters, out, rank)
    if stacked:  # vLLM's layout: (adapters, 1, out, in)
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    return {"x": torch.randn(TOKENS, IN, generator=g), "h": torch.randn(TOKENS, RANK, generator=g),
            "a": a, "b": b, "y": torch.randn(TOKENS, OUT + 4, generator=g)}


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bgmv_ops_match_vllm(case: str, stacked: bool) -> None:
    t = _tensors(0, stacked)
    idx = torch.tensor(INDEX_CASES[case])
    for scaling in (1.0, 0.5):
        ours, theirs = torch.zeros(TOKENS, RANK + 2), torch.zeros(TOKENS, RANK + 2)
        vllm_cpu_lora.bgmv_shrink(t["x"], t["a"], ours, idx, scaling)
        torch_ops.bgmv_shrink(t["x"], t["a"], theirs, idx, scaling)
        _close(ours, theirs)
    for add_inputs in (False, True):
        # the output is wider than the adapter's (padding rule: only the common columns change)
        ours, theirs = t["y"].clone(), t["y"].clone()
        vllm_cpu_lora.bgmv_expand(t["h"], t["b"], ours, idx, add_inputs)
        torch_ops.bgmv_expand(t["h"], t["b"], theirs, idx, add_inputs)
        _close(ours, theirs)
        assert torch.equal(ours[:, OUT:], t["y"][:, OUT:])
        ours, theirs = t["y"].clone(), t["y"].clone()
        vllm_cpu_lora.bgmv_expand_slice(t["h"], t["b"], ours, idx, 2, OUT, add_inputs)
        torch_ops.bgmv_expand_slice(t["h"], t["b"], theirs, idx, 2, OUT, add_inputs)
        _close(ours, theirs)


def test_broadcasts_like_vllms_einsum() -> None:
    """One index for many rows (LoRA logits of one request's prompt log-probs), one row for many indices."""
    t = _tensors(1, stacked=True)
    one = torch.tensor([2])
    ours, theirs = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    vllm_cpu_lora.bgmv_shrink(t["x"], t["a"], ours, one, 1.0)
    torch_ops.bgmv_shrink(t["x"], t["a"], theirs, one, 1.0)
    _close(ours, theirs)
    ours, theirs = t["y"].clone(), t["y"].clone()
    vllm_cpu_lora.bgmv_expand(t["h"], t["b"], ours, one, True)
    torch_ops.bgmv_expand(t["h"], t["b"], theirs, one, True)
    _close(ours, theirs)
    ours, theirs = t["y"].clone(), t["y"].clone()
    vllm_cpu_lora.bgmv_expand(t["h"][:1], t["b"], ours, one, True)
    torch_ops.bgmv_expand(t["h"][:1], t["b"], theirs, one, True)
    _close(ours, theirs)
    many = torch.tensor(INDEX_CASES["mixed"])
    ours, theirs = t["y"].clone(), t["y"].clone()
    vllm_cpu_lora.bgmv_expand(t["h"][:1], t["b"], ours, many, True)
    torch_ops.bgmv_expand(t["h"][:1], t["b"], theirs, many, True)
    _close(ours, theirs)


@pytest.mark.parametrize("per_sequence", [[2, -1, 0], [1, 1, 1]])
def test_sgmv_ops_match_vllm(per_sequence: list[int]) -> None:
    """Prefill form: one adapter index per sequence, expanded over the sequence's tokens."""
    t = _tensors(2, stacked=True)
    seq_lens = torch.tensor([3, 1, 3])
    seq_idx = torch.tensor(per_sequence)
    start = torch.tensor([0, 3, 4])
    meta = (start, seq_lens, seq_idx, 3, 3, TOKENS)
    ours, theirs = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    vllm_cpu_lora.sgmv_shrink(t["x"], t["a"], ours, *meta, 0.25)
    torch_ops.sgmv_shrink(t["x"], t["a"], theirs, *meta, 0.25)
    _close(ours, theirs)
    for add_inputs in (False, True):
        ours, theirs = t["y"].clone(), t["y"].clone()
        vllm_cpu_lora.sgmv_expand(t["h"], t["b"], ours, *meta, add_inputs)
        torch_ops.sgmv_expand(t["h"], t["b"], theirs, *meta, add_inputs)
        _close(ours, theirs)
        ours, theirs = t["y"].clone(), t["y"].clone()
        vllm_cpu_lora.sgmv_expand_slice(t["h"], t["b"], ours, *meta, 4, OUT, add_inputs)
        torch_ops.sgmv_expand_slice(t["h"], t["b"], theirs, *meta, 4, OUT, add_inputs)
        _close(ours, theirs)


def test_lora_matmul_refuses_mismatched_indices() -> None:
    t = _tensors(3, stacked=False)
    with pytest.raises(ValueError, match="adapter indices"):
        vllm_cpu_lora.lora_matmul(t["x"], t["a"], torch.tensor([0, 1, 2]), torch.float32)


def test_use_switches_the_cpu_wrapper_both_ways() -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    try:
        assert vllm_cpu_lora.use("grouped") is True
        assert punica_cpu.bgmv_shrink is vllm_cpu_lora.bgmv_shrink
        assert punica_cpu.sgmv_expand_slice is vllm_cpu_lora.sgmv_expand_slice
        assert vllm_cpu_lora.use("vllm") is False
        assert punica_cpu.bgmv_shrink is torch_ops.bgmv_shrink
        assert punica_cpu.sgmv_expand_slice is torch_ops.sgmv_expand_slice
        with pytest.raises(ValueError, match="grouped"):
            vllm_cpu_lora.use("fast")
    finally:
        vllm_cpu_lora.use("grouped")

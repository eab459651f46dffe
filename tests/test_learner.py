"""The learner's batching (micro-batches that mix groups give the gradient of one group at a time)
and its checkpoint state (adapter, optimizer, version, CPU and CUDA random generators)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from brainloop.config import load_config
from brainloop.threads import torch_threads
from brainloop.types import TrainGroup, TrainSample
from learner.learner import Learner

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"


def _groups() -> list[TrainGroup]:
    rng = random.Random(0)
    groups = []
    for g in range(2):  # prompts of different lengths; completions of different lengths
        prompt = [rng.randrange(1000, 30000) for _ in range(20 + 5 * g)]
        samples = []
        for i in range(4):
            completion = [rng.randrange(1000, 30000) for _ in range(6 + 3 * i)]
            samples.append(TrainSample(prompt, completion, [-3.0] * len(completion), (-1) ** i * 0.5 * (i + 1), 0))
        groups.append(TrainGroup(samples))
    return groups


def test_micro_batches_across_groups_give_the_same_update():
    cfg = load_config(CONFIG)
    results = {}
    for micro in (3, 4, 8):  # 3 splits a group across micro-batches and mixes both groups in one
        learner = Learner(cfg.policy.model_dump(), {**cfg.learner.model_dump(), "micro_batch_size": micro}, 10, 0,
                          cfg.algo.model_dump())
        stats = learner.update(_groups())
        # The (clipped) gradient the optimizer stepped with; Adam's first step is ~lr * sign(g), which
        # would turn float noise on near-zero entries into lr-sized differences.
        grads = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
        results[micro] = (stats, grads)
    ref_stats, ref_grads = results[4]  # micro 4 = one group per micro-batch
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0
    for micro in (3, 8):
        stats, grads = results[micro]
        for key in ("loss", "kl_per_token", "ce", "grad_norm"):
            assert abs(stats[key] - ref_stats[key]) <= 1e-5 * max(1.0, abs(ref_stats[key])), (micro, key)
        assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= 1e-5 * scale, micro


def test_update_threads_for_one_update():
    """``cpu_threads`` (learner.cpu_threads_alone in synchronous mode) applies to one update only and
    is reported; the update is the one-thread update up to float reordering."""
    cfg = load_config(CONFIG)
    results = {}
    # torch_threads, not torch.set_num_threads: a vLLM-CPU engine in this process may have blocked it
    with torch_threads(1):
        for threads in (None, 2):
            learner = Learner(cfg.policy.model_dump(), cfg.learner.model_dump(), 10, 0, cfg.algo.model_dump())
            stats = learner.update(_groups(), cpu_threads=threads)
            assert torch.get_num_threads() == 1
            results[threads] = (stats, {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()
                                        if p.requires_grad})
    (one, one_grads), (two, two_grads) = results[None], results[2]
    assert (one["update_threads"], two["update_threads"]) == (1, 2)
    for key in ("loss", "kl_per_token", "ce", "grad_norm"):
        assert abs(two[key] - one[key]) <= 1e-5 * max(1.0, abs(one[key])), key
    scale = max(g.abs().max().item() for g in one_grads.values())
    assert max((two_grads[n] - one_grads[n]).abs().max().item() for n in one_grads) <= 1e-5 * scale


def test_state_round_trip_restores_the_cpu_and_cuda_generators(monkeypatch, caplog):
    cfg = load_config(CONFIG)
    learner = Learner(cfg.policy.model_dump(), cfg.learner.model_dump(), 10, 0, cfg.algo.model_dump())
    # No GPU here: a stand-in CUDA runtime with two devices, whose generator states are byte tensors
    # (what torch.cuda.get_rng_state_all returns), records what the learner restores.
    devices = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    blob = learner.state()
    expected = torch.rand(4)  # what the CPU generator gives right after the checkpoint
    torch.rand(7)
    assert learner.load_state(blob) == 0
    assert torch.equal(torch.rand(4), expected)
    assert len(restored) == 1 and [r.tolist() for r in restored[0]] == [d.tolist() for d in devices]
    assert all(r.device.type == "cpu" and r.dtype == torch.uint8 for r in restored[0])

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on fewer GPUs: the first ones
    with caplog.at_level("WARNING", logger="learner.learner"):
        learner.load_state(blob)
    assert [r.tolist() for r in restored[1]] == [devices[0].tolist()] and "2 devices, 1 visible" in caplog.text

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only checkpoint: nothing to restore
    learner.load_state(learner.state())
    assert len(restored) == 2

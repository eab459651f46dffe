"""The learner's update (shared prompts, chunked head, one log_softmax per side) against the update
it replaced (``bench.learner_update.ReferenceLearner``, the pre-issue-15 code kept verbatim): same
loss, KL, statistics and gradients on one fixed batch, with the adapter away from zero (so the KL
and its gradient are not trivially 0) and half the batch off-policy (so importance weights enter).

In float64 the two must agree to 1e-6 relative; they agree to ~1e-16 in the forward (loss, KL,
CE) and ~4e-7 in the gradient, the floor set by transformers' Llama RMSNorm, which computes in
float32 even in a float64 model. In float32, the demo's dtype, the update is compared at float32's
noise floor: the gradient differs by ~1e-5 relative (worst tensor; the old update against itself
with micro-batch 3 instead of 4 differs by ~2e-6; every matmul here has other shapes), so the bound
there is 5e-5 -- cutting the prompt's share of the gradient moves it by ~1.5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.learner_update import ReferenceLearner, demo_groups, make_learner
from brainloop.types import TrainSample
from learner.learner import Learner

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (16, 11, 16, 7)  # completions of one group: padding and an early EOS included
STATS = ("loss", "kl_per_token", "kl_per_sequence", "ce", "is_weight_mean", "grad_norm")


def _learner(cls: type, dtype: torch.dtype, micro: int = 4) -> Learner:
    learner = make_learner(cls, overrides={"learner": {"micro_batch_size": micro}})
    learner.model.to(dtype)  # parameters are converted in place: the optimizer still holds them
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # an adapter that has moved: lora_B = 0 would make the KL exactly 0
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.02)
    learner.version = 1
    return learner


def _update(learner: Learner) -> tuple[dict, dict[str, torch.Tensor]]:
    stats = learner.update(demo_groups(learner, version=1, off_policy=True, lengths=LENGTHS))
    grads = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    return stats, grads


def _compare(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict[str, float]:
    """Largest relative differences: per statistic, per-sample importance weights, and the gradient
    (per parameter tensor: max |difference| / max |old|, the worst tensor)."""
    (sa, ga), (sb, gb) = a, b
    out = {k: abs(sb[k] - sa[k]) / abs(sa[k]) for k in STATS}
    out["is_weights"] = max(abs(x - y) / abs(x) for x, y in zip(sa["is_weights"], sb["is_weights"], strict=True))
    out["grad"] = max(((gb[n] - ga[n]).abs().max() / ga[n].abs().max()).item() for n in ga)
    return out


@pytest.fixture(scope="module")
def float64_runs() -> dict[str, tuple[dict, dict]]:
    return {"old": _update(_learner(ReferenceLearner, torch.float64)), "new": _update(_learner(Learner, torch.float64))}


def test_update_equals_the_previous_update_in_float64(float64_runs):
    old, new = float64_runs["old"], float64_runs["new"]
    assert old[0]["kl_per_token"] > 1e-4  # the KL term is really exercised
    assert 0 < min(old[0]["is_weights"]) < 1  # and so are the off-policy importance weights
    assert all(g.abs().max() > 0 for g in old[1].values())  # every LoRA tensor gets a gradient
    diffs = _compare(old, new)
    assert max(diffs.values()) <= 1e-6, diffs


def test_update_equals_the_previous_update_in_float32():
    old, new = _update(_learner(ReferenceLearner, torch.float32)), _update(_learner(Learner, torch.float32))
    diffs = _compare(old, new)
    assert max(v for k, v in diffs.items() if k != "grad") <= 1e-5, diffs
    assert diffs["grad"] <= 5e-5, diffs


def test_pi_ref_prepared_ahead_gives_the_same_update_bit_for_bit():
    """prepare_reference (run while the rewards are computed) leaves the update only the policy's pass;
    loss, statistics and gradients are those of the update that runs pi_ref itself, to the last bit.
    A sample the update does not find (here: one whose completion changed) is run in the update."""
    inline = _learner(Learner, torch.float32)
    inline_stats, inline_grads = _update(inline)
    assert inline_stats["reference_ahead_fraction"] == 0.0

    ahead = _learner(Learner, torch.float32)
    groups = demo_groups(ahead, version=1, off_policy=True, lengths=LENGTHS)
    done = ahead.prepare_reference(5, [[(s.prompt_ids, s.completion_ids) for s in g.samples] for g in groups])
    assert done["samples"] == sum(len(g.samples) for g in groups)
    ahead.prepare_reference(3, [[(groups[0].samples[0].prompt_ids, [1, 2, 3])]])  # a step never updated
    stats = ahead.update(groups, step=5)
    grads = {n: p.grad.detach().clone() for n, p in ahead.model.named_parameters() if p.requires_grad}
    assert stats["reference_ahead_fraction"] == 1.0
    assert ahead._prepared == {}  # this step's states are used once, older steps' dropped
    for key in (*STATS, "is_weights", "base_nll"):
        assert stats[key] == inline_stats[key], key
    assert all(torch.equal(grads[n], inline_grads[n]) for n in grads)

    partly = _learner(Learner, torch.float32)
    groups = demo_groups(partly, version=1, off_policy=True, lengths=LENGTHS)
    pairs = [[(s.prompt_ids, s.completion_ids) for s in g.samples] for g in groups]
    pairs[1][0] = (pairs[1][0][0], pairs[1][0][1][:-1])  # not what the update will see
    partly.prepare_reference(0, pairs)
    stats = partly.update(groups, step=0)
    assert stats["reference_ahead_fraction"] == 0.5  # the second group's micro-batch ran pi_ref itself
    assert stats["loss"] == inline_stats["loss"] and stats["kl_per_token"] == inline_stats["kl_per_token"]


def test_gradient_reaches_the_lora_weights_through_the_shared_prompts_keys_and_values(float64_runs):
    """The float64 equality above covers the prompt's share of the gradient: with the prompt's keys
    and values cut from the graph (detached at prompt positions in every layer) the gradient moves
    far outside its tolerance, so a shared prompt that did not pass gradients back would fail it."""
    learner = _learner(Learner, torch.float64)
    pack, prompt_at = learner._pack, {}

    def pack_and_mark(segments):
        out = pack(segments)
        prompt_at["mask"] = torch.zeros(out[0].shape, dtype=torch.bool)
        for r, seg in enumerate(segments):
            prompt_at["mask"][r, : len(seg[0].prompt_ids)] = True
        return out

    def cut_prompt(_module, _inputs, output):
        return torch.where(prompt_at["mask"].unsqueeze(-1), output.detach(), output)

    learner._pack = pack_and_mark
    for layer in learner.model.get_base_model().get_decoder().layers:
        layer.self_attn.k_proj.register_forward_hook(cut_prompt)
        layer.self_attn.v_proj.register_forward_hook(cut_prompt)
    stats, grads = _update(learner)
    diffs = _compare(float64_runs["old"], (stats, grads))
    assert diffs["loss"] <= 1e-6  # the forward is unchanged: only gradients lose the prompt's path
    assert diffs["grad"] > 1e-3, diffs


def test_pack_lays_out_one_prompt_and_its_completions():
    learner = object.__new__(Learner)  # _pack uses no model
    a = TrainSample([5, 6], [7, 8], [-1.0, -1.0], 1.0, 0)
    b = TrainSample([5, 6], [9], [-1.0], -1.0, 0)
    ids, positions, allowed, where = Learner._pack(learner, [[a, b]])
    assert ids.tolist() == [[5, 6, 7, 8, 9]]
    assert positions.tolist() == [[0, 1, 2, 3, 2]]  # b's token sits where it would after the prompt alone
    assert where.tolist() == [[1, 2], [1, 0]]  # token 0 of both predicted from the prompt's last position
    seen = allowed[0, 0].int().tolist()
    assert seen[2] == [1, 1, 1, 0, 0] and seen[3] == [1, 1, 1, 1, 0]
    assert seen[4] == [1, 1, 0, 0, 1]  # b attends to the prompt and itself, never to a's tokens


@pytest.mark.slow
def test_learner_update_bench_quick(tmp_path):
    """bench.learner_update times both updates on the same batches and reports what it claims."""
    out = tmp_path / "update.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "bench.learner_update", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                   check=True, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    assert report["quick"] is True and len(report["rows"]) == 2 and report["rows"][0]["warmup"]
    summary = report["summary"]
    assert summary["old_update_s_mean"] > 0 and summary["new_update_s_mean"] > 0
    assert summary["max_rel_diff"] < 1e-4  # same samples, same result
    assert summary["ahead_equals_new_every_round"] is True  # pi_ref ahead: bit for bit the same update
    assert 0 < summary["ahead_update_s_mean"] and 0 < summary["ahead_prepare_s_mean"]
    assert {"name", "value", "goal", "met", "why_missed"} <= set(report["targets"][0])

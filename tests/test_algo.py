"""The algorithm's math against cases worked out by hand."""

import itertools
import math

import numpy as np
import pytest
import torch

from brainloop import algo
from brainloop.types import Completion, SampleOutcome, ScoreResult


def test_group_advantages_population_std():
    # r = [1, 2, 3, 6]: mean 3, population var (4+1+0+9)/4 = 3.5
    adv = algo.group_advantages([1.0, 2.0, 3.0, 6.0])
    sd = math.sqrt(3.5)
    np.testing.assert_allclose(adv, [-2 / sd, -1 / sd, 0.0, 3 / sd])


def test_group_advantages_failed_samples_and_ties():
    adv = algo.group_advantages([1.0, float("nan"), 3.0])
    np.testing.assert_allclose(adv[[0, 2]], [-1.0, 1.0])
    assert math.isnan(adv[1])
    np.testing.assert_array_equal(algo.group_advantages([0.5, 0.5, 0.5]), [0.0, 0.0, 0.0])
    single = algo.group_advantages([float("nan"), 2.0])
    assert math.isnan(single[0]) and single[1] == 0.0


def test_token_log_probs_and_kl_hand_case():
    # Two-token vocabulary. pi = softmax([0, 0]) = (1/2, 1/2); pi_ref = softmax([ln 3, 0]) = (3/4, 1/4)
    logits = torch.tensor([[[0.0, 0.0]]])
    ref = torch.tensor([[[math.log(3.0), 0.0]]])
    kl = algo.full_kl(logits, ref)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    lp = algo.token_log_probs(ref, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_policy_loss_hand_case_masks_padding():
    # One sequence of three positions; the last is padding and must not count.
    logits = torch.zeros(1, 3, 2)  # pi uniform: -log pi = ln 2 at every position
    logits[0, 2] = torch.tensor([100.0, -100.0])  # garbage on the padded position
    ref = logits.clone()
    targets = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = algo.policy_loss(logits, ref, targets, mask, torch.tensor([2.0]), kl_coef=0.1, group_size=4)
    # CE = ln 2, KL = 0 (pi == pi_ref) -> loss = 2 * ln 2 / 4
    assert loss.item() == pytest.approx(2 * math.log(2) / 4, abs=1e-6)
    assert stats["kl_per_token"].item() == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_kl_term_and_gradient_direction():
    logits = torch.zeros(2, 1, 2, requires_grad=True)
    ref = torch.tensor([[[math.log(3.0), 0.0]], [[math.log(3.0), 0.0]]])
    targets = torch.tensor([[0], [0]])
    mask = torch.ones(2, 1)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = algo.policy_loss(logits, ref, targets, mask, adv, kl_coef=0.1, group_size=2)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    # CE terms cancel (A = +1 and -1 on equal CE); what is left is 0.1 * KL per sequence, / 2, * 2
    assert loss.item() == pytest.approx(0.1 * kl, abs=1e-6)
    assert stats["kl_per_sequence"].tolist() == pytest.approx([kl, kl], abs=1e-6)
    loss.backward()
    # d/dz0 of A * (-log p0) / 2 is -A * (1 - p0) / 2 = -A / 4; the KL term adds
    # kl_coef / 2 * p0 * (log(p0 / ref0) - KL) on both rows.
    kl_grad = 0.1 / 2 * 0.5 * (math.log(0.5 / 0.75) - kl)
    assert logits.grad[0, 0, 0].item() == pytest.approx(-0.25 + kl_grad, abs=1e-6)
    assert logits.grad[1, 0, 0].item() == pytest.approx(0.25 + kl_grad, abs=1e-6)


def test_policy_loss_mixed_group_sizes_equals_per_group_sums():
    # A micro-batch holding two sequences of a group of 2 and one of a group of 4 contributes what
    # the two groups would contribute separately.
    torch.manual_seed(0)
    logits, ref = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    targets, mask = torch.randint(0, 6, (3, 4)), torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([0.7, -0.7, 1.3])
    mixed, _ = algo.policy_loss(logits, ref, targets, mask, adv, 0.1, group_size=torch.tensor([2.0, 2.0, 4.0]))
    first, _ = algo.policy_loss(logits[:2], ref[:2], targets[:2], mask[:2], adv[:2], 0.1, group_size=2)
    second, _ = algo.policy_loss(logits[2:], ref[2:], targets[2:], mask[2:], adv[2:], 0.1, group_size=4)
    assert mixed.item() == pytest.approx((first + second).item(), abs=1e-6)


def test_importance_weights_on_policy_are_exactly_one_and_capped():
    learner = torch.tensor([[0.0, math.log(0.5)]])
    sampler = torch.tensor([[math.log(0.1), math.log(0.5) + 1e-4]])
    w_off = algo.truncated_importance_weights(learner, sampler, torch.tensor([False]), cap=2.0)
    assert w_off[0, 0].item() == pytest.approx(2.0)  # 1/0.1 = 10, capped at 2
    assert w_off[0, 1].item() == pytest.approx(math.exp(-1e-4), rel=1e-6)
    w_on = algo.truncated_importance_weights(learner, sampler, torch.tensor([True]), cap=2.0)
    assert torch.equal(w_on, torch.ones_like(w_on))


def test_lr_schedule_warmup_and_cosine_floor():
    lrs = [algo.lr_at(s, 1.0, warmup_steps=5, total_steps=200, min_ratio=0.05) for s in range(200)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0)
    assert algo.lr_at(200, 1.0, 5, 200, 0.05) == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:]))


def test_linear_temperature_schedule():
    assert algo.linear_schedule(0, 200, 1.0, 0.6) == pytest.approx(1.0)
    assert algo.linear_schedule(199, 200, 1.0, 0.6) == pytest.approx(0.6)
    assert algo.linear_schedule(99, 199, 1.0, 0.6) == pytest.approx(0.8)


# ---- the loss per token, and the chunked head ------------------------------------------------------


def test_loss_weights_hand_case():
    # Sequence 0: 2 completion tokens, A = 2, group of 4 -> ce_w = 2 / (2 * 4), kl_w = 0.1 / (2 * 4).
    # Sequence 1: 1 token, A = -1, group of 2 -> ce_w = -1 / 2, kl_w = 0.1 / 2. Padding weighs 0.
    ce_w, kl_w = algo.loss_weights(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([2.0, -1.0]),
                                   torch.tensor([4.0, 2.0]), kl_coef=0.1)
    assert ce_w.flatten().tolist() == pytest.approx([0.25, 0.25, 0.0, -0.5, 0.0, 0.0])
    assert kl_w.flatten().tolist() == pytest.approx([0.0125, 0.0125, 0.0, 0.05, 0.0, 0.0])


def test_head_terms_two_token_hand_case():
    # pi = (1/2, 1/2), pi_ref = (3/4, 1/4), target 1, on-policy (rho = 1), ce weight c, KL weight k.
    c, k = 0.3, 0.1
    loss, tok, kl, rho, grad, ref_tok = algo.head_terms(
        torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([1]), torch.tensor([c]),
        torch.tensor([k]), torch.tensor([-9.0]), torch.tensor([True]), cap=2.0)
    expected_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert tok.item() == pytest.approx(math.log(0.5)) and rho.item() == 1.0
    assert ref_tok.item() == pytest.approx(math.log(0.25), abs=1e-7)  # the base model's log-prob of the token
    assert kl.item() == pytest.approx(expected_kl, abs=1e-7)
    assert loss.item() == pytest.approx(-c * math.log(0.5) + k * expected_kl, abs=1e-7)
    # d/dz: c * (p - onehot(1)) + k * p * (log p - log p_ref - KL)
    assert grad[0, 0].item() == pytest.approx(c * 0.5 + k * 0.5 * (math.log(0.5 / 0.75) - expected_kl), abs=1e-7)
    assert grad[0, 1].item() == pytest.approx(c * -0.5 + k * 0.5 * (math.log(0.5 / 0.25) - expected_kl), abs=1e-7)


def test_head_terms_bit_identical_to_the_reference_functions_and_autograd():
    torch.manual_seed(1)
    logits, ref = torch.randn(6, 11), torch.randn(6, 11)
    targets = torch.randint(0, 11, (6,))
    ce_w, kl_w = torch.randn(6), torch.rand(6)
    sampler, on_policy = torch.randn(6) - 2.5, torch.tensor([True, False] * 3)
    loss, tok, kl, rho, grad, ref_tok = algo.head_terms(logits, ref, targets, ce_w, kl_w, sampler, on_policy, cap=2.0)
    # The same operations as token_log_probs / full_kl: equal bits, not just close values.
    assert torch.equal(tok, algo.token_log_probs(logits[None], targets[None])[0])
    assert torch.equal(kl, algo.full_kl(logits[None], ref[None])[0])
    torch.testing.assert_close(ref_tok, algo.token_log_probs(ref[None], targets[None])[0], rtol=1e-6, atol=1e-6)
    z = logits.clone().requires_grad_(True)
    logp = algo.token_log_probs(z[None], targets[None])[0]
    weights = algo.truncated_importance_weights(logp[None], sampler[None], on_policy[:1], 2.0)  # shape only
    rho_ref = torch.where(on_policy, torch.ones(6), torch.exp(logp.detach() - sampler).clamp(max=2.0))
    assert weights.shape == (1, 6) and torch.equal(rho, rho_ref)
    autograd_loss = (ce_w * rho_ref * -logp + kl_w * algo.full_kl(z[None], ref[None])[0]).sum()
    autograd_loss.backward()
    assert loss.item() == pytest.approx(autograd_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, z.grad, rtol=1e-6, atol=1e-7)


def test_policy_head_loss_in_chunks_equals_policy_loss_on_whole_logits():
    # Two sequences of a group of 2 and one of a group of 4, padding included, one off-policy row.
    torch.manual_seed(2)
    B, T, H, V = 3, 5, 4, 9
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float64)
    adv, sizes = torch.tensor([0.7, -0.7, 1.3], dtype=torch.float64), torch.tensor([2.0, 2.0, 4.0])
    sampler = torch.randn(B, T, dtype=torch.float64) - 2.0
    on_policy = torch.tensor([True, False, True])

    logits = hidden @ weight.T
    rho = algo.truncated_importance_weights(algo.token_log_probs(logits, targets), sampler, on_policy, 2.0)
    # pi_ref is a constant of the loss (no gradient through its logits), as in the learner
    expected, stats = algo.policy_loss(logits, ref_hidden @ weight.detach().T, targets, mask, adv, 0.1, sizes, rho)
    expected.backward()
    want = (hidden.grad.clone(), weight.grad.clone())

    keep = mask.bool()
    ce_w, kl_w = algo.loss_weights(mask, adv, sizes, 0.1)
    for rows in (1, 4, 100):  # one position per chunk, a chunk boundary mid-sequence, one chunk
        hidden.grad = weight.grad = None
        loss, tok, kl, rho_out, ref_tok = algo.policy_head_loss(
            hidden[keep], ref_hidden[keep], weight, targets[keep], ce_w[keep], kl_w[keep], sampler[keep],
            on_policy[:, None].expand(B, T)[keep], 2.0, chunk_elements=rows * V)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
        torch.testing.assert_close(tok, stats["logp"][keep], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rho_out, rho[keep], rtol=1e-12, atol=1e-12)
        ref_logp = algo.token_log_probs(ref_hidden @ weight.detach().T, targets)
        torch.testing.assert_close(ref_tok, ref_logp[keep], rtol=1e-10, atol=1e-12)
        kl_mean = algo.masked_mean(kl.new_zeros(B, T).masked_scatter_(keep, kl), mask)
        torch.testing.assert_close(kl_mean, stats["kl_per_token"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hidden.grad, want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weight.grad, want[1], rtol=1e-10, atol=1e-12)
        assert hidden.grad[~keep].abs().max() == 0  # padding positions never reach the vocabulary


# ---- the reward -> advantage -> samples rule (algo.build_groups) ----------------------------------------
def _completion(p: int, i: int, n_tokens: int = 2, version: int = 3) -> Completion:
    return Completion(p, i, f"text {p}.{i}", list(range(10, 10 + n_tokens)), [-1.0] * n_tokens, "stop", version,
                      prompt_token_ids=[1, 2])


def _ok(reward: float) -> ScoreResult:
    return ScoreResult("ok", reward=reward)


UNSPEAKABLE = ScoreResult("unspeakable", error="nothing to speak")
FAILED = ScoreResult("failed", error="timeout")


def test_build_groups_failed_and_excluded_unspeakable_get_no_advantage():
    # Rewards [1, failed, 3, unspeakable-excluded]: only 1 and 3 count, mean 2, population std 1 -> -1, +1.
    completions = [[_completion(0, i) for i in range(4)]]
    groups, outcomes = algo.build_groups(completions, [[_ok(1.0), FAILED, _ok(3.0), UNSPEAKABLE]], "exclude")
    assert outcomes == [[SampleOutcome(1.0, -1.0, True), SampleOutcome(None, None, False),
                         SampleOutcome(3.0, 1.0, True), SampleOutcome(None, None, False)]]
    [group] = groups
    assert [s.advantage for s in group.samples] == [-1.0, 1.0]
    first = group.samples[0]
    assert (first.prompt_ids, first.completion_ids, first.sampler_logprobs, first.adapter_version) == \
        ([1, 2], [10, 11], [-1.0, -1.0], 3)


def test_build_groups_unspeakable_given_a_reward_enters_the_statistics():
    # unspeakable_reward = 0: rewards [2, 0] -> mean 1, std 1 -> +1, -1; the recorded reward is 0.0.
    completions = [[_completion(0, 0), _completion(0, 1)]]
    groups, outcomes = algo.build_groups(completions, [[_ok(2.0), UNSPEAKABLE]], 0.0)
    assert outcomes == [[SampleOutcome(2.0, 1.0, True), SampleOutcome(0.0, -1.0, True)]]
    assert [s.advantage for s in groups[0].samples] == [1.0, -1.0]


def test_build_groups_nan_reward_equal_rewards_and_empty_completions():
    completions = [[_completion(0, i) for i in range(3)],
                   [_completion(1, 0), _completion(1, 1, n_tokens=0), _completion(1, 2)],
                   [_completion(2, 0), _completion(2, 1)]]
    results = [[_ok(float("nan")), _ok(5.0), _ok(5.0)],  # a NaN reward is left out; the rest are equal -> 0
               [_ok(1.0), _ok(2.0), _ok(3.0)],  # the empty completion counts in the statistics, not the update
               [FAILED, FAILED]]  # no reward at all: no advantage, no group
    groups, outcomes = algo.build_groups(completions, results, "exclude")
    assert outcomes[0] == [SampleOutcome(None, None, False), SampleOutcome(5.0, 0.0, True),
                           SampleOutcome(5.0, 0.0, True)]
    sd = math.sqrt(2 / 3)
    assert [o.used for o in outcomes[1]] == [True, False, True]
    np.testing.assert_allclose([o.advantage for o in outcomes[1]], [-1 / sd, 0.0, 1 / sd])
    assert outcomes[2] == [SampleOutcome(None, None, False)] * 2
    assert len(groups) == 2 and [len(g.samples) for g in groups] == [2, 2]
    single = algo.build_groups([[_completion(0, 0), _completion(0, 1)]], [[_ok(4.0), FAILED]])[1][0]
    assert single[0] == SampleOutcome(4.0, 0.0, True)  # one valid reward: no signal, advantage 0


def test_build_groups_naturalness_penalty_in_the_advantages_not_the_reward():
    # coef 0.5, base NLL [2, 0, 9]: penalised rewards [1 - 1, 1 - 0, unspeakable 0 (no penalty)] = [0, 1, 0]
    # -> mean 1/3, population std sqrt(2)/3 -> advantages [-1/sqrt(2), 2/sqrt(2), -1/sqrt(2)].
    completions = [[_completion(0, i) for i in range(3)]]
    groups, outcomes = algo.build_groups(completions, [[_ok(1.0), _ok(1.0), UNSPEAKABLE]], 0.0,
                                         naturalness_coef=0.5, base_nll=[[2.0, 0.0, 9.0]])
    assert [o.reward for o in outcomes[0]] == [1.0, 1.0, 0.0]
    np.testing.assert_allclose([o.advantage for o in outcomes[0]], np.array([-1.0, 2.0, -1.0]) / math.sqrt(2))
    np.testing.assert_allclose([s.advantage for s in groups[0].samples], np.array([-1.0, 2.0, -1.0]) / math.sqrt(2))
    # coef 0 ignores the NLL: equal rewards, zero advantages
    _, plain = algo.build_groups(completions, [[_ok(1.0), _ok(1.0), _ok(1.0)]], base_nll=[[2.0, 0.0, 9.0]])
    assert [o.advantage for o in plain[0]] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="base model's NLL"):
        algo.build_groups(completions, [[_ok(1.0)] * 3], naturalness_coef=0.5)

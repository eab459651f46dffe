"""The algorithm's math against cases worked out by hand."""

import itertools
import math

import numpy as np
import pytest
import torch

from brainloop import algo


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

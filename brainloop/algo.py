"""The reference algorithm's math, as pure functions.

Per step, for each prompt a group of N completions is sampled and scored. ``build_groups`` turns the
scores into rewards (failed and excluded texts get none), advantages and the samples of the update. Then

    A_i   = (r_i - mean(r)) / std(r)                      population std, within the group
    CE_i  = mean over completion tokens of -log pi(y_t)    tokens up to and including EOS, never padding
    KL_i  = mean over completion tokens of KL(pi || pi_ref) over the full vocabulary
    loss  = sum_i (A_i * CE_i + kl_coef * KL_i) / N

Minimising A_i * CE_i raises the likelihood of above-average completions and lowers that of
below-average ones. With asynchronous sampling the sampled tokens may come from an older adapter:
each token's CE term is then weighted by the truncated importance ratio
rho_t = min(pi(y_t) / mu(y_t), cap) (mu = the sampler's probability), detached, and set to exactly 1
for on-policy samples.

The learner computes this loss written per token (``loss_weights``), from hidden states through the
output head in chunks of positions (``policy_head_loss``): one log_softmax per side and position,
the (positions x vocabulary) tensors of one chunk at a time, the gradient taken analytically.
``policy_loss`` is the same loss on whole (B, T, V) logits, the readable form the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from brainloop.types import Completion, SampleOutcome, ScoreResult, TrainGroup, TrainSample


def group_advantages(rewards: Sequence[float], eps: float = 1e-8) -> np.ndarray:
    """Normalise rewards within one group: (r - mean) / population std.

    NaN rewards mark samples that failed to score: they get a NaN advantage (left out of the
    update) and do not enter the statistics. A group with fewer than two valid rewards, or with
    identical rewards, carries no learning signal and gets zeros.
    """
    r = np.asarray(rewards, dtype=np.float64)
    valid = np.isfinite(r)
    out = np.full(r.shape, np.nan)
    if valid.sum() < 2:
        out[valid] = 0.0
        return out
    mean = r[valid].mean()
    std = r[valid].std()  # population std (ddof=0), as the reference
    out[valid] = 0.0 if std < eps else (r[valid] - mean) / std
    return out


def sample_reward(result: ScoreResult, unspeakable_reward: float | str) -> float:
    """The reward a scored text counts with: its brain reward when "ok"; ``unspeakable_reward`` for an
    unspeakable text unless it is "exclude"; NaN otherwise (failed, excluded), which leaves it out."""
    if result.ok:
        return float(result.reward) if result.reward is not None else math.nan
    if result.status == "unspeakable" and unspeakable_reward != "exclude":
        return float(unspeakable_reward)
    return math.nan


def build_groups(
    completions: Sequence[Sequence[Completion]],
    results: Sequence[Sequence[ScoreResult]],
    unspeakable_reward: float | str = "exclude",
    naturalness_coef: float = 0.0,
    base_nll: Sequence[Sequence[float | None]] | None = None,
) -> tuple[list[TrainGroup], list[list[SampleOutcome]]]:
    """The reward -> advantage -> samples rule of one step, for the driver and the reference loop alike.

    ``completions[p][i]`` is the i-th completion of prompt p and ``results[p][i]`` its score. Per group:

    - each completion's reward is ``sample_reward`` (failed, excluded unspeakable and NaN rewards are
      NaN: they get no advantage and do not enter the group's statistics);
    - with ``naturalness_coef > 0`` the advantages see ``reward - coef * base_nll[p][i]`` (the base
      model's NLL per token) for scored ("ok") texts; the recorded reward stays the brain reward;
    - advantages are ``group_advantages`` of those (a group of equal rewards, or of fewer than two,
      gets zeros);
    - a completion is used in the update when its advantage is finite and it has at least one token.

    Returns the TrainGroups (groups with no used completion are left out) and each completion's
    ``SampleOutcome``, in the shape of ``completions``.
    """
    if naturalness_coef > 0 and base_nll is None:
        raise ValueError("naturalness_coef > 0 needs the base model's NLL of every completion")
    groups: list[TrainGroup] = []
    outcomes: list[list[SampleOutcome]] = []
    for p, (group, scored) in enumerate(zip(completions, results, strict=True)):
        rewards = [sample_reward(r, unspeakable_reward) for r in scored]
        penalties = [naturalness_coef * base_nll[p][i] if naturalness_coef > 0 and r.ok else 0.0  # type: ignore[index]
                     for i, r in enumerate(scored)]
        advantages = group_advantages([r - pen for r, pen in zip(rewards, penalties, strict=True)])
        samples, row = [], []
        for c, reward, adv in zip(group, rewards, advantages, strict=True):
            used = bool(np.isfinite(adv)) and len(c.token_ids) > 0
            if used:
                samples.append(TrainSample(c.prompt_token_ids, c.token_ids, c.logprobs, float(adv), c.adapter_version))
            row.append(SampleOutcome(reward if math.isfinite(reward) else None,
                                     float(adv) if np.isfinite(adv) else None, used))
        outcomes.append(row)
        if samples:
            groups.append(TrainGroup(samples))
    return groups, outcomes


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast, as ``token_log_probs`` does; float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at each position. logits (B, T, V), targets (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(_upcast(logits), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the whole vocabulary at each position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    ref_logp = F.log_softmax(_upcast(ref_logits), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def truncated_importance_weights(
    learner_logp: torch.Tensor, sampler_logp: torch.Tensor, on_policy: torch.Tensor, cap: float
) -> torch.Tensor:
    """rho_t = min(exp(log pi - log mu), cap), detached; exactly 1 for on-policy rows.

    ``on_policy`` (B,) is True where the sample came from the adapter version being updated: the
    sampler's and learner's log-probs then differ only by numerics, and the synchronous reference
    uses no correction.
    """
    rho = torch.exp(learner_logp.detach() - sampler_logp).clamp(max=cap)
    return torch.where(on_policy.unsqueeze(-1), torch.ones_like(rho), rho)


def policy_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    kl_coef: float,
    group_size: int | torch.Tensor,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference loss for a micro-batch of B sequences, on whole logits (see ``policy_head_loss``).

    logits/ref_logits (B, T, V) predict targets (B, T); mask (B, T) selects completion tokens;
    advantages (B,). ``group_size``: the size of the group each sequence belongs to, one number or
    (B,) when a micro-batch mixes groups. Returns the loss contribution (each sequence's term divided
    by its group's size, summed, so micro-batches can be accumulated) and per-sequence statistics.
    """
    logp = token_log_probs(logits, targets)
    weights = torch.ones_like(logp) if is_weights is None else is_weights
    weighted_ce = -masked_mean(weights * logp, mask)  # (B,)
    kl_tok = full_kl(logits, ref_logits)
    kl_mean = masked_mean(kl_tok, mask)  # nats per token
    kl_sum = (kl_tok * mask).sum(-1)  # nats per sequence
    loss = ((advantages * weighted_ce + kl_coef * kl_mean) / group_size).sum()
    stats = {"ce": -masked_mean(logp.detach(), mask), "kl_per_token": kl_mean.detach(),
             "kl_per_sequence": kl_sum.detach(), "logp": logp.detach()}
    return loss, stats


def loss_weights(
    mask: torch.Tensor, advantages: torch.Tensor, group_size: int | torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy_loss`` spelled per token: loss = sum_t ce_w_t * rho_t * (-log pi(y_t)) + kl_w_t * KL_t with

        ce_w_t = A_i * m_t / (n_i * G_i),   kl_w_t = kl_coef * m_t / (n_i * G_i)

    (m the completion mask, n_i = sum_t m_t, G_i the group size). mask (B, T), advantages (B,),
    group_size a number or (B,). Returns (ce_w, kl_w), both (B, T).
    """
    sizes = torch.as_tensor(group_size, dtype=mask.dtype, device=mask.device).reshape(-1, 1)
    scale = mask / (mask.sum(-1, keepdim=True).clamp_min(1.0) * sizes)
    return advantages.to(mask.dtype).unsqueeze(-1) * scale, kl_coef * scale


def head_terms(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    kl_weight: torch.Tensor,
    sampler_logp: torch.Tensor,
    on_policy: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss terms of N positions and d loss / d logits, from one log_softmax per side.

    logits/ref_logits (N, V); targets, the weights (``loss_weights``), sampler log-probs and
    on_policy (N,). Returns (loss, log pi(y), KL, rho, grad (N, V), log pi_ref(y)); the last is the
    base model's log-prob of the token (its NLL is the naturalness measure), read off the same tensors.
    Token log-prob and KL are the same operations as ``token_log_probs`` / ``full_kl`` (bit-identical on
    equal logits); the gradient is the analytic one of the loss, rho detached:
        d(-log pi(y))/dz = p - onehot(y),   dKL(pi || pi_ref)/dz = p * (log p - log p_ref - KL).
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)
    diff = F.log_softmax(_upcast(ref_logits), dim=-1).neg_().add_(logp)  # log p - log p_ref, in place
    tok = torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)
    ref_tok = tok - torch.gather(diff, -1, targets.unsqueeze(-1)).squeeze(-1)  # log p_ref(y), before diff changes
    p = logp.exp_()  # logp is not needed any more: p overwrites it
    kl = (p * diff).sum(-1)
    rho = truncated_importance_weights(tok.unsqueeze(-1), sampler_logp.unsqueeze(-1), on_policy, cap).squeeze(-1)
    ce = ce_weight * rho
    loss = (ce * -tok + kl_weight * kl).sum()
    grad = diff.sub_(kl.unsqueeze(-1)).mul_(kl_weight.unsqueeze(-1)).add_(ce.unsqueeze(-1)).mul_(p)
    grad.scatter_add_(-1, targets.unsqueeze(-1), -ce.unsqueeze(-1))
    return loss, tok, kl, rho, grad, ref_tok


class _PolicyHeadLoss(torch.autograd.Function):
    """``head_terms`` over the output head, a chunk of positions at a time.

    Logits are never held for more than one chunk: the gradient with respect to the hidden states
    (N, H: small) is computed in the forward pass, where the chunk's probabilities are at hand, and
    only scaled in backward (the loss is a scalar), so no (N, V) tensor is kept for backward or
    recomputed (one head matmul per side plus one for the gradient, as plain autograd does).
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, targets, ce_weight, kl_weight, sampler_logp, on_policy, cap, rows):
        need_weight_grad = ctx.needs_input_grad[2]
        dtype = _upcast(hidden[:0]).dtype  # the dtype head_terms computes in
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight_grad else None
        tok, kl, rho, ref_tok = (torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device) for _ in range(4))
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            h = hidden[part]
            terms = head_terms(F.linear(h, weight), F.linear(ref_hidden[part], weight), targets[part],
                               ce_weight[part], kl_weight[part], sampler_logp[part], on_policy[part], cap)
            loss += terms[0]
            tok[part], kl[part], rho[part], ref_tok[part] = *terms[1:4], terms[5]
            grad = terms[4]
            grad_hidden[part] = grad.to(weight.dtype) @ weight
            if need_weight_grad:
                grad_weight += grad.T @ _upcast(h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(tok, kl, rho, ref_tok)
        return loss, tok, kl, rho, ref_tok

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_loss * grad_weight).to(grad_hidden.dtype)
        return grad_loss * grad_hidden, None, grad_w, None, None, None, None, None, None, None


def policy_head_loss(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    kl_weight: torch.Tensor,
    sampler_logp: torch.Tensor,
    on_policy: torch.Tensor,
    cap: float,
    chunk_elements: int = 1 << 23,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of N completion positions from the hidden states that predict them.

    hidden (N, H) from the policy (differentiable), ref_hidden (N, H) from pi_ref, weight (V, H) the
    output head shared by both (bias-free, as Llama's); targets, ``loss_weights``' weights, sampler
    log-probs and on_policy (N,). Returns (loss, log pi(y), KL, rho, log pi_ref(y)), the last four detached, each
    (N,). Peak memory: a few (rows, V) float32 tensors, rows <= chunk_elements // V positions (the
    default, 32 MiB per tensor, is 170 positions of a 49k vocabulary: larger chunks were no faster
    on one CPU thread, smaller ones slower).
    """
    most = max(1, chunk_elements // weight.shape[0])
    # Equal chunks (188 positions -> 94 + 94, not 170 + 18): every chunk streams the whole head
    # weight (113 MB for SmolLM2) through the cache, so a small remainder chunk is nearly as dear.
    rows = max(1, -(-hidden.shape[0] // max(1, -(-hidden.shape[0] // most))))
    return _PolicyHeadLoss.apply(hidden, ref_hidden.detach(), weight, targets, ce_weight, kl_weight,
                                 sampler_logp, on_policy, cap, rows)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_ratio * base_lr``.

    ``step`` counts optimizer updates from 0; the first update uses lr/warmup_steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1.0 - min_ratio) * cosine)


def linear_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Value interpolated linearly from ``start`` (step 0) to ``end`` (last step)."""
    if total_steps <= 1:
        return start
    return start + (end - start) * min(1.0, step / (total_steps - 1))

"""The reference algorithm's math, as pure functions.

Per step, for each prompt a group of N completions is sampled and scored. Then

    A_i   = (r_i - mean(r)) / std(r)                      population std, within the group
    CE_i  = mean over completion tokens of -log pi(y_t)    tokens up to and including EOS, never padding
    KL_i  = mean over completion tokens of KL(pi || pi_ref) over the full vocabulary
    loss  = sum_i (A_i * CE_i + kl_coef * KL_i) / N

Minimising A_i * CE_i raises the likelihood of above-average completions and lowers that of
below-average ones. With asynchronous sampling the sampled tokens may come from an older adapter:
each token's CE term is then weighted by the truncated importance ratio
rho_t = min(pi(y_t) / mu(y_t), cap) (mu = the sampler's probability), detached, and set to exactly 1
for on-policy samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at each position. logits (B, T, V), targets (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the whole vocabulary at each position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
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
    """The reference loss for a micro-batch of B sequences.

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

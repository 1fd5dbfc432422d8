"""PPO for RLHF as plain tensor code (no Ray, no model): masks, KL shaping, GAE, clipped losses.

Every per-token tensor is ``(batch, T)`` over the *response* tokens only. ``mask`` has the
same shape (bool or float): 1 for real response tokens, the EOS token included, 0 for
padding and for anything generated after EOS. Entries of an output where the mask is 0 are 0.

References: Schulman et al. 2017 (PPO, clipped objective); Schulman et al. 2016 (GAE);
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (per-token KL
penalty to the reference model, adaptive KL coefficient); Bai et al. 2022 (Constitutional
AI: RL-CAI runs this PPO against a reward model trained on AI preference labels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

WHITEN_EPS = 1e-8
KLKind = Literal["k1", "abs", "mse", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1; over all of them (a scalar) or
    along ``dim``. An empty mask (or an empty row along ``dim``) gives 0, not NaN."""
    kept = torch.where(mask.bool(), x, 0.0)  # not x * mask: inf or NaN at padding stays out
    count = mask.to(x.dtype)
    if dim is None:
        return kept.sum() / count.sum().clamp_min(1)
    return kept.sum(dim) / count.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries (a scalar); ``unbiased`` divides by n − 1.

    Raises ``ValueError`` when the unbiased estimate is asked for fewer than 2 entries.
    """
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 masked entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    all_ranks_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalize ``x`` to mean 0 and (unbiased) variance 1 over the masked entries; entries
    outside the mask are 0. With ``shift_mean=False`` the mean is added back (only the scale
    changes). The formula is TRL's ``masked_whiten``; statistics are over the whole batch.

    ``all_ranks_sum`` sums a tensor over every learner (an all-reduce): the mean and variance
    are then the whole step's, not this rank's, so each learner scales its advantages alike.
    With fewer than 2 masked entries in all (one learner's single one-token answer, say) the
    variance is undefined (TRL divides by zero): the entries are centred, not scaled.
    """
    total = all_ranks_sum or (lambda t: t)
    keep = mask.bool()
    first = total(torch.stack([torch.where(keep, x, 0.0).sum(), keep.sum().to(x.dtype)]))
    count = first[1]
    mean = first[0] / count.clamp_min(1)
    squares = total(torch.where(keep, (x - mean) ** 2, 0.0).sum())
    centred = x - mean
    if count >= 2:
        centred = centred * torch.rsqrt(squares / (count - 1) + WHITEN_EPS)
    if not shift_mean:
        centred = centred + mean
    return torch.where(keep, centred, 0.0)


def response_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``(batch, max_length)`` float mask with the first ``lengths[i]`` tokens of row ``i`` set.

    ``lengths`` is ``(batch,)``: each response's token count, EOS included.
    """
    positions = torch.arange(max_length, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).float()


def mask_after_eos(token_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(batch, T)`` float mask keeping each row up to and including its first EOS.

    A row without EOS keeps all its tokens (a truncated response); combine with
    ``response_mask`` when such rows are padded with a token other than EOS.
    """
    is_eos = (token_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token: logits ``(batch, T, V)``, tokens ``(batch, T)``
    → ``(batch, T)``. Computed as ``logit[token] − logsumexp(logits)`` so the full
    ``(batch, T, V)`` log-softmax is never stored (V is ~10⁵ for real tokenizers)."""
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, ``(batch, T, V)`` → ``(batch, T)``, in nats.
    ``entr`` treats 0·log 0 as 0, so vocabulary entries masked with −inf logits are fine."""
    return torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from the sampled tokens' log-probs.

    With ``d = logprobs − ref_logprobs`` (tokens sampled from the policy):
    ``"k1"``: d, unbiased but can be negative (Ziegler et al. 2019); ``"abs"``: |d|;
    ``"mse"``: d²/2; ``"k3"``: (r − 1) − log r with r = exp(−d), unbiased and never negative
    (Schulman, "Approximating KL Divergence", 2020). All shapes ``(batch, T)``.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d  # (r − 1) − log r, with log r = −d taken exactly
    raise ValueError(f"kl kind must be one of 'k1', 'abs', 'mse', 'k3', got {kind!r}")


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """``(batch, T)`` indicator of each row's last masked token; all 0 for an empty row."""
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1)
    return torch.nn.functional.one_hot(last, mask.shape[1]).to(mask.dtype) * mask


def shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: −β·KL on every response token, plus the reward model's
    sequence score on the last real token (Ziegler et al. 2019: R = r − β·log(π/ρ)).

    ``scores`` is ``(batch,)``; the rest ``(batch, T)``. Returns ``(rewards, kl)``, both
    ``(batch, T)`` and 0 outside the mask. A row whose mask is all 0 (an empty response) gets
    all-zero rewards: its score is dropped, since there is no token to credit it to.
    """
    kl = torch.where(mask.bool(), kl_per_token(logprobs, ref_logprobs, kind), 0.0)
    rewards = -kl_coef * kl + scores[:, None].to(kl.dtype) * _last_token(mask.to(kl.dtype))
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), right to left:

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γ·λ·A_{t+1},    returns_t = A_t + V_t

    The episode ends at the last real token: the value after it is 0. Masked positions are
    skipped (they neither add reward nor pass a value back). All shapes ``(batch, T)``;
    both outputs are 0 outside the mask and carry no gradient (they are PPO's targets).
    Advantages are not whitened here; callers use ``masked_whiten``.
    """
    keep = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # a masked position passes the later state through unchanged, as if it were absent
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages.append(torch.where(keep[:, t], advantage, 0.0))
    advantages_bt = torch.stack(advantages[::-1], dim=1)
    return advantages_bt, torch.where(keep, advantages_bt + values, 0.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimize:

        masked mean of w·max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),   ρ = exp(logprobs − old_logprobs)

    ``old_logprobs`` are the proximal policy's (the learner's own, recomputed before the
    update); ``weights`` ``w`` the per-token behaviour correction of
    :func:`truncated_is_weights` (constants: no gradient flows through them), 1 when None.
    All inputs ``(batch, T)``; returns a scalar and stats: ``clipfrac`` (share of tokens where
    the clipped term wins, so their gradient is 0), ``approx_kl`` (½·mean (log ρ)², between
    the old and current policy) and ``ratio_mean``.
    """
    # masked first: a garbage log-prob at padding must not overflow exp() into NaN gradients
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = masked_mean(per_token, mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask).item(),
        "approx_kl": (0.5 * masked_mean(log_ratio.detach() ** 2, mask)).item(),
        "ratio_mean": masked_mean(ratio.detach(), mask).item(),
    }
    return loss, stats


def truncated_is_weights(
    proximal: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The decoupled-PPO behaviour correction (Hilton et al. 2022, "Batch size-invariance for
    policy optimization"; AReaL; TRL's ``vllm_importance_sampling_correction``): each token's
    loss is weighted by the truncated importance ratio

        w = min(exp(proximal − behaviour), cap)

    of the proximal policy (the learner's log-probs, recomputed before the update) over the
    behaviour policy that sampled the token (the engine's log-probs: an older version when
    rollouts overlap training, a bf16 engine's rounding on GPUs). The weights are constants:
    computed without gradient, and 0 outside the mask.

    Returns the weights ``(batch, T)`` and stats over the masked tokens: ``is_weight_mean``
    (of the truncated weights), ``is_clipped_frac`` (share of tokens whose ratio exceeded
    ``cap``) and ``behaviour_gap`` (mean |proximal − behaviour|, nats per token).
    """
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    with torch.no_grad():
        keep = mask.bool()
        log_ratio = torch.where(keep, proximal - behaviour, 0.0)  # masked first: no overflow at padding
        ratio = torch.exp(log_ratio)
        weights = torch.where(keep, ratio.clamp(max=cap), 0.0)
        stats = {
            "is_weight_mean": masked_mean(weights, mask).item(),
            "is_clipped_frac": masked_mean((ratio > cap).to(weights.dtype), mask).item(),
            "behaviour_gap": masked_mean(log_ratio.abs(), mask).item(),
        }
    return weights, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (as in Ziegler et al. 2019's PPO and OpenAI baselines' ppo2):

        ½ · masked mean of max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)

    All inputs ``(batch, T)``; returns a scalar and stats: ``vf_clipfrac`` (share of tokens
    where the clipped error wins) and ``value_error`` (masked mean of (V − R)²).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "vf_clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask).item(),
        "value_error": masked_mean(unclipped.detach(), mask).item(),
    }
    return loss, stats


class AdaptiveKLController:
    """KL coefficient β steered toward a target KL (Ziegler et al. 2019):

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    ``current_kl`` is the measured KL(policy ‖ reference) per sequence; ``n_steps`` the
    number of samples since the last update. Above target β grows, below it shrinks.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""


def penalize_missing_eos(scores: list[float], finished: list[bool], penalty: float) -> list[float]:
    """Subtract ``penalty`` from the score of every answer that ran out of tokens before its
    end of sequence (TRL's ``missing_eos_penalty``: ``rewards[~contains_eos] -= penalty``). A
    reward model scores a truncated answer as if it were complete, and the policy would learn
    to ramble up to the limit. Subtracting keeps the penalty a known distance below the answer's
    own score, whatever the reward model's scale (replacing the score with a fixed value
    rewards truncation wherever typical scores are below it)."""
    if len(scores) != len(finished):
        raise ValueError(f"{len(scores)} scores for {len(finished)} answers")
    return [score if done else score - penalty for score, done in zip(scores, finished)]


def learning_rate(schedule: Literal["constant", "linear"], base: float, update: int, total: int) -> float:
    """The learning rate for optimizer update ``update`` (0-based) of ``total``: constant, or
    decaying linearly to 0 at the end (TRL PPOv2's schedule: 1 − update / total)."""
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base * max(0.0, 1.0 - update / total)
    raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")

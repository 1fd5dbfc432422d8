"""One PPO update on one rollout batch, inside a learner: score it (the proximal policy's
log-probs and values, the reference's log-probs, KL-shaped rewards, whitened GAE advantages,
the behaviour correction's weights), then ``ppo_epochs`` passes of clipped policy and value
losses over minibatches. The math is :mod:`core.ppo_math`; this module feeds it tensors.

Three policies meet here (decoupled PPO; docs/ppo.md):

* the *behaviour* policy sampled the tokens: the engine's log-probs, returned with each
  rollout (an older version when rollouts overlap training, and a bf16 engine's rounding);
* the *proximal* policy is the learner's own before this update (``old_logprobs``): PPO's
  ratio and clip, the KL penalty and GAE all use it;
* the policy being trained.

Each token's loss is weighted by ``min(π_proximal / π_behaviour, --is-cap)``
(``--behaviour-correction tis``), which makes the batch count as if the proximal policy had
sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from core import ppo_math
from core.frozen_models import FrozenScorer
from core.ppo_policy import ActorCritic, RolloutBatch, pack_rollouts
from learners.ppo_config import PPOConfig
from learners.ranks import all_ranks_sum


def learn_from_rollouts(ddp, core: ActorCritic, frozen: FrozenScorer, optimizer, prompts: list[list[int]],
                        responses: list[list[int]], scores: list[float], cfg: PPOConfig, kl_coef: float, *,
                        pad_id: int, seed: int, step: int = 0, behaviour: Sequence[Sequence[float]] | None = None):
    """Score one rollout batch and update on it: the learner step after sampling. Every tensor
    goes to the device the models are on (``core``'s parameters); the inputs arrive as lists
    (``behaviour``: the engine's log-probs of each response's tokens; None: no correction).
    Returns the batch, the scored tensors and the update's stats."""
    device = next(core.parameters()).device
    batch = pack_rollouts(prompts, responses, pad_id).to(device)
    scored = score_rollouts(core, frozen, batch, torch.tensor(scores, device=device), cfg, kl_coef,
                            behaviour=None if behaviour is None else behaviour_tensor(behaviour, batch.mask))
    return batch, scored, ppo_update(ddp, optimizer, batch, scored, cfg, seed=seed, step=step)


def behaviour_tensor(logprobs: Sequence[Sequence[float]], mask: torch.Tensor) -> torch.Tensor:
    """The engine's log-probs as a ``(batch, T)`` tensor shaped like ``mask`` (0 at padding)."""
    tensor = torch.zeros(mask.shape, dtype=torch.float32)
    for row, values in enumerate(logprobs):
        width = min(len(values), mask.shape[1])
        tensor[row, :width] = torch.tensor(list(values[:width]), dtype=torch.float32)
    return tensor.to(mask.device)


def score_rollouts(model: ActorCritic, frozen: FrozenScorer, batch: RolloutBatch, scores: torch.Tensor, cfg: PPOConfig,
                   kl_coef: float, behaviour: torch.Tensor | None = None) -> dict[str, Any]:
    """Proximal log-probs, values, KL-shaped rewards, whitened GAE advantages for one batch;
    with the behaviour policy's log-probs, the truncated importance weights and their stats."""
    model.eval()
    with torch.no_grad():
        old_logprobs, entropy, values = model(batch, cfg.sampling.temperature)
    ref_logprobs = frozen.ref_logprobs(batch, cfg.sampling.temperature).to(old_logprobs.device)
    rewards, kl = ppo_math.shaped_rewards(scores, old_logprobs, ref_logprobs, batch.mask, kl_coef,
                                          kind=cfg.kl_estimator)
    values = values * batch.mask
    advantages, returns = ppo_math.gae_advantages(rewards, values, batch.mask, cfg.gamma, cfg.lam)
    advantages = ppo_math.masked_whiten(advantages, batch.mask, all_ranks_sum=all_ranks_sum)
    scored: dict[str, Any] = {"old_logprobs": old_logprobs, "values": values, "advantages": advantages,
                              "returns": returns, "kl": kl, "entropy": entropy}
    if behaviour is not None:
        weights, stats = ppo_math.truncated_is_weights(old_logprobs.float(), behaviour.to(old_logprobs.device),
                                                       batch.mask, cfg.is_cap)
        gap = torch.where(batch.mask.bool(), (old_logprobs.float() - behaviour.to(old_logprobs.device)).abs(), 0.0)
        scored.update(is_weights=weights, correction=stats, rollout_logprob_diff=float(gap.max()) if gap.numel() else 0.0)
    return scored


def updates_per_step(rows: int, cfg: PPOConfig) -> int:
    """Optimizer steps one PPO step takes on a learner with ``rows`` rollouts."""
    return cfg.ppo_epochs * -(-rows // cfg.minibatch)


def ppo_update(model, optimizer, batch: RolloutBatch, scored: dict[str, Any], cfg: PPOConfig, seed: int,
               step: int = 0):
    """``ppo_epochs`` passes of clipped policy + value loss over shuffled minibatches, each
    token's policy loss weighted by the behaviour correction (``--behaviour-correction tis``,
    when the batch came with the engine's log-probs). The learning rate follows
    ``cfg.lr_schedule`` over every update of the run: a function of the step, so a restarted
    run picks it up where it was."""
    model.train()  # dropout is off in every model (ppo_policy.disable_dropout): train mode changes nothing else
    n = batch.input_ids.shape[0]
    per_step = updates_per_step(n, cfg)
    update = step * per_step
    generator = torch.Generator().manual_seed(seed)
    weights = scored.get("is_weights") if cfg.behaviour_correction == "tis" else None
    stats: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(batch.input_ids.device)
        for start in range(0, n, cfg.minibatch):
            for group in optimizer.param_groups:
                group["lr"] = ppo_math.learning_rate(cfg.lr_schedule, cfg.learner.lr, update, cfg.steps * per_step)
            update += 1
            rows = order[start:start + cfg.minibatch]
            mb = batch.select(rows)
            logprobs, _, values = model(mb, cfg.sampling.temperature)
            pg_loss, pg_stats = ppo_math.policy_loss(logprobs, scored["old_logprobs"][rows],
                                                     scored["advantages"][rows], mb.mask, cfg.clip_range,
                                                     weights=None if weights is None else weights[rows])
            vf_loss, vf_stats = ppo_math.value_loss(values, scored["values"][rows], scored["returns"][rows],
                                                    mb.mask, cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            for key, value in {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), **pg_stats,
                               **vf_stats}.items():
                stats.setdefault(key, []).append(float(value))
    return {**{key: sum(values) / len(values) for key, values in stats.items()},
            "lr": optimizer.param_groups[0]["lr"]}

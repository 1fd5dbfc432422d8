"""Training losses as plain tensor code (no Ray, no model): tested on hand-made tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_preference_loss(
    reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, chosen_prob: torch.Tensor
) -> torch.Tensor:
    """Bradley–Terry loss against a soft label (Bai et al. 2022, RL-CAI):

        -(p · log σ(r_c − r_r) + (1 − p) · log σ(r_r − r_c))

    Shapes: all three are ``(batch,)``; returns the batch mean. ``p = 1`` is the standard
    pairwise loss; ``p = 0.5`` is minimized at equal rewards. Written with ``logsigmoid``
    so large reward gaps do not overflow.
    """
    margin = reward_chosen - reward_rejected
    p = chosen_prob.to(margin.dtype)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


def pairwise_accuracy(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen answer gets the higher reward (ties count half)."""
    wins = (reward_chosen > reward_rejected).float() + 0.5 * (reward_chosen == reward_rejected).float()
    return wins.mean().item()

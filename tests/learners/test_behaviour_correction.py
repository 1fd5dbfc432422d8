"""The behaviour correction on a real model: a bf16 engine samples from a slightly different
distribution than the float32 learner computes, and the truncated importance weights
(core.ppo_math.truncated_is_weights, as learners/ppo_update.py applies them) remove that gap
from what the policy gradient sees.

Exact, not sampled: at each position of a sequence, over the whole vocabulary, the expected
per-token signal E_behaviour[w(x)·A(x)] is compared with E_proximal[A(x)], the value the
update would see had the learner's own policy sampled the tokens (A: any per-token advantage)."""

from __future__ import annotations

import torch

from core.ppo_math import truncated_is_weights

TEMPERATURE = 0.7  # the PPO tests' sampling temperature: log-probs of logits / T


def tempered_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].float() / TEMPERATURE, dim=-1)


def test_the_weights_remove_the_gap_of_a_bf16_engine_from_a_float32_learner(tiny_model):
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    engine = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()  # weights and math in bf16
    ids = torch.tensor([[1, 17, 45, 99, 230, 12, 7, 300, 64, 5]])
    proximal, behaviour = tempered_logprobs(learner, ids), tempered_logprobs(engine, ids)
    advantages = torch.randn(proximal.shape, generator=torch.Generator().manual_seed(0))

    weights, stats = truncated_is_weights(proximal, behaviour, torch.ones_like(proximal), cap=2.0)
    target = (proximal.exp() * advantages).sum(-1)
    uncorrected = (behaviour.exp() * advantages).sum(-1)
    corrected = (behaviour.exp() * weights * advantages).sum(-1)

    gap = (uncorrected - target).abs()
    assert gap.max() > 1e-5, f"bf16 shifts what the learner sees: {gap.tolist()}"
    assert (corrected - target).abs().max() < 1e-6, (corrected - target).tolist()
    assert (corrected - target).abs().mean() < gap.mean() / 100
    assert stats["is_clipped_frac"] == 0 and 0.99 < stats["is_weight_mean"] < 1.01  # bf16 rounding, well below the cap
    assert stats["behaviour_gap"] > 0

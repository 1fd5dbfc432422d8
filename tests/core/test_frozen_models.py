"""PPO's frozen reference and reward models on the tiny model, without Ray: frozen (no
gradients, so no optimizer state), in float32 or bfloat16, and the reference's numbers those
of ``sequence_logprobs``."""

from __future__ import annotations

import pytest
import torch

from core.frozen_models import (
    FrozenModels,
    frozen_parameter_bytes,
    resolve_frozen_dtype,
    unpack_rollouts,
)
from core.ppo_policy import pack_rollouts, sequence_logprobs
from core.rewards import RewardModelScorer

PROMPTS = [[10, 11, 12, 13], [20], [30, 31, 32]]
RESPONSES = [[40, 41], [50, 51, 52, 53], [60]]
QUESTIONS = ["Name a fruit.", "And a vegetable?", "Why is the sky blue?"]
ANSWERS = ["An apple.", "A carrot, or a leek.", "Light scatters."]


@pytest.fixture(scope="module")
def frozen(tiny_model, reward_model) -> dict[torch.dtype, FrozenModels]:
    return {dtype: FrozenModels(tiny_model, reward_model, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


@pytest.fixture(scope="module")
def batch():
    return pack_rollouts(PROMPTS, RESPONSES, pad_id=0)


def test_frozen_models_hold_no_gradients_and_no_dropout(frozen, batch):
    models = frozen[torch.float32]
    models.ref_logprobs(batch, 0.7)
    models.score(QUESTIONS, ANSWERS)
    assert len(models.modules()) == 2, "the reference and the reward model"
    for module in models.modules():
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
        assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))
        assert frozen_parameter_bytes(module) == sum(p.numel() * 4 for p in module.parameters())
    # nothing a loss could reach: an optimizer over these models would have no state to keep
    with pytest.raises(RuntimeError, match="does not require grad"):
        models.ref_logprobs(batch).sum().backward()
    with pytest.raises(RuntimeError, match="requires a gradient"):
        frozen_parameter_bytes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_reference_log_probs_are_sequence_logprobs_of_the_same_model(frozen, batch, tiny_model, temperature):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    logprobs = frozen[torch.float32].ref_logprobs(batch, temperature)
    assert logprobs.dtype == torch.float32 and logprobs.shape == batch.response.shape
    assert torch.allclose(logprobs, sequence_logprobs(reference, batch, temperature), atol=1e-6)


def test_bfloat16_models_give_float32_numbers_close_to_float32_ones_at_half_the_bytes(frozen, batch):
    full, half = frozen[torch.float32], frozen[torch.bfloat16]
    assert all(p.dtype == torch.bfloat16 for module in half.modules() for p in module.parameters())
    assert half.info()["dtype"] == "bfloat16" and full.info()["dtype"] == "float32"
    assert half.info()["parameter_bytes"] * 2 == full.info()["parameter_bytes"]
    exact, approx = full.ref_logprobs(batch, 0.7), half.ref_logprobs(batch, 0.7)
    assert approx.dtype == torch.float32
    gap = ((exact - approx).abs() * batch.mask).max()
    assert gap < 2e-2, f"bf16 reference log-probs differ by {gap:.4f}"
    assert gap > 0, "the bf16 model really computed in bf16"


def test_a_bfloat16_reward_model_scores_like_the_float32_one(reward_model, frozen):
    scorer = RewardModelScorer(reward_model, dtype=torch.bfloat16)
    assert scorer.model.dtype == torch.bfloat16
    assert RewardModelScorer(reward_model).model.dtype == torch.float32, "float32 stays the default"
    half = scorer(QUESTIONS, ANSWERS)
    assert all(isinstance(s, float) for s in half)
    assert frozen[torch.bfloat16].score(QUESTIONS, ANSWERS) == half
    assert half == pytest.approx(frozen[torch.float32].score(QUESTIONS, ANSWERS), abs=5e-2)


def test_a_reward_function_needs_no_model(tiny_model):
    models = FrozenModels(tiny_model, reward_fn="vowel_share")
    assert models.score(["q", "q"], ["aaa", "xyz"]) == [1.0, 0.0]
    assert len(models.modules()) == 1
    with pytest.raises(ValueError, match="exactly one of"):
        FrozenModels(tiny_model)


def test_unpacked_rollouts_pack_back_into_the_same_batch(batch):
    prompts, responses, pad_id = unpack_rollouts(pack_rollouts(PROMPTS, RESPONSES, pad_id=7))
    assert (prompts, responses, pad_id) == (PROMPTS, RESPONSES, 7)
    again = pack_rollouts(*unpack_rollouts(batch))
    for field in ("input_ids", "attention_mask", "position_ids", "response", "mask"):
        assert torch.equal(getattr(again, field), getattr(batch, field)), field
    assert unpack_rollouts(pack_rollouts([[1, 2]], [[3]], pad_id=5))[2] == 0, "nothing padded"


def test_frozen_dtype_option():
    assert resolve_frozen_dtype("auto", use_gpu=True) == torch.bfloat16
    assert resolve_frozen_dtype("auto", use_gpu=False) == torch.float32
    assert resolve_frozen_dtype("bfloat16", use_gpu=False) == torch.bfloat16
    assert resolve_frozen_dtype("float32", use_gpu=True) == torch.float32
    with pytest.raises(ValueError, match="frozen_dtype"):
        resolve_frozen_dtype("float16", use_gpu=True)

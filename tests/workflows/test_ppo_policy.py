"""The PPO learner's batch layout and models on the tiny model, without Ray."""

from __future__ import annotations

import torch

from workflows.ppo_learner import step_prompts
from workflows.ppo_policy import load_actor_critic, pack_rollouts, sequence_logprobs, weights_blob


def test_pack_rollouts_aligns_every_response_at_one_column():
    batch = pack_rollouts([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.response.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_padded_log_probs_equal_each_sequence_alone(tiny_model):
    """Left padding with real-token positions must not change a single log-prob."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts, responses = [[10, 11, 12, 13], [20]], [[30, 31], [40, 41, 42]]
    together = sequence_logprobs(model, pack_rollouts(prompts, responses, pad_id=0))
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        alone = sequence_logprobs(model, pack_rollouts([prompt], [response], pad_id=0))[0]
        assert torch.allclose(together[row, :len(response)], alone[:len(response)], atol=1e-5)


def test_actor_critic_starts_at_the_policy_with_zero_values(tiny_model):
    from transformers import AutoModelForCausalLM

    model = load_actor_critic(tiny_model, tiny_model).eval()
    batch = pack_rollouts([[10, 11], [12]], [[13, 14], [15]], pad_id=0)
    logprobs, entropy, values = model(batch)
    reference = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), batch)
    assert torch.allclose(logprobs, reference, atol=1e-5)
    assert values.abs().max() == 0, "fresh value head"
    assert (entropy > 0).all()


def test_weights_blob_holds_every_parameter_once(tiny_model):
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tensors = load(weights_blob(model))
    assert set(tensors) == {name for name, _ in model.named_parameters()}


def test_step_prompts_split_a_seeded_order_over_ranks():
    both = step_prompts(10, 0, 4, 0, 2, seed=1) + step_prompts(10, 0, 4, 1, 2, seed=1)
    assert len(set(both)) == 4 and both == step_prompts(10, 0, 4, 0, 1, seed=1)
    # three steps of 4 cover one pass of 10 and start the next: each prompt once per pass
    first_pass = [i for step in range(3) for i in step_prompts(10, step, 4, 0, 1, seed=1)][:10]
    assert sorted(first_pass) == list(range(10))

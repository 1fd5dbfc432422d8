"""The PPO policy and value models and their batch layout, on the tiny model, without Ray."""

from __future__ import annotations

import pytest
import torch

from core.ppo_policy import (
    ActorCritic,
    disable_dropout,
    load_actor_critic,
    pack_rollouts,
    sequence_logprobs,
    weights_blob,
)


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


def test_weights_blob_holds_every_tensor_of_the_state(tiny_model):
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tensors = load(weights_blob(model.state_dict()))
    assert set(tensors) == {name for name, _ in model.named_parameters()}
    assert all(torch.equal(tensors[name], p.detach()) for name, p in model.named_parameters())


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_log_probs_are_those_of_the_tempered_distribution(tiny_model, temperature):
    """log π(token) = log softmax(logits / T): the distribution the engines sample at T."""
    from transformers import AutoModelForCausalLM

    model = load_actor_critic(tiny_model, tiny_model).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = pack_rollouts([[10, 11, 12], [20]], [[30, 31], [40, 41, 42]], pad_id=0)
    with torch.no_grad():
        logits = model.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).logits
        logprobs, entropy, _ = model(batch, temperature)
    columns = logits[:, batch.prompt_width - 1:batch.prompt_width - 1 + batch.response.shape[1]]
    tempered = torch.log_softmax(columns / temperature, dim=-1)
    expected = tempered.gather(-1, batch.response.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=1e-6)
    assert torch.allclose(sequence_logprobs(ref, batch, temperature), expected, atol=1e-6)
    assert torch.allclose(entropy, -(tempered.exp() * tempered).sum(-1), atol=1e-5)
    assert not torch.allclose(logprobs, model(batch)[0], atol=1e-3), "T = 1 gives other numbers"


def with_dropout(tiny_model: str, out) -> str:
    """The tiny model with attention dropout 0.5 (transformers passes it to the attention kernel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attention_dropout=0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


def test_dropout_is_off_in_the_learner_models_in_train_mode(tiny_model, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = with_dropout(tiny_model, tmp_path / "dropout")
    batch = pack_rollouts([[10, 11, 12]], [[30, 31, 32]], pad_id=0)
    model = load_actor_critic(path, path).train()
    first, second = model(batch)[0], model(batch)[0]
    assert torch.equal(first, second), "the first-epoch ratio is exactly 1"
    with torch.no_grad():
        assert torch.equal(first, model.eval()(batch)[0])
    # nn.Dropout modules (GPT-2's residual, embedding and attention dropout) too
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).train()
    assert disable_dropout(gpt2) > 0
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(gpt2(ids).logits, gpt2(ids).logits)


def test_value_model_starts_as_the_reward_model(tiny_model, tmp_path):
    """Given a reward model, the value at column t is the RM's score of the prompt and the
    first t response tokens (its head included, not a fresh zero head)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    rm.save_pretrained(tmp_path / "rm")
    model = load_actor_critic(tiny_model, str(tmp_path / "rm")).eval()
    batch = pack_rollouts([[10, 11, 12]], [[30, 31, 32, 33]], pad_id=0)
    with torch.no_grad():
        _, _, values = model(batch)
        for t in range(4):
            ids = batch.input_ids[:, :batch.prompt_width + t]
            score = rm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
            assert values[0, t] == pytest.approx(score.item(), abs=1e-5)
    assert values.abs().max() > 0


def test_log_probs_in_chunks_equal_the_whole_and_so_do_their_gradients(tiny_model):
    """response_logprobs: one chunk of response tokens in float32 at a time (recomputed in the
    backward), and the head computes the response columns only (logits_to_keep)."""
    from core.ppo_math import entropy_from_logits, logprobs_from_logits
    from transformers import AutoModelForCausalLM

    from core.ppo_policy import pack_rollouts, response_logits_kwargs, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = pack_rollouts([[10, 11, 12, 13, 14], [20, 21], [30]], [[40, 41, 42], [50], [60, 61]], pad_id=0)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    assert response_logits_kwargs(model, batch) == {"logits_to_keep": 4}
    whole_logits = model(**inputs).logits
    start = batch.prompt_width - 1
    scaled = whole_logits[:, start:start + 3].float() / 0.7
    expected = logprobs_from_logits(scaled, batch.response), entropy_from_logits(scaled)
    (expected[0].sum() + expected[1].sum()).backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kept = model(**inputs, **response_logits_kwargs(model, batch)).logits
    assert kept.shape[1] == 4 < whole_logits.shape[1]
    logprobs, entropy = response_logprobs(kept, batch, 0.7, with_entropy=True, chunk_tokens=3)  # one row a chunk
    torch.testing.assert_close(logprobs, expected[0])
    torch.testing.assert_close(entropy, expected[1])
    (logprobs.sum() + entropy.sum()).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], msg=name)

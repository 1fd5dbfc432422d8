"""The PPO learner's step on the tiny model, without Ray: prompt order, devices, the update."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from core.ppo_policy import ActorCritic, pack_rollouts, sequence_logprobs
from learners.rollout_schedule import step_prompts


def test_step_prompts_split_a_seeded_order_over_ranks():
    both = step_prompts(10, 0, 4, 0, 2, seed=1) + step_prompts(10, 0, 4, 1, 2, seed=1)
    assert len(set(both)) == 4 and both == step_prompts(10, 0, 4, 0, 1, seed=1)
    # three steps of 4 cover one pass of 10 and start the next: each prompt once per pass
    first_pass = [i for step in range(3) for i in step_prompts(10, step, 4, 0, 1, seed=1)][:10]
    assert sorted(first_pass) == list(range(10))


class MetaScalars(TorchFunctionMode):
    """Lets a step run with its models on the ``meta`` device: scalars read back for logging
    (``.item()``, ``bool``) become 0/False, everything else runs as is. Mixing a ``meta``
    tensor with a CPU tensor still raises, as CPU with CUDA would."""

    READS = {torch.Tensor.item: 0.0, torch.Tensor.__bool__: False, torch.Tensor.__float__: 0.0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and args[0].is_meta:
            return self.READS[func]
        return func(*args, **(kwargs or {}))


class Reference:
    """The frozen-models interface over one reference model (the learner's own path)."""

    def __init__(self, model):
        self.model = model

    def ref_logprobs(self, batch, temperature=1.0):
        return sequence_logprobs(self.model, batch, temperature)


def test_the_learner_step_moves_every_tensor_to_the_models_device(tiny_model):
    """The models on ``meta`` stand for a GPU: any input left on the CPU fails the step."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from core.config import load_config
    from learners.ppo_config import PPOConfig
    from learners.ppo_update import learn_from_rollouts, score_rollouts

    config = AutoConfig.from_pretrained(tiny_model)
    with torch.device("meta"):
        core = ActorCritic(AutoModelForCausalLM.from_config(config), AutoModel.from_config(config))
        ref = Reference(AutoModelForCausalLM.from_config(config))
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-3)
    settings = load_config(PPOConfig, overrides=dict(
        policy=tiny_model, prompts="p.jsonl", out="o", reward_fn="vowel_share", rollout_batch=2, minibatch=1,
        ppo_epochs=2, temperature=0.7, lr=1e-3, lr_schedule="linear", steps=1))
    prompts, responses, scores = [[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [0.5, 1.0]
    with MetaScalars():
        batch, scored, stats = learn_from_rollouts(core, core, ref, optimizer, prompts, responses, scores, settings,
                                                   0.01, pad_id=0, seed=0)
        assert batch.input_ids.is_meta and all(t.is_meta for t in scored.values())
        assert set(stats) >= {"policy_loss", "value_loss", "clipfrac"}
        # 2 epochs x 2 minibatches of one row: the 4th update of 4 runs at 1/4 of the rate
        assert stats["lr"] == pytest.approx(2.5e-4)
        # the check itself: the same scoring with the batch left on the CPU fails
        with pytest.raises(RuntimeError, match="device"):
            score_rollouts(core, ref, pack_rollouts(prompts, responses, 0), torch.tensor(scores), settings, 0.01)


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_model):
    """Recomputing each block's activations in the backward pass gives the same update."""
    from transformers import AutoModelForCausalLM

    from core.config import load_config
    from core.ppo_policy import load_actor_critic
    from learners.ppo_config import PPOConfig
    from learners.ppo_update import learn_from_rollouts

    settings = load_config(PPOConfig, overrides=dict(
        policy=tiny_model, prompts="p.jsonl", out="o", reward_fn="vowel_share", rollout_batch=4, minibatch=2,
        ppo_epochs=1, temperature=0.7, lr=1e-3, steps=1))
    reference = Reference(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval())
    prompts, responses, scores = [[5, 6, 7], [8], [9, 10], [11]], [[1, 2], [3, 4, 9], [12], [13, 14]], [0.5, 1, 0, 0.2]
    results = []
    for recompute in (False, True):
        core = load_actor_critic(tiny_model, tiny_model)
        if recompute:
            for part in (core.policy, core.value_backbone):
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(core.parameters(), lr=1e-3)
        _, _, stats = learn_from_rollouts(core, core, reference, optimizer, prompts, responses, scores, settings,
                                          0.01, pad_id=0, seed=0)
        results.append((stats, {name: p.detach().clone() for name, p in core.named_parameters()}))
    (plain, plain_weights), (recomputed, recomputed_weights) = results
    assert core.policy.is_gradient_checkpointing
    assert recomputed["policy_loss"] == pytest.approx(plain["policy_loss"], abs=1e-6)
    assert all(torch.allclose(plain_weights[n], recomputed_weights[n], atol=1e-6) for n in plain_weights)

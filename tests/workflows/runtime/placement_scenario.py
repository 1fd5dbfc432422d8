"""Placement on a fake GPU cluster (two 2-GPU nodes, one 4-GPU node); run as a script, writes
JSON results.

``test_placement.py`` runs this in a subprocess so the pytest process's own Ray instance
(the session-scoped ``ray_local``) is never shut down or replaced. The caller sets
``RAY_TMPDIR`` to a private folder: ``Cluster`` writes its address to
``$RAY_TMPDIR/ray/ray_current_cluster``, and a plain ``ray.init()`` anywhere else on the
machine would otherwise join this fake cluster while it runs.

Usage: python placement_scenario.py RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
from ray.cluster_utils import Cluster

from actors.engine import EngineOptions, engine_args
from actors.engine_config import EngineConfig
from workflows.runtime.placement import (
    PlacementError,
    WorkerResources,
    bundle_options,
    release,
    reserve_workers,
    workers_that_fit,
)

SMALL_STORE = 80 * 1024 * 1024  # the object store is unused; keep four nodes' shm small


@ray.remote
class Probe:
    """Stands in for an engine actor: reports where Ray put it, which GPUs it got, and the
    arguments ``VLLMEngineHost`` would hand vLLM there (no vLLM needed)."""

    def where(self, engine: EngineOptions) -> dict:
        context = ray.get_runtime_context()
        args = engine_args(engine, dtype="float16")
        return {
            "node_id": context.get_node_id(),
            "gpu_ids": context.get_accelerator_ids()["GPU"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            # vLLM's default executor turns to Ray when this holds: why engine_args names "mp"
            "in_placement_group": ray.util.get_current_placement_group() is not None,
            "engine_tp": args["tensor_parallel_size"],
            "engine_executor": args.get("distributed_executor_backend"),
        }


def probe_pool(n_workers: int, resources: WorkerResources, tensor_parallel: int) -> list[dict]:
    """Place ``n_workers`` probes as a workflow places engines, with ``--tensor-parallel``
    ``tensor_parallel`` (the engine options) and ``resources`` (the pool's bundle)."""
    pg = reserve_workers(n_workers, resources, timeout_s=30, name=f"probe-{resources.gpus:g}")
    try:
        engine = EngineOptions(model="unused", config=EngineConfig(tensor_parallel=tensor_parallel))
        options = [bundle_options(pg, i, resources) for i in range(n_workers)]
        probes = [Probe.options(**option).remote() for option in options]
        placed = ray.get([p.where.remote(engine) for p in probes], timeout=30)
        for i, (option, where) in enumerate(zip(options, placed)):
            where["bundle_gpus"] = pg.bundle_specs[i].get("GPU", 0)
            where["actor_num_gpus"] = option["num_gpus"]
        return placed
    finally:
        release(pg)  # also kills the probes
        wait_until_all_free()


def wait_until_all_free(timeout_s: float = 20) -> None:
    """Removal is asynchronous; SPREAD can only spread over nodes whose GPUs are free again."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources().get("GPU", 0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"GPUs still held {timeout_s} s after release: {ray.available_resources()}")
        time.sleep(0.1)


def main(result_path: str) -> None:
    started = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "object_store_memory": SMALL_STORE},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=SMALL_STORE)
    cluster.add_node(num_cpus=2, num_gpus=4, object_store_memory=SMALL_STORE)  # the only node for TP 4
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"startup_s": round(time.monotonic() - started, 1)}
    try:
        result["tp4"] = probe_pool(1, WorkerResources(cpus=1, gpus=4), tensor_parallel=4)
        result["tp2"] = probe_pool(2, WorkerResources(cpus=1, gpus=2), tensor_parallel=2)
        result["tp1_spread"] = probe_pool(2, WorkerResources(cpus=1, gpus=1), tensor_parallel=1)
        pg = reserve_workers(1, WorkerResources(cpus=1), name="released-twice")
        release(pg)
        release(pg)  # must be a no-op
        result["fit"] = {
            "gpu2": workers_that_fit(WorkerResources(cpus=1, gpus=2)),
            "gpu1": workers_that_fit(WorkerResources(cpus=1, gpus=1)),
            "cpu1": workers_that_fit(WorkerResources(cpus=1)),
            "cpu2_gpu1": workers_that_fit(WorkerResources(cpus=2, gpus=1)),
            "gpu4": workers_that_fit(WorkerResources(cpus=1, gpus=4)),
        }
        result["node_gpus"] = sorted(node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"])
        asked = time.monotonic()
        try:
            reserve_workers(5, WorkerResources(cpus=1, gpus=2), timeout_s=5, name="too-big")
            result["too_big"] = {"raised": False}
        except PlacementError as error:
            result["too_big"] = {"raised": True, "message": str(error)}
        result["too_big"]["seconds"] = round(time.monotonic() - asked, 1)
        result["pg_states"] = sorted(
            {entry["name"]: entry["state"] for entry in ray.util.placement_group_table().values()}.items()
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["total_s"] = round(time.monotonic() - started, 1)
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

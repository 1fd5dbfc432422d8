"""Placement on a fake two-GPU-node Ray cluster; run as a script, writes JSON results.

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

from workflows.placement import (
    PlacementError,
    WorkerResources,
    bundle_options,
    release,
    reserve_workers,
    workers_that_fit,
)

SMALL_STORE = 80 * 1024 * 1024  # the object store is unused; keep three nodes' shm small


@ray.remote
class Probe:
    """Stands in for an engine actor: reports where Ray put it and which GPUs it got."""

    def where(self) -> dict:
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "gpu_ids": context.get_accelerator_ids()["GPU"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def probe_pool(n_workers: int, resources: WorkerResources) -> list[dict]:
    pg = reserve_workers(n_workers, resources, timeout_s=30, name=f"probe-{resources.gpus:g}")
    try:
        probes = [Probe.options(**bundle_options(pg, i, resources)).remote() for i in range(n_workers)]
        return ray.get([p.where.remote() for p in probes], timeout=30)
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
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"startup_s": round(time.monotonic() - started, 1)}
    try:
        result["tp2"] = probe_pool(2, WorkerResources(cpus=1, gpus=2))
        result["tp1_spread"] = probe_pool(2, WorkerResources(cpus=1, gpus=1))
        pg = reserve_workers(1, WorkerResources(cpus=1), name="released-twice")
        release(pg)
        release(pg)  # must be a no-op
        result["fit"] = {
            "gpu2": workers_that_fit(WorkerResources(cpus=1, gpus=2)),
            "gpu1": workers_that_fit(WorkerResources(cpus=1, gpus=1)),
            "cpu1": workers_that_fit(WorkerResources(cpus=1)),
            "cpu2_gpu1": workers_that_fit(WorkerResources(cpus=2, gpus=1)),
        }
        asked = time.monotonic()
        try:
            reserve_workers(3, WorkerResources(cpus=1, gpus=2), timeout_s=5, name="too-big")
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

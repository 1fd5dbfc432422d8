"""Model preflight on a fake cluster whose two worker nodes have separate local disks.

``test_model_preflight.py`` runs this in a subprocess (like ``placement_scenario.py``) with a
private ``RAY_TMPDIR``. The head has no CPUs, so every task runs on node A or node B. Each
worker node's raylet gets its own ``TMPDIR`` through ``Cluster.add_node(env_vars=...)``
(``RayParams.env_vars``: raylet environment overrides, which its worker processes inherit;
Ray's own folders follow ``RAY_TMPDIR``, which wins), so the two nodes stage models into
different temp folders, as separate local disks would.

Usage: python model_preflight_scenario.py RESULT.json WORK_DIR MODEL_DIR  (a tiny model, read only)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.atomic_files import exclusive_lock
from actors.model_source import CACHE_ENV, STAGED_MARKER, STAGING_FOLDER, ModelNotOnNodeError, resolve_on_node
from workflows.runtime.model_preflight import (
    ModelPreflightError,
    model_source,
    nodes_of_placement_group,
    preflight_log,
    preflight_models,
)

SMALL_STORE = 80 * 1024 * 1024
CHUNK = 256 * 1024  # several chunks per weight file, so reassembly is exercised


def on(node_id: str) -> dict:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


@ray.remote(num_cpus=0)
def node_cache() -> str:
    return tempfile.gettempdir()


@ray.remote(num_cpus=0)
def stage_after_barrier(source, barrier: str, n_callers: int) -> dict:
    """Waits until ``n_callers`` workers have arrived, then all resolve at once."""
    Path(barrier, str(os.getpid())).touch()
    deadline = time.monotonic() + 20
    while len(os.listdir(barrier)) < n_callers and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = len(os.listdir(barrier))
    path, copied = resolve_on_node(source)
    return {"arrived": arrived, "path": path, "copied_bytes": copied}


@ray.remote(num_cpus=0)
class ModelUser:
    """Stands in for an engine host: resolves its model where it runs and loads the config."""

    def load(self, source) -> dict:
        from transformers import AutoConfig

        path = source.local_path()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "path": path,
            "model_type": AutoConfig.from_pretrained(path).model_type,
        }

    def error_of(self, source) -> str:
        try:
            source.local_path()
        except ModelNotOnNodeError as error:
            return str(error)
        return ""


def variant(model: Path, out: Path, tag: str) -> Path:
    """A copy of ``model`` with a different config.json, hence a different fingerprint."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config["variant_tag"] = tag
    (out / "config.json").write_text(json.dumps(config))
    return out


def stage_variant(model: Path, work: Path, tag: str):
    folder = variant(model, work / f"tiny-{tag}", tag)
    return model_source(str(folder), spec=f"tiny-{tag}", stage=True, chunk_bytes=CHUNK)


def expect_error(sources, nodes, timeout_s) -> dict:
    started = time.monotonic()
    try:
        preflight_models(sources, nodes, timeout_s=timeout_s)
        return {"raised": False}
    except ModelPreflightError as error:
        return {"raised": True, "message": str(error), "seconds": round(time.monotonic() - started, 1)}


def marker_state(cache: Path) -> dict:
    return {
        str(marker.relative_to(cache)): [marker.stat().st_ino, marker.read_text()]
        for marker in sorted(cache.glob(f"{STAGING_FOLDER}/*/{STAGED_MARKER}"))
    }


def main(result_path: str, work_dir: str, model_dir: str) -> None:
    started = time.monotonic()
    work = Path(work_dir)
    caches = {"a": work / "cache-a", "b": work / "cache-b"}
    os.environ[CACHE_ENV] = str(work / "cache-driver")  # the shared cache, which staging never writes
    for cache in caches.values():
        cache.mkdir()  # gettempdir() passes over a TMPDIR that does not exist
    model = Path(model_dir)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": SMALL_STORE},
    )
    nodes = {
        name: cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE, env_vars={"TMPDIR": str(cache)})
        for name, cache in caches.items()
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ids = {name: node.node_id for name, node in nodes.items()}
    both = [ids["a"], ids["b"]]
    result: dict = {"ids": ids, "caches": {k: str(v) for k, v in caches.items()}}
    result["startup_s"] = round(time.monotonic() - started, 1)
    try:
        result["node_cache"] = {name: ray.get(node_cache.options(**on(i)).remote()) for name, i in ids.items()}

        # A folder every node sees (one disk here): passes everywhere.
        shared = model_source(str(model), spec="tiny", stage=False)
        report = preflight_models([shared], both, timeout_s=30)
        result["path_ok"] = {
            "paths": {n: report[i]["paths"] for n, i in ids.items()},
            "log": preflight_log([shared], report),
        }

        # On one machine every node shares the filesystem, so a folder cannot be absent from
        # just one node without mount namespaces. What the workers check is the same either way:
        # the folder the driver described is gone by the time they look, on every node; the
        # error must name both nodes and the path.
        gone = model_source(str(variant(model, work / "tiny-gone", "gone")), spec="tiny-gone", stage=False)
        shutil.rmtree(gone.path)
        result["path_missing"] = expect_error([gone], both, timeout_s=30) | {"path": gone.path}

        # A genuinely node-specific failure: node B's staging folder is a file, so only B cannot
        # stage there. A stages normally; the error names B alone.
        (caches["b"] / STAGING_FOLDER).write_text("not a directory")
        other = stage_variant(model, work, "other")
        result["stage_b_broken"] = expect_error([other], both, timeout_s=30)
        (caches["b"] / STAGING_FOLDER).unlink()
        result["markers_after_broken"] = {n: marker_state(c) for n, c in caches.items()}

        # Staging: each node copies once into its own cache; a second preflight copies nothing.
        staged = model_source(str(model), spec="tiny", stage=True, chunk_bytes=CHUNK)
        result["n_chunks"] = sum(len(refs) for _, refs in staged.blobs)
        first = preflight_models([staged], both, timeout_s=30)
        markers_first = {n: marker_state(c) for n, c in caches.items()}
        second = preflight_models([staged], both, timeout_s=30)
        users = {n: ModelUser.options(**on(i)).remote() for n, i in ids.items()}
        loaded = {n: ray.get(user.load.remote(staged), timeout=60) for n, user in users.items()}
        result["staged"] = {
            "first": {n: first[i] for n, i in ids.items()},
            "second": {n: second[i] for n, i in ids.items()},
            "log_first": preflight_log([staged], first),
            "log_second": preflight_log([staged], second),
            "markers_first": markers_first,
            "markers_after": {n: marker_state(c) for n, c in caches.items()},
            "loaded": loaded,
            "error_in_actor_b": ray.get(users["b"].error_of.remote(gone), timeout=30),
        }
        for user in users.values():
            ray.kill(user)

        pg = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
        ray.get(pg.ready(), timeout=30)
        result["pg_nodes"] = nodes_of_placement_group(pg)
        ray.util.remove_placement_group(pg)

        # Three workers on node A ask for the same new staged model at the same moment.
        racing = stage_variant(model, work, "race")
        barrier = work / "barrier"
        barrier.mkdir()
        calls = [stage_after_barrier.options(**on(ids["a"])).remote(racing, str(barrier), 3) for _ in range(3)]
        result["race"] = ray.get(calls, timeout=60)

        # A node that does not answer: the driver holds node B's staging lock (alive, its
        # heartbeat moving), so B's copy blocks; the preflight must give up after its timeout
        # and name B.
        slow = stage_variant(model, work, "slow")
        with exclusive_lock(caches["b"] / STAGING_FOLDER / f".tiny-slow-{slow.fingerprint[:12]}.lock"):
            result["hung_node"] = expect_error([slow], both, timeout_s=5)

        # A node removed before the preflight: reported within the timeout, not waited on.
        cluster.remove_node(nodes["b"], allow_graceful=False)
        result["dead_node"] = expect_error([shared], both, timeout_s=8)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["total_s"] = round(time.monotonic() - started, 1)
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

"""`cai generate` on a multi-node Ray cluster that grows and loses nodes; writes JSON results.

``test_node_loss.py`` runs this in a subprocess with a private ``RAY_TMPDIR`` (see
``placement_scenario.py`` for why). The head has no CPUs, so every engine runs on a worker
node, and the run goes through, in order:

1. no worker node: the pool waits for placement (and says so) instead of failing;
2. two 1-CPU nodes join mid-wait: the two engines start and shards flow; the fault drill
   ``--kill-worker-at-shard 3`` kills the worker handed the 3rd shard, so a shard in flight is
   lost and redone whatever the timing below (a removed node's worker may be between shards);
3. a spare node joins and the node of a worker that has finished a shard (so it is up, with
   shards in flight) is removed, its worker process killed with it: its shards go back to the queue and its bundle moves to the
   spare node; the run goes on until the hold drill
   (``--hold-after-shard``) stops it handing out shards, so it is still running, whatever the
   engines' speed, when
4. every worker node is removed: the run stops with a clear error once the placement timeout
   has passed with no worker up, its finished shards kept;
5. a 2-CPU node with its own local disk (TMPDIR) joins and the same command is run again with
   ``--stage-model``: the model is copied to that node once and the run finishes the rest.

Usage: python node_loss_scenario.py RESULT.json WORK_DIR MODEL_DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from tests.workflows.runtime.cluster_scenario import done_shards, finish_scenario, generate_config
from workflows.generate import run_generate
from workflows.runtime.ray_session import connect_ray

SMALL_STORE = 80 * 1024 * 1024
# 24 shards of 2: the run holds after 16 (4 before the node loss, the lost node's shards redone,
# more on the moved worker), and the rerun on the new node finishes the rest.
PROMPTS = 48
HOLD_AFTER_SHARD = 16
PLACEMENT_TIMEOUT_S = 15  # the nodes join 6 s into the first wait


def wait_until(predicate, timeout: float, what: str) -> None:
    wait_for(lambda: True if predicate() else None, timeout, what)


def wait_for(value, timeout: float, what: str):
    """The first value of ``value()`` that is not None, polled every 0.2 s up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while (found := value()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)
    return found


def a_working_slot(run_dir: Path, run_name: str) -> tuple[int, int] | None:
    """(pool slot, pid) of a worker that has finished a shard (the manifest names who did each:
    ``<actor name> <host>:<pid>``), so it is up and, while shards are queued, has more in
    flight; None before any."""
    shards = json.loads((run_dir / "manifest.json").read_text())["shards"].values()
    prefix = f"cai-generate-{run_name}-"
    for worker in (s["worker"] for s in shards if s["status"] == "done" and s["worker"].startswith(prefix)):
        name, where = worker.split()
        return int(name.removeprefix(prefix).split(".")[0]), int(where.rsplit(":", 1)[1])
    return None


def bundle_node(run_dir: Path, index: int) -> str:
    """The node id that bundle ``index`` of the run's placement group is on."""
    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"]
    pg = ray.util.get_placement_group(f"cai-generate-{run_id}")
    return ray.util.placement_group_table(pg)["bundles_to_node_id"][index]


def main(result_path: str, work: str, model: str) -> None:
    work_dir = Path(work)
    out = work_dir / "run"
    config = generate_config(model, work_dir, PROMPTS, workers=2, max_new_tokens=32,
                             placement_timeout=PLACEMENT_TIMEOUT_S, hold_after_shard=HOLD_AFTER_SHARD,
                             kill_worker_at_shard=3)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": SMALL_STORE})
    connect_ray(address=cluster.address)
    result: dict = {"phase_seconds": {}}
    outcome: dict = {}
    began = time.monotonic()

    def phase(name: str) -> None:  # when each phase ended, for whoever makes the scenario faster
        result["phase_seconds"][name] = round(time.monotonic() - began, 1)

    def run() -> None:
        try:
            outcome["summary"] = run_generate(config)
        except Exception as exc:  # noqa: BLE001 - the scenario expects one
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["error_at"] = time.monotonic()

    try:
        driver = threading.Thread(target=run, daemon=True)
        driver.start()
        # 1. nothing fits: the run waits
        time.sleep(6)  # the first "waiting" line comes after 5 s (placement.FIRST_REPORT_S)
        result["waited_without_nodes"] = driver.is_alive() and not (out / "data").exists()
        # 2. nodes join mid-wait
        workers = [cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE) for _ in range(2)]
        wait_until(lambda: done_shards(out) >= 4, 300, "no shard finished after nodes joined")
        run_name = json.loads((out / "manifest.json").read_text())["run_id"]
        slot, pid = wait_for(lambda: a_working_slot(out, run_name), 60,
                             "the manifest names no worker of a finished shard")
        result["shards_before_node_loss"] = done_shards(out)
        phase("nodes joined, 4 shards done")
        # 3. a spare joins; the node of a working worker goes, with its shards in flight
        spare = cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
        victim_id = bundle_node(out, slot)
        victim = next(node for node in workers if node.node_id == victim_id)
        # The node goes with its processes, as a lost machine does: these raylets share one
        # machine, and a worker outlives its removed raylet by a second or two, long enough to
        # finish the shards it holds (CI saw nothing retried). Its pid is the manifest's.
        with contextlib.suppress(ProcessLookupError):  # gone already: the worker the drill killed
            os.kill(pid, signal.SIGKILL)
        cluster.remove_node(victim, allow_graceful=False)
        workers.remove(victim)
        workers.append(spare)
        wait_until(lambda: bundle_node(out, slot) == spare.node_id, 120,
                   f"worker {slot}'s bundle never moved to the spare")
        result["bundle_moved_to_spare"] = True
        result["shards_when_bundle_moved"] = done_shards(out)
        wait_until(lambda: done_shards(out) >= HOLD_AFTER_SHARD or not driver.is_alive(), 300,
                   f"the run never reached its hold after {HOLD_AFTER_SHARD} shards")
        phase(f"node lost, bundle moved, held after {HOLD_AFTER_SHARD} shards")
        # 4. every worker node goes
        result["shards_before_total_loss"] = done_shards(out)
        result["still_running_before_total_loss"] = driver.is_alive()
        if not driver.is_alive():
            raise RuntimeError(f"the run ended before the total loss, though held ({outcome})")
        lost_at = time.monotonic()
        for node in workers:
            cluster.remove_node(node, allow_graceful=False)
        driver.join(timeout=PLACEMENT_TIMEOUT_S + 180)
        result["stopped"] = not driver.is_alive()
        result["error"] = outcome.get("error", "")
        result["seconds_to_error"] = round(outcome.get("error_at", time.monotonic()) - lost_at, 1)
        result["shards_kept"] = done_shards(out)
        phase("every node lost, run stopped")
        # 5. a node with its own disk (its TMPDIR) joins; the same command, with --stage-model,
        # copies the model there through the object store and finishes the rest
        node_cache = work_dir / "node-cache"
        node_cache.mkdir()  # gettempdir() passes over a TMPDIR that does not exist
        cluster.add_node(num_cpus=2, object_store_memory=SMALL_STORE, env_vars={"TMPDIR": str(node_cache)})
        # one worker: the few shards left need no second engine start (--workers is not part of
        # the run's identity, so this is still the same run)
        staged = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, stage_model=True),
                                     pool=dataclasses.replace(config.pool, hold_after_shard=0, workers=1))
        summary = run_generate(staged)
        result["staged_copies"] = sorted(p.parent.name for p in node_cache.glob("ray-cai-staged/*/.ray-cai-staged"))
        result["rerun"] = {k: summary[k] for k in ("rows_in", "rows_out", "rejected", "run_id")}
        phase("rerun finished")
        import pyarrow.parquet as pq

        rows = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p, columns=["index"]).to_pylist()]
        result["indexes"] = sorted(r["index"] for r in rows)
        manifest = json.loads((out / "manifest.json").read_text())
        result["retried_shards"] = sum(s["attempts"] > 1 for s in manifest["shards"].values())
        result["prompts"] = PROMPTS
        result["placement_timeout"] = PLACEMENT_TIMEOUT_S
    finally:
        finish_scenario(result_path, result, cluster)


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Run a sharded stage (generate, label): the machinery every stage shares.

Run directory and manifest → stage the inputs into shards → Ray, worker placement and a
fault-tolerant pool of actors pulling shards → write each shard as it finishes → check that
every input row is accounted for → summary. A stage brings its worker class (a plain class
with ``ready()`` and ``async run_shard(shard, rows)``), its output schema and the settings
that identify a run.

``run_shard`` returns ``{"rows", "rejects", "tokens", "seconds", "worker",
"occupancy_sum", "occupancy_samples"}``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from core.config import failing, option
from core.manifest import RunManifest, ShardState
from core.shards import completed_shards, read_shard_inputs, stage_inputs, verify_run, write_shard_output
from workflows.runtime.cluster_options import ClusterOptions
from workflows.runtime.placement import (
    WorkerResources,
    bundle_options,
    pending_detail,
    release,
    reserve_workers,
    unplaced_bundles,
    workers_that_fit,
)
from workflows.runtime.progress import RunProgress
from workflows.runtime.ray_session import NAMESPACE, connect_ray
from workflows.runtime.shard_pool import ShardQueue, run_shard_pool


@dataclass(frozen=True)
class PoolConfig:
    """How a stage fans out: shards, workers and their resources, retries."""

    shard_size: int = option(64, "prompts per shard: the unit of scheduling, writing and retry", identity=True)
    limit: int = option(0, "use only the first N prompts; 0 = all", identity=True)
    workers: int = option(0, "worker actors (one engine each); 0 = as many as the cluster's resources fit")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    gpus_per_worker: float = option(0.0, "GPUs reserved per worker (at least --tensor-parallel on GPU nodes)")
    inflight_shards: int = option(2, "shards in flight per worker, so engines never idle between shards")
    max_attempts: int = option(3, "tries per shard (and actor replacements per worker) before the run fails")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD"] = option(
        "SPREAD", "how worker bundles spread over nodes"
    )
    kill_worker_at_shard: int = option(0, "fault drill (tests set it): the pool kills the worker it has just handed "
                                       "its N-th shard (counted from this command's start), with that shard in "
                                       "flight; 0 = never")
    crash_after_shard: int = option(0, "fault drill (tests set it): the driver kills itself (SIGKILL, as a crash "
                                    "would) right after writing the N-th shard this command finished; 0 = never")
    hold_after_shard: int = option(0, "fault drill (tests set it): once this command has finished N shards, the "
                                   "pool hands out no more and waits, its workers idle, until they are lost; "
                                   "0 = never")

    def problems(self) -> list[str]:
        checks = {
            "shard_size": self.shard_size >= 1,
            "limit": self.limit >= 0,
            "workers": self.workers >= 0,
            "cpus_per_worker": self.cpus_per_worker >= 0,
            "gpus_per_worker": self.gpus_per_worker >= 0,
            "inflight_shards": self.inflight_shards >= 1,
            "max_attempts": self.max_attempts >= 1,
            "kill_worker_at_shard": self.kill_worker_at_shard >= 0,
            "crash_after_shard": self.crash_after_shard >= 0,
            "hold_after_shard": self.hold_after_shard >= 0,
        }
        return failing(checks)


@dataclass
class StageJob:
    stage: str
    out: Path
    prompts: str
    pool: PoolConfig
    identity: dict[str, Any]
    config: dict[str, Any]
    output_schema: pa.Schema
    worker_cls: type
    worker_args: tuple = ()
    worker_kwargs: dict[str, Any] = field(default_factory=dict)
    max_num_seqs: int = 0
    many_per_input: bool = False  # an input row may give several output rows (labelled pairs)
    cluster: ClusterOptions = ClusterOptions()
    models: tuple = ()  # ModelSources the workers load: checked (or staged) on their nodes first


def _open_manifest(job: StageJob) -> RunManifest:
    manifest = RunManifest.open(job.out, job.stage, job.identity, job.config, run_name=job.cluster.run_name)
    if not manifest.input:
        staged = stage_inputs(job.prompts, job.out, job.pool.shard_size, limit=job.pool.limit or None)
        manifest.input = {"source": str(job.prompts), "total_rows": staged.total_rows,
                          "rejected": staged.rejected, "shards": len(staged.shards)}
        manifest.shards = {s.index: ShardState(rows=s.rows) for s in staged.shards}
        manifest.save()
    return manifest


def run_stage(job: StageJob) -> dict[str, Any]:
    """Run (or resume) the stage into ``job.out`` and return its summary."""
    started = time.monotonic()
    manifest = _open_manifest(job)
    shard_count = manifest.input["shards"]
    done = completed_shards(job.out)
    for index in done:
        manifest.shards[index].status = "done"
    pending = [i for i in range(shard_count) if i not in done]
    run_name = manifest.run_id
    cluster = connect_ray() if pending else None
    progress = RunProgress(
        job.stage, total_rows=manifest.input["total_rows"],
        done_rows=manifest.input["rejected"] + sum(manifest.shards[i].rows for i in done),
        total_shards=shard_count, done_shards=len(done), run=run_name, metrics=cluster is not None,
    )
    occupancy = [0, 0]
    if cluster:
        _run_pool(job, manifest, pending, run_name, cluster, progress, occupancy)
    progress.close()

    accounting = verify_run(job.out, manifest.input["total_rows"], shard_count, many_per_input=job.many_per_input)
    summary = {
        "run_id": run_name,
        "rows_in": accounting.rows_in, "rows_out": accounting.rows_out, "rejected": accounting.rejected,
        "tokens": sum(s.tokens for s in manifest.shards.values()),
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    if cluster:
        summary["tokens_per_second"] = round(progress.tokens / max(progress.elapsed, 1e-9), 2)
        summary["mean_running_requests"] = round(occupancy[0] / max(occupancy[1], 1), 2)
        summary["max_num_seqs"] = job.max_num_seqs
    manifest.summary = {**manifest.summary, **summary}
    manifest.save()
    return {"out": str(job.out), **summary, "already_done": not pending}


def _run_pool(job: StageJob, manifest: RunManifest, pending: list[int], run_name: str, cluster: dict[str, Any],
              progress: RunProgress, occupancy: list[int]) -> None:
    import ray

    pool = job.pool
    resources = WorkerResources(cpus=pool.cpus_per_worker, gpus=pool.gpus_per_worker)
    n_workers = max(1, min(pool.workers or workers_that_fit(resources) or 1, len(pending)))
    progress.note(f"{len(pending)} of {len(manifest.shards)} shards to do on {n_workers} worker(s); "
                  f"Ray {cluster['address']}, dashboard {cluster['dashboard_url'] or 'off'}")
    timeout = job.cluster.placement_timeout
    pg = reserve_workers(n_workers, resources, strategy=pool.placement_strategy, name=f"cai-{job.stage}-{run_name}",
                         timeout_s=timeout, report=progress.note)
    try:
        if job.models:
            from workflows.runtime.model_preflight import nodes_of_placement_group, preflight_models

            checked = preflight_models(job.models, nodes_of_placement_group(pg), timeout_s=timeout or None)
            progress.note(f"model(s) ready on {len(checked)} node(s)")
    except BaseException:
        release(pg)
        raise
    worker_cls = ray.remote(job.worker_cls)

    def unplaced() -> str | None:
        return pending_detail(pg) if unplaced_bundles(pg) else None

    def make_actor(slot: int, generation: int):
        name = f"cai-{job.stage}-{run_name}-{slot}" + (f".r{generation}" if generation else "")
        options = bundle_options(pg, slot, resources)
        return worker_cls.options(name=name, namespace=NAMESPACE, max_restarts=0, **options).remote(
            *job.worker_args, run_name=run_name, **job.worker_kwargs
        )

    handed, finished = [0], [0]

    def submit(actor, shard: int):
        manifest.shards[shard].attempts += 1
        ref = actor.run_shard.remote(shard, read_shard_inputs(job.out, shard))
        handed[0] += 1
        if handed[0] == pool.kill_worker_at_shard:  # the fault drill: a worker lost with work in flight
            progress.note(f"fault drill: killing the worker that holds shard {shard}")
            ray.kill(actor, no_restart=True)
        return ref

    def on_result(shard: int, result: dict[str, Any]) -> None:
        write_shard_output(job.out, shard, result["rows"], result["rejects"], job.output_schema)
        state = manifest.shards[shard]
        state.status, state.rows_out, state.rejected = "done", len(result["rows"]), len(result["rejects"])
        state.seconds, state.tokens, state.worker = round(result["seconds"], 3), result["tokens"], result["worker"]
        state.started_at, state.finished_at = result["started_at"], result["finished_at"]
        occupancy[0] += result["occupancy_sum"]
        occupancy[1] += result["occupancy_samples"]
        progress.shard_done(state.rows, result["tokens"])
        manifest.save(force=False)
        finished[0] += 1
        if finished[0] == pool.crash_after_shard:  # the fault drill: the driver dies between shards
            progress.note(f"fault drill: the driver crashes after shard {shard}")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_failure(shard: int, reason: str) -> None:
        manifest.shards[shard].last_error = reason[:500]
        progress.note(f"shard {shard} failed ({reason[:80]}); retrying")

    def hold() -> bool:  # the fault drill: a pool that stops handing out shards, for node-loss tests
        if pool.hold_after_shard and finished[0] >= pool.hold_after_shard and not held[0]:
            progress.note(f"fault drill: holding after {finished[0]} shards; the workers idle until they are lost")
            held[0] = True
        return held[0]

    held = [False]
    queue = ShardQueue.of(pending, pool.max_attempts)
    try:
        run_shard_pool(make_actor=make_actor, n_workers=n_workers, queue=queue, submit=submit,
                       on_result=on_result, on_failure=on_failure, inflight_per_worker=pool.inflight_shards,
                       unplaced=unplaced, placement_timeout_s=timeout, on_wait=progress.note, hold=hold)
    finally:
        manifest.save()
        release(pg)

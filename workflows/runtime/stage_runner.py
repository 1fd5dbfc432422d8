"""Run a sharded stage (generate, label): the machinery every stage shares.

Run directory and manifest → stage the inputs into shards → Ray, worker placement and a
fault-tolerant pool of actors pulling shards → write each shard as it finishes → check that
every input row is accounted for → summary. A stage brings its worker class (a plain class
with ``ready()`` and ``async run_shard(shard, rows)``), its output schema and the settings
that identify a run.

``run_shard`` returns an ``actors.shard_work.ShardResult``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from actors.shard_work import ShardResult
from core.config import ConfigError, Problem, at_least, failing, option
from core.manifest import RunManifest, ShardState
from core.prompt_data import PromptOptions
from core.shards import completed_shards, read_shard_inputs, stage_inputs, verify_run, write_shard_output
from core.cluster_options import ClusterOptions
from workflows.runtime.devices import pool_on_devices
from workflows.runtime.placement import (PoolPlacements, WorkerResources, refuse_unplaceable, reserve_workers,
                                        workers_that_fit)
from workflows.runtime.progress import RunProgress
from core.run_identity import NAMESPACE
from workflows.runtime.ray_session import connect_ray
from workflows.runtime.shard_pool import ShardQueue, run_shard_pool


@dataclass(frozen=True)
class PoolConfig:
    """How a stage fans out: shards, workers and their resources, retries."""

    shard_size: int = option(64, "prompts per shard: the unit of scheduling, writing and retry", identity=True)
    limit: int = option(0, "use only the first N prompts; 0 = all", identity=True)
    workers: int = option(0, "worker actors (one engine each); 0 = as many as the cluster holds, now and as nodes "
                          "join (an elastic pool)")
    max_workers: int = option(0, "with --workers 0: at most this many workers, and the number the pool asks an "
                              "autoscaling cluster to make room for (withdrawn once every shard is handed out); "
                              "0 = no limit and no request")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    gpus_per_worker: float | None = option(None, "GPUs reserved per worker (at least --tensor-parallel on GPU "
                                           "nodes); default: --tensor-parallel on a cluster with GPUs, 0 on one "
                                           "without (workflows/runtime/devices.py)")
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
    hold_until_workers: int = option(0, "fault drill (tests set it): after the first shard this command finishes, "
                                     "the pool hands out no more until N workers are up (an elastic pool that "
                                     "must grow first); 0 = never")

    def problems(self) -> list[Problem]:
        checks = {
            "shard_size": at_least(1)(self.shard_size),
            "limit": at_least(0)(self.limit),
            "workers": at_least(0)(self.workers),
            "cpus_per_worker": at_least(0)(self.cpus_per_worker),
            "gpus_per_worker": at_least(0).or_none()(self.gpus_per_worker),
            "inflight_shards": at_least(1)(self.inflight_shards),
            "max_attempts": at_least(1)(self.max_attempts),
            "kill_worker_at_shard": at_least(0)(self.kill_worker_at_shard),
            "crash_after_shard": at_least(0)(self.crash_after_shard),
            "hold_after_shard": at_least(0)(self.hold_after_shard),
            "hold_until_workers": at_least(0)(self.hold_until_workers),
            "max_workers": at_least(0)(self.max_workers),
        }
        return failing(checks)

    def __post_init__(self) -> None:
        if self.max_workers > 0 and self.workers > 0:
            raise ConfigError(f"--max-workers {self.max_workers} limits an elastic pool (--workers 0), "
                              f"but --workers is {self.workers}: drop one of them")


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
    tensor_parallel: int = 1  # of each worker's engine: its GPUs when --gpus-per-worker is left to the cluster
    prompt_source: PromptOptions = PromptOptions()  # the split and column of ``prompts``


def _open_manifest(job: StageJob) -> RunManifest:
    manifest = RunManifest.open(job.out, job.stage, job.identity, job.config, run_name=job.cluster.run_name)
    if not manifest.input:
        staged = stage_inputs(job.prompts, job.out, job.pool.shard_size, job.prompt_source,
                              limit=job.pool.limit or None)
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
    if cluster:  # --gpus-per-worker left unset: decided by whether the cluster has GPUs
        job = replace(job, pool=pool_on_devices(job.pool, job.tensor_parallel, cluster["gpus"] > 0))
    progress = RunProgress(
        job.stage, total_rows=manifest.input["total_rows"],
        done_rows=manifest.input["rejected"] + sum(manifest.shards[i].rows for i in done),
        total_shards=shard_count, done_shards=len(done), run=run_name, metrics=cluster is not None,
    )
    occupancy = [0, 0]
    pool_summary = _run_pool(job, manifest, pending, run_name, cluster, progress, occupancy) if cluster else {}
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
        summary.update(pool_summary)
    manifest.summary = {**manifest.summary, **summary}
    manifest.save()
    return {"out": str(job.out), **summary, "already_done": not pending}


def _run_pool(job: StageJob, manifest: RunManifest, pending: list[int], run_name: str, cluster: dict[str, Any],
              progress: RunProgress, occupancy: list[int]) -> dict[str, Any]:
    """Run the pending shards on a pool of workers; returns what the summary records of the pool."""
    import ray

    pool = job.pool
    resources = WorkerResources(cpus=pool.cpus_per_worker, gpus=pool.gpus_per_worker)
    refuse_unplaceable(resources, fixed=cluster.get("local", False), what=f"cai {job.stage}")
    elastic = pool.workers == 0
    limit = min(pool.max_workers or len(pending), len(pending))  # never more workers than shards
    n_workers = max(1, min(pool.workers or workers_that_fit(resources) or 1, limit))
    shape = " + ".join(f"{amount:g} {key}" for key, amount in resources.bundle().items())
    progress.note(f"{len(pending)} of {len(manifest.shards)} shards to do on {n_workers} worker(s) x {shape}"
                  + (f", more as nodes join (up to {limit})" if elastic and limit > n_workers else "")
                  + f"; Ray {cluster['address']}, dashboard {cluster['dashboard_url'] or 'off'}")
    timeout = job.cluster.wait_s
    placements = PoolPlacements(resources, name=f"cai-{job.stage}-{run_name}", limit=limit, elastic=elastic,
                                note=progress.note)
    placements.ask_autoscaler(pool.max_workers, have=n_workers)
    try:
        pg = reserve_workers(n_workers, resources, strategy=pool.placement_strategy, name=placements.name,
                             timeout_s=timeout, report=progress.note)
        placements.placed(pg, n_workers)
        if job.models:
            from workflows.runtime.model_preflight import nodes_of_placement_group, preflight_models

            checked = preflight_models(job.models, nodes_of_placement_group(pg), timeout_s=job.cluster.preflight_timeout)
            progress.note(f"model(s) ready on {len(checked)} node(s)")
    except BaseException:
        placements.release()
        raise
    worker_cls = ray.remote(job.worker_cls)
    timeline: list[list[float]] = []  # [seconds since the pool began, workers up], at each change

    def make_actor(slot: int, generation: int):
        name = f"cai-{job.stage}-{run_name}-{slot}" + (f".r{generation}" if generation else "")
        return worker_cls.options(name=name, namespace=NAMESPACE, max_restarts=0, **placements.options(slot)).remote(
            *job.worker_args, run_name=run_name, **job.worker_kwargs
        )

    def on_workers(up: int) -> None:
        timeline.append([round(time.monotonic() - placements.began, 1), up])
        progress.workers(up)

    handed, finished = [0], [0]

    def submit(actor, shard: int):
        manifest.shards[shard].attempts += 1
        ref = actor.run_shard.remote(shard, read_shard_inputs(job.out, shard))
        handed[0] += 1
        if handed[0] == pool.kill_worker_at_shard:  # the fault drill: a worker lost with work in flight
            progress.note(f"fault drill: killing the worker that holds shard {shard}")
            ray.kill(actor, no_restart=True)
        return ref

    def on_result(shard: int, result: ShardResult) -> None:
        write_shard_output(job.out, shard, result.rows, result.rejects, job.output_schema)
        state = manifest.shards[shard]
        state.status, state.rows_out, state.rejected = "done", len(result.rows), len(result.rejects)
        state.seconds, state.tokens, state.worker = round(result.seconds, 3), result.tokens, result.worker
        state.started_at, state.finished_at = result.started_at, result.finished_at
        occupancy[0] += result.occupancy_sum
        occupancy[1] += result.occupancy_samples
        progress.shard_done(state.rows, result.tokens)
        manifest.save(force=False)
        finished[0] += 1
        if finished[0] == pool.crash_after_shard:  # the fault drill: the driver dies between shards
            progress.note(f"fault drill: the driver crashes after shard {shard}")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_failure(shard: int, reason: str) -> None:
        manifest.shards[shard].last_error = reason[:500]
        progress.note(f"shard {shard} failed ({reason[:80]}); retrying")

    drill = {"held": False, "workers_reached": False, "said": False}

    def hold() -> bool:  # the fault drills that stop the pool handing out shards
        if pool.hold_after_shard and finished[0] >= pool.hold_after_shard and not drill["held"]:
            progress.note(f"fault drill: holding after {finished[0]} shards; the workers idle until they are lost")
            drill["held"] = True
        return drill["held"] or waiting_for_workers()

    def waiting_for_workers() -> bool:
        if not pool.hold_until_workers or finished[0] < 1 or drill["workers_reached"]:
            return False
        if (progress.workers_up or 0) >= pool.hold_until_workers:
            drill["workers_reached"] = True
            return False
        if not drill["said"]:
            progress.note(f"fault drill: holding after the first shard until {pool.hold_until_workers} workers are up")
            drill["said"] = True
        return True

    queue = ShardQueue.of(pending, pool.max_attempts)
    try:
        run_shard_pool(make_actor=make_actor, n_workers=n_workers, queue=queue, submit=submit,
                       on_result=on_result, on_failure=on_failure, inflight_per_worker=pool.inflight_shards,
                       unplaced=placements.unplaced, placement_timeout_s=timeout, on_wait=progress.note, hold=hold,
                       grow=placements.grow, on_workers=on_workers)
    finally:
        manifest.save()
        placements.release()
    # workers_timeline: [seconds since pool_started_at (Unix time, as the shards' started_at), workers up]
    summary = {"workers_peak": max((up for _, up in timeline), default=0), "workers_timeline": timeline,
               "pool_started_at": round(placements.began_at, 3), "gpus_per_worker": pool.gpus_per_worker}
    return summary | ({"autoscaler_request": placements.request} if placements.request["workers"] else {})

"""The driver side of every `cai train` job: the run folder, the checks, and the Ray Train launch.

A job is a ``TorchTrainer`` over ``--workers`` workers (gloo on CPU, NCCL on GPU); its data is
checked on the driver first (:mod:`core.training_data`). The train loop runs on the workers;
it resumes from ``ray.train.get_checkpoint()`` when the same command runs again (Ray Train V2:
same ``RunConfig(name, storage_path)``), and after a worker dies when ``--max-failures``
allows a restart. Rank 0 reports the final model as a last checkpoint; the driver copies it
to ``--out`` (so ``--out`` only needs to be visible to the driver) and writes
``training_summary.json``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.process_output import train_log_level
from core.cluster_options import ClusterOptions
from core.config import config_to_dict, identity, identity_defaults, recorded_identity
from core.run_identity import RUN_FILE, same_identity, training_run_id
from core.training_data import data_lineage
from learners.context import FINAL_MODEL, LearnerContext
from learners.options import LearnerOptions
from workflows.runtime.placement import PlacementError, check_total_fits

SUMMARY = "training_summary.json"
FOREVER_S = 10 * 365 * 86400  # ClusterOptions.wait_s None: Ray Train's start timeout has no "never"


def precision_summary(learner: LearnerOptions) -> dict[str, str]:
    """The run's precision policy as it resolved (core.precision), for training_summary.json."""
    from core.precision import compute_dtype_name

    compute = compute_dtype_name(learner.compute_dtype, learner.use_gpu)
    return {"compute_dtype": compute, "master_dtype": learner.master_dtype,
            "forward": "every parameter cast to the compute dtype" if compute != "float32" else "float32"}


class LearnerFailed(RuntimeError):
    """A learner raised and the run stopped (one line for the terminal; the cause is chained)."""


def learner_failure(failures: dict[int, BaseException]) -> str:
    """``learner rank R failed: Type: first line`` for the failure that caused the others: the
    lowest rank whose error is not a peer's echo (weight_sync.PeerFailed)."""
    def root(exc: BaseException) -> BaseException:
        cause = getattr(exc, "cause", None)  # a RayTaskError carries the worker's own exception
        return cause if isinstance(cause, BaseException) else exc

    ranked = sorted((rank, root(exc)) for rank, exc in failures.items()) if failures else []
    if not ranked:
        return "a learner failed"
    rank, exc = next(((r, e) for r, e in ranked if type(e).__name__ != "PeerFailed"), ranked[0])
    text = str(exc).strip().splitlines()
    return f"learner rank {rank} failed: {type(exc).__name__}: {text[0] if text else ''}"


# -- on the driver ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    kind: str  # sft | rm | dpo | ppo
    out: Path
    workers: int
    learner: LearnerOptions
    loop: Callable[[LearnerContext], None]  # the body of every Ray Train worker (in learners/)
    config: Any  # the job's config as given: recorded in the summary, decides "done already"
    settings: Any  # the same config resolved for the learners (model paths, data paths)
    data: Sequence[str]
    # writes job-specific files (e.g. PPO's metrics.jsonl) into the output before it is published
    extra_outputs: Callable[[Path, dict[str, Any]], None] | None = None
    cluster: ClusterOptions = ClusterOptions()
    # settings field -> (resolved path, as given): checked (or staged) on the learners' nodes
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    run_id: str = ""  # from open_training_run, when the caller needed it first
    inputs: Any = None  # what the job adds to the learners' context (PPO: learners.ppo_loop.PPOInputs)


def finished_summary(out: Path, config: Any) -> dict[str, Any] | None:
    """The summary in ``out`` when a job of the same identity already finished there, else None.

    Summaries written before identities were recorded are read through their config."""
    summary_path = out.expanduser().resolve() / SUMMARY
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        recorded = summary.get("identity") or recorded_identity(type(config), summary.get("config") or {})
        if same_identity(recorded, identity(config), identity_defaults(type(config))):
            return {**summary, "already_done": True}
    return None


def learner_nodes(use_gpu: bool) -> list[str]:
    """Ids of the alive nodes where Ray Train could put a learner (a CPU, and a GPU on GPU)."""
    import ray

    need = "GPU" if use_gpu else "CPU"
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get(need, 0) >= 1]


def open_training_run(out: Path, config: Any, run_name: str) -> tuple[dict[str, Any] | None, str]:
    """(summary, "") when ``out`` already holds this config's finished job; else (None, run id).

    A finished job of another config in ``out`` is retrained under a fresh run id, so its
    Ray Train checkpoints (final model included) are never resumed by mistake."""
    done = finished_summary(out, config)
    if done:
        return done, ""
    stale = out / SUMMARY
    run_id = training_run_id(out, run_name, fresh=stale.exists())
    stale.unlink(missing_ok=True)
    return None, run_id


def learner_demand(workers: int, use_gpu: bool) -> dict[str, dict[str, float]]:
    """What Ray Train's worker group holds: one CPU per worker (its default), one GPU each on GPU."""
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    shape = " + ".join(f"{v:g} {k}" for k, v in per_worker.items())
    return {f"{workers} learner(s) x {shape}": {k: v * workers for k, v in per_worker.items()}}


def run_training(job: TrainJob) -> dict[str, Any]:
    """Launch (or resume) the TorchTrainer, copy the final model to --out, write the summary."""
    from actors.run_log import METRICS_FILE, start_run_log

    from workflows.runtime.model_preflight import prepare_model, preflight_models
    from workflows.runtime.ray_session import connect_ray

    out = job.out.expanduser().resolve()
    done, run_id = (None, job.run_id) if job.run_id else open_training_run(out, job.config, job.cluster.run_name)
    if done:
        return done
    storage = job.learner.storage_path or str(out.parent / f".{out.name}.ray-train")
    name = f"cai-train-{job.kind}-{run_id}"
    def note(line: str) -> None:
        print(f"cai train {job.kind} [{run_id}]: {line}", file=sys.stderr, flush=True)

    cluster = connect_ray()
    # after joining: ray reads RAY_AUTH_MODE once, when it is imported (connect_ray sets it)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_total_fits(learner_demand(job.workers, job.learner.use_gpu), fixed=cluster.get("local", False),
                     what=f"cai train {job.kind}", report=note)
    # Ray Train waits this long for its worker group, then (controller_failure_limit=0) fails
    # instead of retrying for ever; the variable is propagated to its controller (Ray 2.60).
    wait = job.cluster.wait_s
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(FOREVER_S if wait is None else wait)
    sources = {key: prepare_model(path, spec, job.cluster) for key, (path, spec) in job.models.items()}
    if sources:
        checked = preflight_models(tuple(sources.values()), learner_nodes(job.learner.use_gpu),
                                   timeout_s=job.cluster.preflight_timeout)
        note(f"model(s) ready on {len(checked)} node(s) that can host a learner")
    started = time.monotonic()
    run_log = start_run_log(out, job.kind, run_id)
    context = LearnerContext(settings=job.settings, workers_dir=str(Path(storage) / name / "workers"), name=name,
                             model_sources=sources, run_log=run_log, inputs=job.inputs)
    trainer = TorchTrainer(
        # a loop of no arguments, the typed context bound to it (Ray Train calls it as is)
        functools.partial(job.loop, context),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.learner.use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=job.learner.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=train_log_level()),
            # Ray Train 2.60 replaces print() in its workers with a logger that also echoes what
            # libraries print into captured streams: datasets' fingerprinting (dill) disassembles
            # our map functions into a StringIO, and that bytecode reached the terminal.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(
                # FSDP frees each gathered block after use; glibc keeps such buffers (~14 MB each
                # on the default model) in its heap unless they are mmapped, so the resident memory
                # of a sharded learner only shrinks with this (BENCHMARKS.md, learners)
                {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)} if job.learner.strategy == "fsdp" else {})}},
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise LearnerFailed(f"cai train {job.kind}: {learner_failure(exc.worker_failures)}; every learner "
                            f"stopped (Ray Train run {name}; CAI_DEBUG=1 shows the traceback)") from exc
    except ray.train.ControllerError as exc:
        if "worker group startup timed out" not in str(exc):  # Ray 2.60's words for "no room in time"
            raise
        demand = ", ".join(learner_demand(job.workers, job.learner.use_gpu))
        raise PlacementError(f"cai train {job.kind}: the learners ({demand}) did not all start within "
                             f"--placement-timeout {job.cluster.placement_timeout:g} s: the cluster had no room "
                             "for them. Ask for fewer learners or add nodes") from None
    finally:
        ray.kill(run_log)
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} finished without a final checkpoint")
    with result.checkpoint.as_directory() as local:
        final = Path(local) / FINAL_MODEL
        if not final.exists():
            raise RuntimeError(f"the last checkpoint of {name} holds no final model")
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(final, staging)
    metrics = dict(result.metrics or {})
    summary = {
        "kind": job.kind,
        "out": str(out),
        "metrics": {k: v for k, v in metrics.items() if k not in ("history", "final")},
        "history": metrics.get("history", []),
        "wall_seconds": round(time.monotonic() - started, 2),
        "run_id": run_id,
        "precision": precision_summary(job.learner),
        "ray_train": {"name": name, "storage_path": storage},
        "data": data_lineage(job.data),
        "config": config_to_dict(job.config),
        "identity": identity(job.config),
    }
    if (out / METRICS_FILE).exists():  # the live log; a job's extra_outputs may write its own
        shutil.copy2(out / METRICS_FILE, staging / METRICS_FILE)
    if job.extra_outputs:
        job.extra_outputs(staging, summary)
    (staging / SUMMARY).write_text(json.dumps(summary, indent=2))
    shutil.copy2(out / RUN_FILE, staging / RUN_FILE)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return summary

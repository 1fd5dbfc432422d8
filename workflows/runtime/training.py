"""What every `cai train` job shares: options, the worker side of a loop, and the Ray Train launch.

A job is a ``TorchTrainer`` over ``--workers`` workers (gloo on CPU, NCCL on GPU); its data is
checked on the driver first (:mod:`core.training_data`). The train loop runs on the workers;
it resumes from ``ray.train.get_checkpoint()`` when the same command runs again (Ray Train V2:
same ``RunConfig(name, storage_path)``), and after a worker dies when ``--max-failures``
allows a restart. Rank 0 reports the final model as a last checkpoint; the driver copies it
to ``--out`` (so ``--out`` only needs to be visible to the driver) and writes
``training_summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from actors.process_output import route_library_logs, train_log_level, verbose
from core.config import config_to_dict, failing, identity, identity_defaults, option, recorded_identity
from core.run_identity import RUN_FILE, same_identity, training_run_id
from core.training_data import data_lineage
from workflows.runtime.cluster_options import ClusterOptions
from workflows.runtime.placement import PlacementError, check_total_fits

FINAL_MODEL = "final_model"
SUMMARY = "training_summary.json"
HOLD_SECONDS = 600  # how long a fault drill holds a learner (see LearnerOptions.hold_at_step)
FOREVER_S = 10 * 365 * 86400  # --placement-timeout 0: Ray Train's start timeout has no "never"


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


@dataclass(frozen=True)
class LearnerOptions:
    """How the Ray Train learners of every training job (sft, rm, dpo, ppo) run and save."""

    lr: float = option(5e-5, "peak learning rate", identity=True)
    use_gpu: bool | None = option(None, "train on GPUs (NCCL) instead of CPUs (gloo); PPO's rollout engines take "
                                  "GPUs too (--tensor-parallel each); default: GPUs on a cluster with GPUs, CPUs on "
                                  "one without (workflows/runtime/devices.py)", identity=True)
    seed: int = option(0, "seed for data order, the held-out split, initialization and sampling", identity=True)
    strategy: Literal["ddp", "fsdp"] = option("ddp", "how the learners hold the trained model: whole replicas (DDP), "
                                              "or FSDP2 shards, one unit per transformer block (computing in "
                                              "--compute-dtype, reducing gradients in float32)", identity=True)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "dtype of every forward (policy, value, reference, reward model): in bfloat16 each parameter is cast "
        "for the forward, under DDP as under FSDP, while the trained weights stay float32 masters. auto: bfloat16 "
        "with --use-gpu, float32 on CPUs", identity=True)
    master_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "dtype of the weights the optimizer steps. bfloat16 is pure bf16 training, which warns: updates "
        "smaller than a weight's bf16 step are lost", identity=True)
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                          "pass instead of keeping them: about one hidden state per block and token "
                                          "stays in memory, for ~1/3 more compute")
    save_steps: int = option(50, "checkpoint every N optimizer steps")
    storage_path: str = option("", "where Ray Train keeps checkpoints (local dir or s3://...); default beside --out")
    max_failures: int = option(0, "restarts from the last checkpoint when a worker dies")
    hold_at_step: int = option(0, "fault drill (tests set it): every learner stops once, right after the checkpoint "
                               "of this step is reported, and waits to be killed; 0 = never")

    def problems(self) -> list[str]:
        checks = {"lr": self.lr > 0, "save_steps": self.save_steps >= 1, "max_failures": self.max_failures >= -1,
                  "hold_at_step": self.hold_at_step >= 0}
        return failing(checks)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters (peft) instead of training every weight; 0 = full fine-tuning."""

    lora_r: int = option(0, "LoRA rank; 0 trains every weight", identity=True)
    lora_alpha: int = option(16, "LoRA scaling numerator (the update is scaled by alpha / r)", identity=True)
    lora_targets: list[str] = option(["all-linear"], "modules that get adapters: names such as q_proj v_proj, or "
                                     "all-linear (every linear layer but the output head)", identity=True)

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    def problems(self) -> list[str]:
        return failing({"lora_r": self.lora_r >= 0, "lora_alpha": self.lora_alpha > 0,
                        "lora_targets": bool(self.lora_targets)})


@dataclass(frozen=True)
class TrainingOptions:
    """How a Hugging Face / TRL trainer job (sft, rm, dpo) runs on Ray Train."""

    workers: int = option(1, "Ray Train workers (one process each; one GPU each with --use-gpu)", identity=True)
    epochs: float = option(1.0, "passes over the training data", identity=True)
    max_steps: int = option(0, "stop after this many optimizer steps; 0 = run all epochs", identity=True)
    batch_size: int = option(4, "examples per worker per step", identity=True)
    grad_accum: int = option(1, "steps of gradient accumulation", identity=True)
    max_length: int = option(1024, "token limit per example (longer ones are truncated)", identity=True)
    eval_split: float = option(0.1, "fraction of the data held out for evaluation", identity=True)
    logging_steps: int = option(5, "log the loss every N optimizer steps")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = option("none", "experiment tracker")

    def problems(self) -> list[str]:
        checks = {
            "workers": self.workers >= 1, "epochs": self.epochs > 0, "max_steps": self.max_steps >= 0,
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "max_length": self.max_length >= 8, "eval_split": 0 <= self.eval_split < 1,
            "logging_steps": self.logging_steps >= 1,
        }
        return failing(checks)


@dataclass(frozen=True)
class WorkerContext:
    """What the driver tells each learner beside its job's config: where to record itself,
    the Ray Train run's name, and the models to find (or fetch) on its node."""

    workers_dir: str
    name: str
    model_sources: dict[str, Any]
    run_log: Any = None  # the driver's RunLog actor: rank 0 hands it one row per step (metrics.jsonl)


# -- on the workers -----------------------------------------------------------------------


def worker_output_dir(name: str) -> str:
    """A scratch directory per worker rank for the HF trainer's own checkpoints."""
    import ray.train

    context = ray.train.get_context()
    path = Path(tempfile.gettempdir()) / "cai-train" / name / f"rank-{context.get_world_rank()}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def quiet_train_reports() -> None:
    """Keep Ray Train's "Reporting training result N: <every metric>" line off the terminal
    unless verbose. Ray 2.60 logs it at INFO through ``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py`` (a private module): a logger named by the
    file's path, outside ``ray.train``, so ``LoggingConfig(log_level=...)`` misses it."""
    import logging

    from ray.train.v2._internal.execution import context  # private, Ray 2.60: see above

    if not verbose():
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def register_worker(worker: WorkerContext) -> None:
    """Record this worker's rank, pid and node next to the checkpoints: operators (and the
    fault tests) can find the process behind each rank."""
    import ray.train

    route_library_logs("train")  # transformers' load reports and progress bars: Ray logs, not the terminal
    quiet_train_reports()
    context = ray.train.get_context()
    directory = Path(worker.workers_dir)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"rank": context.get_world_rank(), "pid": os.getpid(), "node": os.uname().nodename, "time": time.time()}
    (directory / f"rank-{info['rank']}.json").write_text(json.dumps(info))


def hold_if_drilled(worker: WorkerContext, learner: LearnerOptions, step: int) -> None:
    """The fault drill (``--hold-at-step``): call after the checkpoint of ``step`` is reported.
    Holds once per rank, up to ``HOLD_SECONDS``, and leaves ``held-rank-R`` beside the worker
    records so a test knows when to kill a worker or the driver; a restarted job runs through."""
    if not step or learner.hold_at_step != step:
        return
    import ray.train

    marker = Path(worker.workers_dir) / f"held-rank-{ray.train.get_context().get_world_rank()}"
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "pid": os.getpid(), "time": time.time()}))
    print(f"cai train: holding after step {step} (fault drill)", flush=True)
    time.sleep(HOLD_SECONDS)


def log_step(worker: WorkerContext, row: dict[str, Any]) -> None:
    """Rank 0 hands a finished step's row to the run's ``metrics.jsonl`` (and its gauges)."""
    import ray
    import ray.train

    if worker.run_log is None or ray.train.get_context().get_world_rank() != 0:
        return
    try:  # waited for, so the row is written before the job can end; a lost log never stops training
        ray.get(worker.run_log.append.remote(row), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        print(f"cai: step {row.get('step')} not written to metrics.jsonl ({type(exc).__name__}: {exc})", flush=True)


def report_final(save: Callable[[str], None], metrics: dict[str, Any]) -> None:
    """Rank 0 saves the final model into a checkpoint; other ranks report metrics only."""
    import ray.train
    from ray.train import Checkpoint

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics={**metrics, "final": 1})
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(str(Path(tmp) / FINAL_MODEL))
        ray.train.report(metrics={**metrics, "final": 1}, checkpoint=Checkpoint.from_directory(tmp))


# -- on the driver ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    kind: str  # sft | rm | dpo | ppo
    out: Path
    workers: int
    learner: LearnerOptions
    loop: Callable[[dict[str, Any]], None]
    config: Any  # the job's config as given: recorded in the summary, decides "done already"
    settings: Any  # the same config resolved for the learners (model paths, data paths)
    data: Sequence[str]
    # writes job-specific files (e.g. PPO's metrics.jsonl) into the output before it is published
    extra_outputs: Callable[[Path, dict[str, Any]], None] | None = None
    cluster: ClusterOptions = ClusterOptions()
    # settings field -> (resolved path, as given): checked (or staged) on the learners' nodes
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    run_id: str = ""  # from open_training_run, when the caller needed it first
    loop_data: dict[str, Any] = field(default_factory=dict)  # more for the loop (PPO: prompts, rollout actors)


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


def local_models(settings: Any, sources: dict[str, Any]) -> Any:
    """``settings`` (a frozen config) with each model field set to that model's folder on
    this node (on a worker: a staged copy is fetched once per node; a missing folder is a
    clear error naming the node)."""
    return replace(settings, **{key: source.local_path() for key, source in sources.items()})


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
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(job.cluster.placement_timeout or FOREVER_S)
    sources = {key: prepare_model(path, spec, job.cluster) for key, (path, spec) in job.models.items()}
    if sources:
        checked = preflight_models(tuple(sources.values()), learner_nodes(job.learner.use_gpu),
                                   timeout_s=job.cluster.preflight_timeout)
        note(f"model(s) ready on {len(checked)} node(s) that can host a learner")
    started = time.monotonic()
    run_log = start_run_log(out, job.kind, run_id)
    trainer = TorchTrainer(
        job.loop,
        # the job's frozen config itself, and what each learner needs to know about the run
        train_loop_config={"config": job.settings, "worker": WorkerContext(
            workers_dir=str(Path(storage) / name / "workers"), name=name, model_sources=sources, run_log=run_log),
            **job.loop_data},
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

"""What every learner is told and does inside its Ray Train worker, whatever the job: the
typed :class:`LearnerContext` the driver hands it (the job's frozen config and the run's
facts), recording itself beside the checkpoints, the fault drill's hold, one metrics row per
step, and the final model as the last checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from actors.model_source import ModelSource
from actors.process_output import route_library_logs, verbose
from learners.options import LearnerOptions

FINAL_MODEL = "final_model"
HOLD_SECONDS = 600  # how long a fault drill holds a learner (see LearnerOptions.hold_at_step)

SettingsT = TypeVar("SettingsT")
InputsT = TypeVar("InputsT")


@dataclass(frozen=True)
class LearnerContext(Generic[SettingsT, InputsT]):
    """What the driver hands every learner (``workflows/runtime/training.py`` builds it): the
    job's frozen config itself, where to record itself, the Ray Train run's name, the models to
    find (or fetch) on its node, and what the job adds (PPO: ``learners.ppo_loop.PPOInputs``)."""

    settings: SettingsT  # model fields hold the driver's paths: use :meth:`local_settings` on a worker
    workers_dir: str
    name: str
    model_sources: dict[str, ModelSource]
    run_log: Any = None  # the driver's RunLog actor: rank 0 hands it one row per step (metrics.jsonl)
    inputs: InputsT | None = None

    def local_settings(self) -> SettingsT:
        """The settings with each model field set to that model's folder on this node (a staged
        copy is fetched once per node; a missing folder is a clear error naming the node)."""
        return replace(self.settings, **{key: source.local_path() for key, source in self.model_sources.items()})


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


def register_worker(context: LearnerContext) -> None:
    """Record this worker's rank, pid and node next to the checkpoints: operators (and the
    fault tests) can find the process behind each rank."""
    import ray.train

    route_library_logs("train")  # transformers' load reports and progress bars: Ray logs, not the terminal
    quiet_train_reports()
    train = ray.train.get_context()
    directory = Path(context.workers_dir)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"rank": train.get_world_rank(), "pid": os.getpid(), "node": os.uname().nodename, "time": time.time()}
    (directory / f"rank-{info['rank']}.json").write_text(json.dumps(info))


def hold_if_drilled(context: LearnerContext, learner: LearnerOptions, step: int) -> None:
    """The fault drill (``--hold-at-step``): call after the checkpoint of ``step`` is reported.
    Holds once per rank, up to ``HOLD_SECONDS``, and leaves ``held-rank-R`` beside the worker
    records so a test knows when to kill a worker or the driver; a restarted job runs through."""
    if not step or learner.hold_at_step != step:
        return
    import ray.train

    marker = Path(context.workers_dir) / f"held-rank-{ray.train.get_context().get_world_rank()}"
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "pid": os.getpid(), "time": time.time()}))
    print(f"cai train: holding after step {step} (fault drill)", flush=True)
    time.sleep(HOLD_SECONDS)


def log_step(context: LearnerContext, row: dict[str, Any]) -> None:
    """Rank 0 hands a finished step's row to the run's ``metrics.jsonl`` (and its gauges)."""
    import ray
    import ray.train

    if context.run_log is None or ray.train.get_context().get_world_rank() != 0:
        return
    try:  # waited for, so the row is written before the job can end; a lost log never stops training
        ray.get(context.run_log.append.remote(row), timeout=30)
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

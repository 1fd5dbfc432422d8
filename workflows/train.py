"""`cai train sft|rm|dpo`: Ray Train jobs around TRL trainers (built in the learners,
``learners/hf_trainers.py``). The driver checks the data first, so bad data fails before any
worker starts, then launches the job (``workflows/runtime/training.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from core.training_data import load_training_data
from learners.hf_configs import PREFERENCE_COLUMNS, TrainJobConfig
from learners.hf_trainers import dpo_loop, rm_data, rm_loop, sft_data, sft_loop
from workflows.runtime.training import TrainJob, run_training


# -- driver -------------------------------------------------------------------------------

LOOPS = {"sft": sft_loop, "rm": rm_loop, "dpo": dpo_loop}
CHECKS = {
    "sft": lambda config: sft_data(config.data, config.sft_targets),
    "rm": lambda config: rm_data(config.data),
    "dpo": lambda config: load_training_data(config.data, PREFERENCE_COLUMNS),
}


def run_train(config: TrainJobConfig) -> dict[str, Any]:
    """Check the data on the driver (bad data fails before any worker starts), then train."""
    from workflows.runtime.devices import joined_on_devices
    from workflows.runtime.models import resolve_model

    model = resolve_model(config.model)
    CHECKS[config.kind](config)
    config = joined_on_devices(config)  # --use-gpu left unset: GPUs when the cluster has them
    settings = replace(config, model=model, data=[str(Path(p).expanduser().resolve()) for p in config.data])
    return run_training(TrainJob(kind=config.kind, out=Path(config.out), workers=config.training.workers,
                                 learner=config.learner, loop=LOOPS[config.kind], config=config, settings=settings,
                                 data=config.data, cluster=config.cluster, models={"model": (model, config.model)}))

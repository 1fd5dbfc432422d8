"""The worker side of a Hugging Face / TRL trainer job (sft, rm, dpo): its callbacks (steps to
``metrics.jsonl``, the fault drill, measurements once training begins), resuming from Ray
Train's checkpoint, and the final model saved as one ordinary safetensors model (gathered from
FSDP shards, LoRA merged). The shared learner plumbing is in :mod:`learners.context`."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.context import (
    FINAL_MODEL, LearnerContext, hold_if_drilled, log_step, register_worker, report_final, worker_output_dir,
)
from learners.options import LearnerOptions


def step_log_callback(context: LearnerContext):
    """A Hugging Face trainer callback: at each logging step, and at the last step whatever
    ``--logging-steps`` says (a run shorter than it still leaves a row), rank 0 logs the loss,
    learning rate, epoch and input tokens per second since the previous log."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.last = (time.monotonic(), 0)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the trainer logs this step's loss next, then on_log runs

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            now, tokens = time.monotonic(), int(state.num_input_tokens_seen or 0)
            rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9) if tokens else None
            self.last = (now, tokens)
            log_step(context, {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                              "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                              "tokens_per_second": rate, "time": time.time()})

    return StepLog()


def hold_callback(context: LearnerContext, learner: LearnerOptions):
    """The fault drill as a Hugging Face trainer callback, or None when no drill is asked."""
    from transformers import TrainerCallback

    if not learner.hold_at_step:
        return None

    class HoldAfterCheckpoint(TrainerCallback):
        # on_step_begin of step N+1: checkpoint N has been saved and reported by now
        def on_step_begin(self, args, state, control, **kwargs):
            hold_if_drilled(context, learner, state.global_step)

    return HoldAfterCheckpoint()


def train_begin_callback(action: Callable[[], None]):
    """A Hugging Face trainer callback running ``action`` once training begins (the model prepared)."""
    from transformers import TrainerCallback

    class TrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            action()

    return TrainBegin()


def resume_paths(local: str | None) -> tuple[str | None, str | None]:
    """(HF checkpoint dir to resume from, finished model dir) inside the folder of Ray Train's
    latest checkpoint (None: starting fresh)."""
    if local is None:
        return None, None
    final = Path(local) / FINAL_MODEL
    if final.exists():
        return None, str(final)
    hf = Path(local) / "checkpoint"
    return (str(hf) if hf.exists() else None), None


def step_of(checkpoint_dir: str | None) -> int:
    """The optimizer step an HF checkpoint directory was saved at (0 when starting fresh)."""
    if not checkpoint_dir:
        return 0
    state = Path(checkpoint_dir) / "trainer_state.json"
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.exists() else 0


def evaluate_split(trainer) -> dict[str, float]:
    """The trainer's own evaluation on the held-out split (empty without one)."""
    if trainer.eval_dataset is None:
        return {}
    return {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}


def hf_train_loop(context: LearnerContext, build: Callable[[Any, str], tuple[Any, Any, Any]]) -> None:
    """The body of every job's train loop, on each worker: resume or start, train a
    Hugging Face / TRL trainer wired to Ray Train, report the final model.

    ``context`` holds the job's frozen config (``settings``) and the run's facts.
    ``build(config, output_dir)`` returns (trainer, tokenizer, measure), where
    ``measure(trainer) -> metrics`` runs before and after training."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from core.sharding import full_state

    config = context.local_settings()
    register_worker(context)
    # Ray Train's latest checkpoint (a restart or a rerun), read through as_directory(): in place
    # on local or shared storage; from remote storage one download per node, deleted after
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        print(f"cai train: resuming from {checkpoint.path}", flush=True)
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as local:
        resume, finished = resume_paths(local)
        # read now: the folder is the checkpoint itself, which Ray Train's retention deletes once
        # newer checkpoints are kept
        resumed_from = step_of(resume)
        if finished:  # a rerun after the job completed: hand back the same model
            report_final(lambda target: shutil.copytree(finished, target), {"resumed_from_step": -1})
            return
        trainer, tokenizer, measure = build(config, worker_output_dir(context.name))
        trainer.add_callback(RayTrainReportCallback())
        trainer.add_callback(step_log_callback(context))
        hold = hold_callback(context, config.learner)
        if hold is not None:
            trainer.add_callback(hold)
        before: dict[str, float] = {}
        if not resume:  # measured once the trainer has prepared the model: FSDP2 evaluates only a sharded one
            trainer.add_callback(train_begin_callback(lambda: before.update(measure(trainer))))
        trainer = prepare_trainer(trainer)
        run = trainer.train(resume_from_checkpoint=resume)
        after = measure(trainer)
        history = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
        metrics = {
            "resumed_from_step": resumed_from,
            "global_step": trainer.state.global_step,
            "history": history,
            **{f"before_{k}": v for k, v in before.items()},
            **after,
            **{k: v for k, v in run.metrics.items() if isinstance(v, (int, float))},  # train_runtime, samples/s
        }

        rank = ray.train.get_context().get_world_rank()
        report_final(model_saver(trainer.model, tokenizer, full_state(trainer.model, rank=rank)), metrics)


def model_saver(model, tokenizer, state: dict[str, Any] | None) -> Callable[[str], None]:
    """What rank 0 saves as the final model: one ordinary safetensors model from ``state``
    (the whole state dict, gathered from FSDP shards where there are any). A LoRA model is
    saved merged, its adapter alone in ``adapter/`` beside it (peft's layout)."""
    from core.lora import ADAPTER_DIR, adapter_scaling, is_adapted, merged_state

    def save(target: str) -> None:
        if is_adapted(model):
            model.save_pretrained(str(Path(target) / ADAPTER_DIR), state_dict=state, safe_serialization=True)
            model.get_base_model().save_pretrained(target, state_dict=merged_state(state, adapter_scaling(model)),
                                                   safe_serialization=True)
        else:
            model.save_pretrained(target, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(target)

    return save

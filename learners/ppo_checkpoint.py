"""PPO checkpoints: the whole policy and value model and the optimizer state keyed by
parameter name (gathered from FSDP shards, so DDP and FSDP runs write the same files), and
the run state; written by learner rank 0 into a Ray Train checkpoint, read back after a
restart or a rerun."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.ppo_policy import ActorCritic
from core.sharding import full_state

PPO_STATE = "ppo_state.json"
MODEL_STATE = "actor_critic.safetensors"  # a checkpoint's policy and value model, whole (gathered from shards)
OPTIMIZER_STATE = "optimizer.pt"  # the optimizer's state keyed by parameter name, whole


def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    state: dict[str, Any]) -> None:
    """Rank 0 writes the whole policy and value model, the optimizer state (both gathered by
    :func:`checkpoint_state`, so DDP and FSDP runs write the same files) and the run state."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for name, tensor in model_state.items():  # tied weights share storage: safetensors needs copies
        tensors[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    save_file(tensors, str(directory / MODEL_STATE))
    torch.save(optimizer_state, directory / OPTIMIZER_STATE)
    (directory / PPO_STATE).write_text(json.dumps(state))


def checkpoint_state(model: ActorCritic, optimizer, rank: int) -> tuple[dict | None, dict | None]:
    """The model's and the optimizer's whole state on rank 0, keyed by parameter name (a
    collective under FSDP: every rank calls it; the others get None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_state(model, rank=rank)
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return (model_state, optimizer_state) if rank == 0 else (None, None)


def restore_model(model: ActorCritic | None) -> tuple[Any, dict[str, Any]] | None:
    """Load the latest checkpoint Ray Train hands back (after a restart or a rerun) into the
    unsharded model (None: the run state only, on an FSDP rank that gets its weights from rank
    0); returns the checkpoint and the run state. The optimizer follows once the model is
    sharded and the optimizer built (:func:`restore_optimizer`).

    Both read the checkpoint through ``as_directory()``: in place on local or shared storage;
    from remote storage, one download per node, deleted after. (``to_directory()`` copied the
    whole checkpoint into a new /tmp folder on every rank at every resume and left it there.)"""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    print(f"cai train ppo: resuming from {checkpoint.path}", flush=True)
    with checkpoint.as_directory() as folder:
        local = Path(folder)
        if model is not None:
            model.load_state_dict(load_file(str(local / MODEL_STATE)))
        return checkpoint, json.loads((local / PPO_STATE).read_text())


def restore_optimizer(model: ActorCritic, optimizer, checkpoint) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    with checkpoint.as_directory() as folder:
        # our own file, written by save_checkpoint; weights_only refuses anything but tensors and containers
        saved = torch.load(Path(folder) / OPTIMIZER_STATE, weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


def report_step(metrics: dict[str, Any], state: dict[str, Any], save) -> None:
    """Every rank reports; rank 0 attaches a checkpoint when ``save`` is given."""
    import ray.train
    from ray.train import Checkpoint

    if save is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics=metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics=metrics, checkpoint=Checkpoint.from_directory(tmp))

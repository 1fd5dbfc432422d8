"""FSDP2 for the learners' models: shard one unit per transformer block, gather the whole
model back for saving and weight syncs.

``fully_shard`` (``torch.distributed.fsdp``, torch >= 2.6) turns each parameter into a
``DTensor`` sharded over the process group's ranks on dim 0: a rank holds 1/N of the
weights, gradients and optimizer state. A block's full weights exist only while it runs
(all-gathered before its forward and backward, freed after). On GPU, compute is in bf16
and gradients are reduced in float32 (``MixedPrecisionPolicy``), the shards themselves
stay float32: the optimizer's master weights. On CPU the same code runs over gloo.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every Hugging Face model inside ``model``: modules whose class
    the model lists in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), as accelerate's
    transformer-based wrap policy finds them."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: nn.Module, *, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard ``model`` in place over the default process group: each transformer block is one
    FSDP unit, the rest (embeddings, heads, norms) the root unit. Every parameter is cast to
    ``compute_dtype`` for the forward (the shards stay in their own dtype, the optimizer's
    masters) and gradients are reduced in float32 (core.precision). Returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found (_no_split_modules) to shard")
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
              if compute_dtype != torch.float32 else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def load_from_rank0(model: nn.Module, full: nn.Module | None, device: torch.device) -> nn.Module:
    """Give a model sharded on the ``meta`` device (:func:`shard_model` after building it on
    meta) its weights from rank 0's whole copy ``full`` (None on the other ranks): tensor by
    tensor, rank 0 scatters each parameter (``distribute_tensor(src_data_rank=0)``) and frees its
    whole copy of it once sent, so its memory goes down as its shards come up; buffers (rotary
    frequencies) are broadcast whole. No rank but 0 ever holds the whole model in host memory,
    and rank 0 never holds it twice. A collective: every rank calls it, in the same order."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    sources = dict(full.named_parameters()) if full is not None else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = sources.get(name)
            whole = (source.detach().to(device) if source is not None else
                     torch.empty(param.shape, dtype=param.dtype, device=device))
            if isinstance(param, DTensor):
                param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                                         src_data_rank=0).to_local())
            else:
                dist.broadcast(whole, src=0)
                param.copy_(whole)
            del whole
            if source is not None:
                source.data = torch.empty(0, dtype=source.dtype)  # sent: rank 0's whole copy of it goes
        buffers = dict(full.named_buffers()) if full is not None else {}
        for name, buffer in model.named_buffers():
            if full is not None:
                buffer.copy_(buffers[name])
            dist.broadcast(buffer, src=0)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: nn.Module, *, rank: int = 0) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``model`` on CPU: gathered from its shards when it is sharded
    (a collective: every rank must call it; rank 0 gets the tensors, the others None), else
    its own tensors (detached, on CPU)."""
    if not is_sharded(model):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    # On CPU the gathered tensors can share storage with FSDP's unsharded parameters, which
    # are freed when the unit reshards (torch 2.13: safetensors then fails on "an invalid
    # python storage"): keep copies.
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def shard_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its local shards under FSDP, everything under DDP."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total

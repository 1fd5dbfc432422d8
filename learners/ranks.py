"""Collectives over the learners of one job (torch.distributed, set up by Ray Train): each is
the identity on a single learner. Every learner must call them at the same point."""

from __future__ import annotations

import torch


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over the learners (on ``device``: NCCL reduces GPU tensors only)."""
    import torch.distributed as dist

    if _world() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` over the learners."""
    import torch.distributed as dist

    if _world() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every learner when ``flag`` is true on any."""
    return max_over_ranks(float(flag), device) > 0


def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every learner (the tensor itself on one learner)."""
    import torch.distributed as dist

    if _world() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def barrier() -> None:
    import torch.distributed as dist

    if _world() > 1:
        dist.barrier()

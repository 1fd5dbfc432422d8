"""The policy's weights as the rollout engines load them, one bucket at a time (#16).

The engines get plain Hugging Face names, LoRA adapters merged (``W + alpha/r · B A``), and no
``lm_head.weight`` when the model ties it to the embeddings (the engine ties it itself).
:class:`PolicySource` lists those tensors (:meth:`specs`) and builds the ones of one bucket
of the plan (:meth:`materialize`). Under FSDP2 each parameter is a ``DTensor`` shard, so
materializing is a collective: every learner calls it for the same buckets in the same order
and gathers each bucket's parameters just before it is sent. No rank ever holds the whole
model at once: at most one bucket's full tensors.

Pure torch (and peft's names); no Ray, no vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from core.lora import adapter_scaling, merge_sources, merged_state
from core.weight_plan import Bucket


class PolicySource:
    def __init__(self, policy: nn.Module, *, rank: int = 0):
        from core.sharding import is_sharded

        self.policy, self.rank = policy, rank
        self.sharded = is_sharded(policy)
        self.scaling = adapter_scaling(policy)
        self.sources = merge_sources(list(policy.state_dict()))
        if getattr(getattr(policy, "config", None), "tie_word_embeddings", False):
            self.sources.pop("lm_head.weight", None)

    def specs(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of every tensor the engines get, in model order. ``dtype``
        (the engines' own) replaces every floating dtype: the tensors travel cast to it."""
        state = self.policy.state_dict()
        specs = []
        for name, keys in self.sources.items():
            tensor = state[keys[0]]
            wire = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            specs.append((name, wire, tuple(tensor.shape)))  # a DTensor's shape is the whole tensor's
        return specs

    def materialize(self, bucket: Bucket) -> dict[str, torch.Tensor] | None:
        """The bucket's tensors by merged name: on rank 0, or on every rank when not sharded;
        None on the other ranks of a sharded policy (which still take part in the gathers)."""
        state = self.policy.state_dict()
        keys = [key for entry in bucket.entries for key in self.sources[entry.name]]
        full = dict(_gathered(state, keys))
        if self.sharded and self.rank != 0:
            return None
        merged = merged_state(full, self.scaling)
        return {entry.name: merged[entry.name] for entry in bucket.entries}


def _gathered(state: dict[str, torch.Tensor], keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each key's whole tensor, detached: a ``DTensor`` shard is all-gathered (every rank in
    the same order), a plain tensor is itself."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for key in keys:
            tensor = state[key]
            yield key, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()

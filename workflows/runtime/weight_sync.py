"""Weight sync as a collective (#16, work in progress): learner rank 0 broadcasts the policy
to every rollout engine's worker over one gloo group, in dtype-grouped buckets
(``core.weight_plan``), instead of one safetensors blob per engine through the object store.

``init()`` forms the group once (learner = rank 0, engine i = rank 1 + i); ``push(state,
version)`` sends every bucket while each engine receives and loads it. A peer that is gone
makes the broadcast fail within ``timeout_s``: :class:`TransportError`, never a quiet return.
See docs/weight-sync-plan.md for the whole design (restarts, FSDP, NCCL, checks).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from core.weight_plan import Bucket, pack, plan_buckets, to_wire


class TransportError(RuntimeError):
    """A push did not reach an engine (a peer gone, a timeout, a failed load)."""


class GlooBroadcast:
    """One gloo group over this learner and ``actors`` (rollout actors with ``sync_join`` and
    ``sync_receive``), on CPU."""

    def __init__(self, actors: Sequence[Any], *, bucket_bytes: int = 64 << 20, timeout_s: float = 120.0,
                 mode: str = "load"):
        self.actors, self.bucket_bytes, self.timeout_s, self.mode = list(actors), bucket_bytes, timeout_s, mode
        self.group = None
        self.plan: list[Bucket] | None = None

    def init(self) -> None:
        import ray
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        host = ray.util.get_node_ip_address()
        listener = socket.socket()
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        world = 1 + len(self.actors)
        joins = [actor.sync_join.remote(host, port, world, 1 + i, self.timeout_s) for i, actor in enumerate(self.actors)]
        try:
            self.group = stateless_init_torch_distributed_process_group(
                host, port, 0, world, backend="gloo", listen_socket=listener,
                timeout=timedelta(seconds=self.timeout_s))
            ray.get(joins, timeout=self.timeout_s)
        except Exception as exc:
            raise TransportError(f"the rollout engines did not join the broadcast group at {host}:{port}: {exc}") \
                from exc

    def push(self, state: Mapping[str, torch.Tensor], version: int) -> dict[str, float]:
        """Broadcast ``state`` (plain HF names) to every engine; returns seconds per part."""
        import ray

        if self.group is None:
            raise TransportError("push before init: no broadcast group")
        if self.plan is None:
            self.plan = plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in state.items()), self.bucket_bytes)
        started = time.monotonic()
        receives = [actor.sync_receive.remote(to_wire(self.plan), version, self.mode) for actor in self.actors]
        packing = sending = 0.0
        try:
            for bucket in self.plan:
                mark = time.monotonic()
                flat = pack(bucket, state)
                packing += time.monotonic() - mark
                mark = time.monotonic()
                self.group.broadcast(flat, root=0).wait()
                sending += time.monotonic() - mark
            stats = ray.get(receives, timeout=self.timeout_s)
        except Exception as exc:
            raise TransportError(f"weights version {version} did not reach every engine: {exc}") from exc
        loads = [s["load_seconds"] for s in stats]
        return {"sync_pack_seconds": packing, "sync_transfer_seconds": sending,
                "sync_load_seconds": max(loads), "sync_push_seconds": time.monotonic() - started}

    def close(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        if self.group is not None:
            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None

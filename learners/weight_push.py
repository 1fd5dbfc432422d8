"""How a weight sync's bytes reach the rollout engines (#16): forming each engine's group, the
bucket loop (gather, pack, send, one bucket on the wire while the next is packed), the canary
every engine echoes, the shared region of the ``shm`` transport (the buckets packed once into
memory the engines on this machine read in place; each of their groups carries one "bucket k
is ready" message per bucket) and the ``blob`` baseline. What to push, when to check and what to do
about failures is ``learners.weight_sync``'s part.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from actors.broadcast_group import Channel, GroupSpec, TransportUnavailable, listening_socket
from actors.shared_region import SharedRegion, offsets
from core.policy_source import PolicySource
from core.weight_plan import Bucket, Buffers, from_wire, pack, plan_buckets, to_wire
from learners.options import SyncOptions


@dataclass(eq=False)
class EngineLink:
    """Learner rank 0's view of one rollout engine."""

    index: int
    actor: Any
    generation: str | None = None  # the group formed with it; None until (re)joined
    channel: Channel | None = None
    node: str | None = None  # its Ray node, as it last said
    shared: bool = False  # joined to read the buckets from learner rank 0's shared region

    def drop_channel(self) -> None:
        channel, self.channel, self.generation, self.shared = self.channel, None, None, False
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - a group whose peer is gone may fail to shut down; it is dropped anyway
                pass


@dataclass
class Attempt:
    """What one push did (rank 0): seconds per part, and the engines it failed or lost."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sync_gather_s", "sync_pack_s", "sync_transfer_s", "sync_load_s", "sync_join_s"), 0.0))
    failed: dict[int, str] = field(default_factory=dict)  # engine index -> why
    dead: set[int] = field(default_factory=set)
    bytes: int = 0
    shared: int = 0  # engines that read the shared region


class Pusher:
    """This learner's end of the transfers: the groups (on rank 0) and the plan (on every rank)."""

    def __init__(self, options: SyncOptions, engines: list[EngineLink], source: PolicySource, *, rank: int,
                 transport: str, send_device: torch.device, engine_workers: int):
        self.options, self.engines, self.source, self.rank = options, engines, source, rank
        self.transport, self.send_device, self.engine_workers = transport, send_device, engine_workers
        self.token = f"{random.getrandbits(32):08x}"  # this learner process's groups: never an old one's
        self.joins = 0
        self.engine_dtype: str | None = None
        self.wire: list[dict] | None = None
        self.plan: list[Bucket] | None = None
        self.buffers: Buffers | None = None
        self.region: SharedRegion | None = None  # the shm transport's, on rank 0
        self.node: str | None = None  # rank 0's Ray node
        self.pending_join_s = 0.0

    def make_plan(self, first: EngineLink) -> list[dict]:
        """The bucket plan (its wire form) in the engines' dtype, which ``first`` reports when it
        joins (its join time counts in the next push)."""
        if self.transport != "blob":
            joined = Attempt()
            self.join(first, joined)
            self.pending_join_s = joined.seconds["sync_join_s"]
        dtype = getattr(torch, self.engine_dtype) if self.engine_dtype else None
        cap = self.options.sync_bucket_mb << 20 if self.transport != "blob" else 1 << 62
        return to_wire(plan_buckets(self.source.specs(dtype), cap))

    def use_plan(self, wire: list[dict]) -> None:
        """Rank 0's plan, on every learner (the same buckets in the same order)."""
        self.wire, self.plan = wire, from_wire(wire)

    def push(self, targets: list[int], version: int,
             agree: Callable[[Callable[[], Any]], Any] = lambda work: work()) -> Attempt:
        """Send the policy to the engines ``targets`` (indices; rank 0) as weights ``version``.
        Every learner calls it under FSDP: the gathers are collectives. Engines that failed
        or died are in the returned attempt; nothing is retried here. ``agree(work)`` runs
        rank 0's preparation (joins, the shared region, the receives) and tells every learner
        whether it failed, before the first gather (``WeightSync._on_rank0``)."""
        attempt = Attempt()
        attempt.seconds["sync_join_s"], self.pending_join_s = self.pending_join_s, 0.0
        links = [self.engines[i] for i in targets] if self.rank == 0 else []
        if self.transport == "blob":
            self._push_blob(links, version, attempt)
            return attempt
        import ray

        def prepare() -> tuple[SharedRegion | None, dict]:
            for link in links:
                if link.channel is None:
                    self.join(link, attempt)
            # sized before any engine maps it for this plan
            region = self._shared_region() if any(link.shared for link in links) else None
            return region, {link.index: link.actor.sync_receive.remote(link.generation, self.wire, version,
                                                                       self.options.sync_load)
                            for link in links if link.index not in attempt.failed and link.index not in attempt.dead}

        region, receives = agree(prepare) or (None, {})  # (None, {}) on the learners that only gather
        in_flight: deque = deque()
        attempt.shared = sum(link.shared for link in links)
        if self.rank == 0 and region is None and (self.buffers is None or self.send_device.type != "cpu"):
            # kept between syncs on the CPU (no page faults); on a GPU per push (the caching allocator)
            self.buffers = Buffers(self.plan, self.send_device)
        for k, bucket in enumerate(self.plan):
            mark = time.monotonic()
            tensors = self.source.materialize(bucket)
            attempt.seconds["sync_gather_s"] += time.monotonic() - mark
            if tensors is None or not receives:
                continue  # FSDP ranks other than 0 only take part in the gathers
            mark = time.monotonic()
            out = region.view(k) if region is not None else self.buffers.next(bucket)
            flat = pack(bucket, tensors, self.send_device, out=out)
            del tensors
            attempt.seconds["sync_pack_s"] += time.monotonic() - mark
            attempt.bytes += flat.numel() * flat.element_size()
            ready = torch.tensor([k], dtype=torch.int64)  # what the shared region's readers get
            in_flight.append((flat, ready, self._send(flat, links, receives, attempt, ready)))
            while len(in_flight) > 1:  # one bucket on the wire while the next is gathered and packed
                self._wait(in_flight.popleft()[-1], receives, attempt)
            self._notice_early_failures(receives, attempt)
        while in_flight:
            self._wait(in_flight.popleft()[-1], receives, attempt)
        if not receives:
            return attempt
        total = sum(b.numel for b in self.plan)
        canary = torch.tensor([random.getrandbits(62), version, len(self.plan), total], dtype=torch.int64,
                              device=self.send_device)
        if region is not None:
            region.stamp(*canary[:2].tolist())  # the readers return it: they read this sync's bytes
        self._wait(self._send(canary, links, receives, attempt), receives, attempt)
        for index, ref in receives.items():
            try:
                stats = ray.get(ref, timeout=self.options.sync_timeout)
            except ray.exceptions.RayActorError:
                attempt.dead.add(index)
                self.engines[index].drop_channel()
                continue
            except Exception as exc:  # noqa: BLE001 - the engine's own error, or a timeout: retried once
                attempt.failed.setdefault(index, _short(exc))
                self.engines[index].drop_channel()
                continue
            if stats["canary"] != canary.tolist():
                attempt.failed[index] = f"canary {stats['canary']}, sent {canary.tolist()}"
                continue
            if self.engines[index].shared and stats["stamp"] != canary[:2].tolist():
                attempt.failed[index] = f"the shared region read says sync {stats['stamp']}, sent {canary[:2].tolist()}"
                continue
            attempt.seconds["sync_load_s"] = max(attempt.seconds["sync_load_s"], stats["load_seconds"])
        return attempt

    def _send(self, flat: torch.Tensor, links: list[EngineLink], receives: dict, attempt: Attempt,
              ready: torch.Tensor | None = None) -> list:
        """``flat`` to each engine's group; ``ready`` instead to those reading the shared region."""
        works = []
        for link in links:
            if link.index in receives and link.index not in attempt.failed:
                try:
                    works.append((link, link.channel.broadcast(ready if link.shared and ready is not None else flat)))
                except Exception as exc:  # noqa: BLE001 - a broken group: retried once with a new one
                    self._fail(link, exc, attempt)
        return works

    def _wait(self, works: list, receives: dict, attempt: Attempt) -> None:
        mark = time.monotonic()
        for link, work in works:
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001 - a peer gone or past the timeout
                self._fail(link, exc, attempt)
        attempt.seconds["sync_transfer_s"] += time.monotonic() - mark

    def _notice_early_failures(self, receives: dict, attempt: Attempt) -> None:
        """An engine's receive that ended before the canary was sent failed: stop sending to it."""
        import ray

        done, _ = ray.wait(list(receives.values()), num_returns=len(receives), timeout=0)
        for index, ref in receives.items():
            if ref in done and index not in attempt.failed:
                try:
                    ray.get(ref)
                    why = "the engine ended its receive early"
                except ray.exceptions.RayActorError:
                    attempt.dead.add(index)
                    why = "the engine died"
                except Exception as exc:  # noqa: BLE001
                    why = _short(exc)
                self._fail(self.engines[index], why, attempt)

    def _fail(self, link: EngineLink, why: Any, attempt: Attempt) -> None:
        if link.index not in attempt.dead:
            attempt.failed.setdefault(link.index, _short(why))
        link.drop_channel()

    def join(self, link: EngineLink, attempt: Attempt) -> None:
        """Form a new group with ``link``'s engine (rank 0 binds the port; the engine's workers
        connect): its previous group, if any, is left on both sides."""
        import ray

        mark = time.monotonic()
        link.drop_channel()
        self.joins += 1
        host = ray.util.get_node_ip_address()
        listener = listening_socket(host)
        backend = "gloo" if self.transport == "shm" else self.transport
        spec = GroupSpec(backend, host, listener.getsockname()[1], 1 + self.engine_workers, self.options.sync_timeout,
                         f"{self.token}-{self.joins}")
        shared = self._shared_region().address if self._neighbour(link) else None
        joined = link.actor.sync_join.remote(asdict(spec), shared)
        try:
            channel = Channel(spec, 0, device=self.send_device, listen_socket=listener)
            answer = ray.get(joined, timeout=self.options.sync_timeout)
        except ray.exceptions.RayActorError:
            attempt.dead.add(link.index)
        except TransportUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - no answer within the timeout, or the engine refused
            attempt.failed[link.index] = f"join: {_short(exc)}"
        else:
            link.channel, link.generation, link.shared = channel, spec.generation, shared is not None
            self.engine_dtype = answer["dtype"]
        finally:
            listener.close()
        attempt.seconds["sync_join_s"] += time.monotonic() - mark

    def _neighbour(self, link: EngineLink) -> bool:
        """Whether ``link``'s engine reads the shared region: the shm transport, on this node."""
        if self.transport != "shm":
            return False
        if self.node is None:
            import ray

            self.node = ray.get_runtime_context().get_node_id()
        return link.node == self.node

    def _shared_region(self) -> SharedRegion:
        """Rank 0's region, sized for the plan once there is one (the whole policy in the
        engines' dtype, in this machine's memory: refused when it is not free)."""
        if self.region is None:
            self.region = SharedRegion.create(int(self.token, 16))
        if self.plan is not None and not self.region.buckets:
            refuse_unless_free(offsets(self.plan)[1])
            self.region.use_plan(self.plan)
        return self.region

    def close(self) -> None:
        for link in self.engines:
            link.drop_channel()
        region, self.region = self.region, None
        if region is not None:
            region.close()

    def _push_blob(self, links: list[EngineLink], version: int, attempt: Attempt) -> None:
        """The whole policy as one safetensors blob to each engine's ``load_weights``."""
        import ray

        from core.ppo_policy import weights_blob

        state: dict[str, torch.Tensor] = {}
        mark = time.monotonic()
        for bucket in self.plan:
            state.update(self.source.materialize(bucket) or {})
        attempt.seconds["sync_gather_s"] += time.monotonic() - mark
        if not links:
            return
        mark = time.monotonic()
        payload = weights_blob(state)
        del state
        attempt.bytes = len(payload)
        blob = ray.put(payload)
        del payload
        attempt.seconds["sync_pack_s"] += time.monotonic() - mark
        mark = time.monotonic()
        loads = {link.index: link.actor.load_weights.remote(blob, version) for link in links}
        for index, ref in loads.items():
            try:
                stats = ray.get(ref, timeout=self.options.sync_timeout)
            except ray.exceptions.RayActorError:
                attempt.dead.add(index)
                continue
            except Exception as exc:  # noqa: BLE001
                attempt.failed[index] = _short(exc)
                continue
            attempt.seconds["sync_load_s"] = max(attempt.seconds["sync_load_s"], stats["seconds"])
        attempt.seconds["sync_transfer_s"] += time.monotonic() - mark



def refuse_unless_free(needed: int, free: int | None = None) -> None:
    """The shm transport's region must fit in this machine's free memory (``free``: psutil's
    available bytes when not given); a region the kernel cannot back would end in the OOM killer."""
    if free is None:
        import psutil

        free = psutil.virtual_memory().available
    if needed > free:
        raise TransportUnavailable(
            f"--sync-transport shm needs {needed / 2**30:.1f} GiB of shared memory for the policy, this machine "
            f"has {free / 2**30:.1f} GiB free; use --sync-transport gloo")


def _short(exc: Any) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError: the engine's own exception says what went wrong
    if isinstance(cause, BaseException):
        exc = cause
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return text if len(text) < 300 else text[:300] + " ..."

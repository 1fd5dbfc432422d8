"""A fault-tolerant pool of Ray actors pulling shards until none are left.

``ray.util.ActorPool`` has no fault tolerance and Ray Data's fixed-size actor pools can hang
when an actor dies (PITFALLS.md), so the pool is ours and small:

* each worker slot keeps up to ``inflight_per_worker`` shards in flight, so the engine is
  never idle between shards;
* when an actor dies (killed, OOM, engine crash), its in-flight shards go back to the queue
  and the slot gets a fresh actor (named ``<name>-<slot>.r<k>``);
* a shard whose task fails counts an attempt; past ``max_attempts`` the run fails with the
  shard's last error instead of looping forever. Likewise a slot whose actors keep dying
  at start-up stops the run after ``max_attempts`` replacements.

:class:`ShardQueue` is the bookkeeping alone (no Ray), used here and in benchmarks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class ShardFailedError(RuntimeError):
    """A shard (or a worker slot) failed more often than allowed."""


@dataclass
class ShardQueue:
    pending: deque[int]
    max_attempts: int
    attempts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, shards: Iterable[int], max_attempts: int) -> ShardQueue:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        return cls(deque(shards), max_attempts)

    def take(self) -> int:
        shard = self.pending.popleft()
        self.attempts[shard] = self.attempts.get(shard, 0) + 1
        return shard

    def failed(self, shard: int, reason: str) -> None:
        """Requeue a failed shard at the front, or raise once it has used its attempts."""
        if self.attempts.get(shard, 0) >= self.max_attempts:
            raise ShardFailedError(
                f"shard {shard} failed {self.attempts[shard]} times (limit {self.max_attempts}); last error: {reason}"
            )
        self.pending.appendleft(shard)

    def __bool__(self) -> bool:
        return bool(self.pending)


@dataclass
class _Slot:
    actor: Any
    generation: int = 0
    inflight: int = 0
    replacements: int = 0


def _is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def run_shard_pool(
    *,
    make_actor: Callable[[int, int], Any],
    n_workers: int,
    queue: ShardQueue,
    submit: Callable[[Any, int], Any],
    on_result: Callable[[int, Any], None],
    on_failure: Callable[[int, str], None] = lambda shard, reason: None,
    inflight_per_worker: int = 2,
    poll_seconds: float = 5.0,
) -> None:
    """Drive ``submit(actor, shard) -> ObjectRef`` over the queue until every shard is done.

    ``make_actor(slot, generation)`` creates (or recreates) the actor of a slot;
    ``on_result(shard, result)`` runs on the driver for each finished shard, in completion
    order; ``on_failure(shard, reason)`` is told about each failed attempt.
    """
    import ray

    slots = {i: _Slot(make_actor(i, 0)) for i in range(n_workers)}
    inflight: dict[Any, tuple[int, int, int]] = {}  # ref -> (shard, slot, generation)

    def replace(slot_index: int, reason: str) -> None:
        slot = slots[slot_index]
        slot.replacements += 1
        if slot.replacements > queue.max_attempts:
            raise ShardFailedError(f"worker slot {slot_index} died {slot.replacements} times; last error: {reason}")
        logger.warning("worker %d died (%s); starting a replacement", slot_index, reason)
        ray.kill(slot.actor, no_restart=True)
        slot.generation += 1
        slot.actor = make_actor(slot_index, slot.generation)
        slot.inflight = 0

    try:
        while queue or inflight:
            for slot_index, slot in slots.items():
                while queue and slot.inflight < inflight_per_worker:
                    shard = queue.take()
                    inflight[submit(slot.actor, shard)] = (shard, slot_index, slot.generation)
                    slot.inflight += 1
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=poll_seconds)
            for ref in ready:
                shard, slot_index, generation = inflight.pop(ref)
                slot = slots[slot_index]
                if generation == slot.generation:
                    slot.inflight -= 1
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - classified below
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    on_failure(shard, reason)
                    if _is_actor_death(exc) and generation == slot.generation:
                        replace(slot_index, reason)
                    queue.failed(shard, reason)
                    continue
                on_result(shard, result)
    finally:
        for slot in slots.values():
            ray.kill(slot.actor, no_restart=True)

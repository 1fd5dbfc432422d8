"""A fault-tolerant pool of Ray actors pulling shards until none are left.

``ray.util.ActorPool`` has no fault tolerance and Ray Data's fixed-size actor pools can hang
when an actor dies (docs/vllm-cpu-facts.md), so the pool is ours and small:

* each worker slot keeps up to ``inflight_per_worker`` shards in flight, so the engine is
  never idle between shards;
* when an actor dies (killed, OOM, engine crash), its in-flight shards go back to the queue
  and the slot gets a fresh actor (named ``<name>-<slot>.r<k>``);
* a slot gets shards only once its actor has answered ``ready()``, so shards never queue
  behind an actor that is still waiting for a node;
* the pool can grow while it runs: ``grow`` says how many slots to add (an elastic pool adds
  one per worker that the nodes joined since can hold), and ``on_workers`` hears the number of
  workers up whenever it changes;
* when no worker is up because their nodes are gone and nothing replaces them, the pool
  says what it waits for and stops after the placement timeout (finished shards are kept);
* an actor whose creation Ray refuses (``ActorClass.remote()`` raising, as a cancelled creation
  does) is a death like any other: the slot tries again after :data:`RETRY_CREATE_S`;
* a replaced actor, and every actor when the pool ends, is asked to shut its engine down before
  it is killed, for a bounded time (``workflows.runtime.engine_stop``): vLLM's engine processes
  are not Ray workers. An actor still starting is killed at once (a shutdown would wait behind
  its ``__init__``), and Ray reaps what its engine had started;
* a shard whose task fails counts an attempt; past ``max_attempts`` the run fails with the
  shard's last error instead of looping forever. Likewise a slot whose actors keep dying
  at start-up stops the run after ``max_attempts`` replacements. A death that came with the
  actor's node counts neither: the placement timeout bounds node loss.

:class:`ShardQueue` is the bookkeeping alone (no Ray), used here and in benchmarks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from workflows.runtime.engine_stop import stop_engine_actors

logger = logging.getLogger(__name__)
RETRY_CREATE_S = 2.0  # after Ray refused to create a slot's actor, before the slot tries again


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

    def lost(self, shard: int) -> None:
        """Requeue a shard lost with its worker's node, at the front, without counting the attempt:
        node loss is bounded by the placement timeout, not by ``max_attempts``."""
        self.attempts[shard] -= 1
        self.pending.appendleft(shard)

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
    actor: Any  # None when Ray refused to create it: tried again at retry_at, as a death
    ready_ref: Any  # resolves once the actor is up; None after that
    generation: int = 0
    inflight: int = 0
    replacements: int = 0
    retry_at: float = 0.0
    refused: BaseException | None = None  # why its creation was refused

    @property
    def up(self) -> bool:
        return self.actor is not None and self.ready_ref is None


class NoCapacityError(RuntimeError):
    """No worker of the pool could be placed for the placement timeout (nodes lost, none added)."""


def _is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def _lost_with_its_node(exc: BaseException) -> bool:
    """Whether an actor died because its node did (removed, preempted, or failing its health
    checks), not because of anything it ran. Ray 2.60 has no public field for it: its GCS says
    "The actor died because its node has died." in the error's text, and marks an autoscaler
    drain as ``preempted``."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) and (exc.preempted or "because its node has died" in str(exc))


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong: for a task that raised, the worker's own exception
    (a RayTaskError's first line only names the task and its pid)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


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
    unplaced: Callable[[], str | None] = lambda: None,
    placement_timeout_s: float | None = None,
    on_wait: Callable[[str], None] = lambda message: None,
    report_every_s: float = 30.0,
    hold: Callable[[], bool] = lambda: False,
    grow: Callable[[int, int], int] = lambda slots, pending: 0,
    grow_every_s: float = 2.0,
    on_workers: Callable[[int], None] = lambda up: None,
) -> None:
    """Drive ``submit(actor, shard) -> ObjectRef`` over the queue until every shard is done.

    ``make_actor(slot, generation)`` creates (or recreates) the actor of a slot; a slot gets
    shards once its actor's ``ready()`` has answered. ``on_result(shard, result)`` runs on
    the driver for each finished shard, in completion order; ``on_failure(shard, reason)`` is
    told about each failed attempt.

    ``unplaced()`` describes the pool's workers that have no node now (None when all are
    placed). While no worker is up and some are unplaced, the pool is waiting for capacity:
    it says so through ``on_wait`` every ``report_every_s`` and raises :class:`NoCapacityError`
    after ``placement_timeout_s`` (None: waits forever; ``ClusterOptions.wait_s``).

    While ``hold()`` is true (a fault drill), the pool hands out no shard: the ones in flight
    finish and the workers idle. Held workers count as not up, so once their nodes are gone
    the pool stops after the placement timeout like any pool without workers.

    Every ``grow_every_s``, ``grow(slots, queued)`` says how many slots to add, given the slots
    and the shards not yet handed out; ``make_actor`` is then called for the new slot numbers.
    Whenever the number of workers up (started, and not replaced since) changes,
    ``on_workers(up)`` hears it.
    """
    import ray
    from ray.exceptions import RayError

    def start(slot_index: int, generation: int) -> _Slot:
        try:
            actor = make_actor(slot_index, generation)
        except RayError as exc:  # e.g. RaySystemError "Actor creation cancelled" from the GCS
            logger.warning("worker %d could not be created (%s); trying again in %g s", slot_index, _reason(exc),
                           RETRY_CREATE_S)
            return _Slot(None, None, generation, retry_at=time.monotonic() + RETRY_CREATE_S, refused=exc)
        return _Slot(actor, actor.ready.remote(), generation)

    slots = {i: start(i, 0) for i in range(n_workers)}
    inflight: dict[Any, tuple[int, int, int]] = {}  # ref -> (shard, slot, generation)
    starting: dict[Any, int] = {}  # ready ref -> slot
    stalled_since: float | None = None
    last_report = last_grow = time.monotonic()
    workers_up = -1

    def replace(slot_index: int, exc: BaseException) -> None:
        """A fresh actor for a slot whose actor died. Deaths count toward ``max_attempts`` unless
        the actor's node died: a shrinking cluster can place a replacement on a node that is
        already gone but not yet noticed, several times over; the placement timeout bounds that."""
        slot, reason, counted = slots[slot_index], _reason(exc), not _lost_with_its_node(exc)
        if counted and slot.replacements + 1 > queue.max_attempts:
            raise ShardFailedError(
                f"worker slot {slot_index} died {slot.replacements + 1} times; last error: {reason}"
            )
        logger.warning("worker %d %s (%s); starting a replacement", slot_index,
                       "died" if counted else "was lost with its node", reason)
        if slot.actor is not None:  # dead or failed to start: its shutdown answers at once with an error
            stop_engine_actors([slot.actor])
        fresh = start(slot_index, slot.generation + 1)
        fresh.replacements = slot.replacements + counted
        slots[slot_index] = fresh

    try:
        while queue or inflight:
            if time.monotonic() - last_grow >= grow_every_s:
                last_grow = time.monotonic()
                for slot_index in range(len(slots), len(slots) + grow(len(slots), len(queue.pending))):
                    slots[slot_index] = start(slot_index, 0)
            for slot_index, slot in list(slots.items()):
                if slot.refused is not None and time.monotonic() >= slot.retry_at:
                    replace(slot_index, slot.refused)
            up = sum(s.up for s in slots.values())
            if up != workers_up:
                workers_up = up
                on_workers(up)
            starting = {s.ready_ref: i for i, s in slots.items() if s.ready_ref is not None}
            held = hold()
            for slot_index, slot in slots.items():
                while slot.up and queue and not held and slot.inflight < inflight_per_worker:
                    shard = queue.take()
                    inflight[submit(slot.actor, shard)] = (shard, slot_index, slot.generation)
                    slot.inflight += 1
            waitables = [*inflight, *starting]
            if not waitables:  # held, and nothing in flight: ray.wait([]) would return at once
                time.sleep(poll_seconds)
            ready, _ = ray.wait(waitables, num_returns=1, timeout=poll_seconds) if waitables else ([], [])
            for ref in ready:
                if ref in starting:
                    slot_index = starting[ref]
                    try:
                        ray.get(ref)
                        slots[slot_index].ready_ref = None
                    except Exception as exc:  # noqa: BLE001 - the actor could not start
                        replace(slot_index, exc)
                    continue
                shard, slot_index, generation = inflight.pop(ref)
                slot = slots[slot_index]
                if generation == slot.generation:
                    slot.inflight -= 1
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - classified below
                    reason = _reason(exc)
                    on_failure(shard, reason)
                    if _is_actor_death(exc) and generation == slot.generation:
                        replace(slot_index, exc)
                    if _lost_with_its_node(exc):
                        queue.lost(shard)
                    else:
                        queue.failed(shard, reason)
                    continue
                on_result(shard, result)

            live = not held and any(s.up for s in slots.values())
            missing = None if live else unplaced()
            now = time.monotonic()
            if missing is None:
                stalled_since = None
                continue
            stalled_since = stalled_since or now
            waited = now - stalled_since
            if placement_timeout_s is not None and waited >= placement_timeout_s:
                raise NoCapacityError(
                    f"no worker could be placed for {waited:.0f} s (--placement-timeout {placement_timeout_s:g}): "
                    f"{missing}. {len(queue.pending) + len(inflight)} shard(s) are not done; finished shards "
                    "are kept: add capacity and rerun the same command to finish the rest"
                )
            if now - last_report >= report_every_s:
                on_wait(f"no worker is up; waiting {waited:.0f} s for capacity: {missing}")
                last_report = now
    finally:
        stop_engine_actors(slot.actor for slot in slots.values() if slot.up)
        for slot in slots.values():
            if slot.actor is not None and slot.ready_ref is not None:  # still in __init__, where a shutdown would queue
                ray.kill(slot.actor, no_restart=True)

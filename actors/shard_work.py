"""What every shard-processing worker shares: run a shard's rows concurrently on an async
engine, turn row failures into rejects, measure batch occupancy, report the shard.

A worker's ``run_shard(shard, rows)`` is ``await run_rows(shard, rows, self._row, ...)``
where ``_row(row)`` returns the row's output rows. Row failures are handled here, once, for
every worker: a :class:`RowRejected` or one of the worker's ``expected`` errors (a prompt
too long, a chain that produced nothing) rejects the row with its message; any other error
rejects it naming the error; a dead engine sinks the shard (the pool reruns it elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from actors.metrics import StageMetrics

SAMPLE_SECONDS = 0.05
RowResult = tuple[list[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class ShardResult:
    """What a worker's ``run_shard`` reports for one shard: the rows to write, and how the work
    went, for the run's manifest (``ShardState``), progress line and summary."""

    shard: int
    rows: list[dict[str, Any]]  # output rows, in input order
    rejects: list[dict[str, Any]]  # one per rejected input row: index, id, reason, stage
    tokens: int  # tokens generated: the output rows' ``generated_tokens``, summed
    seconds: float  # the shard's own time, start to finish (monotonic)
    started_at: float  # wall clock (time.time) at the start and the end
    finished_at: float
    worker: str  # who did it: ``worker_label()``
    # requests the worker's engines held, summed over occupancy_samples samples taken since the
    # worker's previous shard (OccupancySampler): their mean is how full the batch was kept
    occupancy_sum: int
    occupancy_samples: int


class RowRejected(Exception):
    """This row cannot be processed, for the reason given (it goes to ``rejects/``)."""


def reject(row: dict[str, Any], reason: str, stage: str) -> dict[str, Any]:
    return {"index": row["index"], "id": row["id"], "reason": reason, "stage": stage}


async def guarded_row(row: dict[str, Any], process_row: Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]],
                      stage: str, expected: tuple[type[BaseException], ...] = ()) -> RowResult:
    """``(output rows, None)``, or ``([], reject)`` when the row fails; a dead engine raises."""
    try:
        return await process_row(row), None
    except (RowRejected, *expected) as exc:
        return [], reject(row, str(exc), stage)
    except Exception as exc:  # noqa: BLE001 - one row's failure must not sink the shard
        if engine_dead(exc):
            raise
        return [], reject(row, f"{stage} error: {type(exc).__name__}: {exc}", stage)


def engine_dead(exc: BaseException) -> bool:
    # vLLM's engine client imports this module; where it is not loaded, no engine ran here
    exceptions = sys.modules.get("vllm.v1.engine.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.EngineDeadError)


class OccupancySampler:
    """Samples how many requests the engines hold, for the actor's whole life, idle gaps
    included: the mean shows how full the batch is kept (what matters on GPUs, where decode
    is memory-bound and a fuller batch is faster)."""

    def __init__(self, count_requests: Callable[[], int]):
        self._count = count_requests
        self._sum = self._samples = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._sum += self._count()
            self._samples += 1
            await asyncio.sleep(SAMPLE_SECONDS)

    def take(self) -> tuple[int, int]:
        taken = (self._sum, self._samples)
        self._sum = self._samples = 0
        return taken


async def run_rows(
    shard: int,
    rows: list[dict[str, Any]],
    process_row: Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]],
    sampler: OccupancySampler,
    metrics: StageMetrics,
    *,
    stage: str,
    expected: tuple[type[BaseException], ...] = (),
) -> ShardResult:
    """Every row's work at once; output rows in input order, rejects, counters."""
    started, started_at = time.monotonic(), time.time()
    sampler.start()
    try:
        results = await asyncio.gather(*(guarded_row(row, process_row, stage, expected) for row in rows))
    except Exception as exc:
        if engine_dead(exc):
            # The engine cannot recover in this process: exit so Ray reports the actor dead
            # and the pool reruns this shard on a fresh one.
            os._exit(1)
        raise
    out = [r for rows_out, _ in results for r in rows_out]
    rejects = [j for _, j in results if j is not None]
    seconds = time.monotonic() - started
    metrics.shard_seconds(seconds)
    occupancy_sum, occupancy_samples = sampler.take()
    if occupancy_samples:
        metrics.running_requests(occupancy_sum / occupancy_samples)
    return ShardResult(
        shard=shard,
        rows=out,
        rejects=rejects,
        tokens=sum(r.get("generated_tokens", 0) for r in out),
        seconds=seconds,
        started_at=started_at,
        finished_at=time.time(),
        worker=worker_label(),
        occupancy_sum=occupancy_sum,
        occupancy_samples=occupancy_samples,
    )


def worker_label() -> str:
    """``<actor name> <host>:<pid>`` (the name only inside a named Ray actor): who did a shard."""
    where = f"{os.uname().nodename}:{os.getpid()}"
    try:
        import ray

        name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray the host and pid still say who
        name = None
    return f"{name} {where}" if name else where

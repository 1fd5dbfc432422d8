"""Which prompts each learner samples at each step, with which weights, and when.

Synchronous (``--max-staleness 0``), a step samples its batch, scores and trains on it, then
pushes the new weights to the engines. Overlapped (``--max-staleness N``, N ≥ 1), the batch of
step k+1 is submitted before the learners train on step k's, so the engines sample while the
learners train; a background thread in each learner waits for the engines' answers (Ray calls
only: every collective stays on the learner's main thread).

The rules the schedule keeps:

* the engines take new weights only between batches: a push starts once the learner has
  collected every answer of the batch in flight (and an engine waits for its own requests to
  finish before loading, ``actors/rollout_worker.py``);
* every trained batch was sampled by a policy at most N versions older than the learner's:
  before a batch is submitted, the engines are brought to the learner's version when theirs
  would be too old by the time that batch is trained;
* the catch-up path (no engine holds the version asked for: an engine restarted, a resumed
  run) pushes the learner's own weights under the learner's own version, never under an older
  label, and samples what is missing with them;
* a learner restarted from a checkpoint has nothing in flight: it samples the step it resumes
  at again, from the same prompts and seeds, so no batch is trained twice or skipped.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from learners.ppo_config import PPOConfig
from learners.ranks import any_rank, barrier
from learners.rollout_client import RolloutClient
from learners.weight_sync import Reference, WeightSync


@functools.lru_cache(maxsize=4)
def _pass_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_prompts))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_prompts(n_prompts: int, step: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """Indices of this rank's prompts at ``step``: a seeded permutation per pass over the
    prompts, ``batch`` per step in all, split evenly over ranks. Identical after a restart."""
    indices = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(k, n_prompts)
        indices.append(_pass_order(n_prompts, seed, epoch)[offset])
    share = batch // world
    return indices[rank * share:(rank + 1) * share]


def step_seeds(cfg: PPOConfig, step: int, rank: int, count: int) -> list[int]:
    """One sampling seed per (step, position in the step's batch): a rerun with --seed, or a
    restarted learner, samples the same answers."""
    return [cfg.learner.seed * 1_000_003 + step * cfg.rollout_batch + rank * count + k for k in range(count)]


@dataclass
class Batch:
    """One step's rollouts on one learner: asked for, then answered."""

    step: int  # the PPO step (0-based) whose prompts these are
    indices: list[int]  # the prompts' indices
    version: int  # the weights version asked of the engines
    submitted: float  # time.monotonic() when the request left
    future: Future | None = None  # while in flight: (results, finished at, engines live)
    results: list[Any] = field(default_factory=list)
    finished: float = 0.0
    live: int = 0  # fewest engines that held the version while it was sampled
    catch_up: dict[str, Any] = field(default_factory=dict)


class RolloutSchedule:
    """A learner's side of the rollouts: submits each step's prompts, collects the answers,
    and pushes weights to the engines when the schedule says so (see the module's rules)."""

    def __init__(self, cfg: PPOConfig, client: RolloutClient, sync: WeightSync, prompts: list[list[int]], *,
                 rank: int, world: int, device: torch.device, engine_version: int):
        self.cfg, self.client, self.sync, self.prompts = cfg, client, sync, prompts
        self.rank, self.world, self.device = rank, world, device
        # the version the engines were last brought to; after a restart it is a guess that the
        # catch-up corrects (an engine holding another version answers no request for this one)
        self.engine_version = engine_version
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cai-rollouts")

    def submit(self, step: int, version: int, crash: int | None = None) -> Batch:
        """Ask the engines for ``step``'s rollouts with weights ``version``; returns at once.
        ``crash``: the fault drill, an engine that dies under its part of the batch."""
        indices = step_prompts(len(self.prompts), step, self.cfg.rollout_batch, self.rank, self.world,
                               self.cfg.learner.seed)
        prompts = [self.prompts[i] for i in indices]
        seeds = step_seeds(self.cfg, step, self.rank, len(indices))

        def sample() -> tuple[list[Any], float, int]:
            self.client.live_in_step = len(self.client.actors)
            results = self.client.generate(prompts, version, self.cfg.sampling, seeds, crash=crash)
            return results, time.monotonic(), self.client.live_in_step

        return Batch(step, indices, version, time.monotonic(), self.pool.submit(sample))

    def collect(self, batch: Batch, version: int, reference: Reference) -> Batch:
        """Wait for ``batch``'s answers. When no engine held its version (all restarted, or a
        resumed run), the learners push their own weights, ``version``, together, and sample
        what is missing with them: a collective round on every learner until every learner has
        all its rollouts. Catch-up metrics go to ``batch.catch_up`` (prefixed ``catchup_``)."""
        batch.results, batch.finished, batch.live = batch.future.result()
        batch.future = None
        prompts = [self.prompts[i] for i in batch.indices]
        seeds = step_seeds(self.cfg, batch.step, self.rank, len(batch.indices))
        for _ in range(2 * len(self.client.actors) + 4):
            if not any_rank(any(r is None for r in batch.results), self.device):
                return batch
            started = time.monotonic()
            synced = self.sync.sync(version, reference, only_if_stale=True)
            self.engine_version = version
            seconds = batch.catch_up.get("catchup_sync_seconds", 0.0) + time.monotonic() - started
            batch.catch_up = {"catchup_sync_seconds": seconds, **{
                f"catchup_{k}": v for k, v in synced.items() if k in ("sync_logprob_diff", "sync_engines")}}
            self.client.live_in_step = len(self.client.actors)
            self.client.generate(prompts, version, self.cfg.sampling, seeds, batch.results)
            batch.finished, batch.live = time.monotonic(), min(batch.live, self.client.live_in_step)
        raise RuntimeError("rollouts kept failing: the rollout engines died or restarted repeatedly")

    def push(self, version: int, reference: Reference) -> dict[str, Any]:
        """Bring every engine to the learner's weights as ``version`` (every learner calls it:
        FSDP gathers each bucket together), then wait for every learner."""
        started = time.monotonic()
        synced = self.sync.sync(version, reference)
        self.engine_version = version
        barrier()
        return {**synced, "sync_version": version, "sync_seconds": time.monotonic() - started}

    def begin_step(self, step: int, ahead: Batch | None, reference: Reference,
                   drill: Callable[[int], int | None] = lambda step: None) -> tuple[Batch, Batch | None, dict[str, Any]]:
        """The rollouts of ``step`` (0-based; the learner holds version ``step``): ``ahead`` when
        they were submitted while the last step trained, else sampled now with the learner's own
        weights. Overlapped, the engines then take the learner's weights if the next batch would
        otherwise be too old, and that batch is submitted before this one trains. ``drill(k)``
        names the engine that dies under step k's batch (the fault drill), or None. Returns this
        step's batch, the next one (or None) and the push's metrics (empty when none ran)."""
        if ahead is None:
            ahead = self.submit(step, step, drill(step))
        batch = self.collect(ahead, step, reference)
        pushed: dict[str, Any] = {}
        following = None
        if self.cfg.max_staleness and step + 1 < self.cfg.steps:
            if self.too_old(step + 1):
                pushed = self.push(step, reference)  # every answer is in: the engines are idle
            following = self.submit(step + 1, self.engine_version, drill(step + 1))
        return batch, following, pushed

    def end_step(self, step: int, reference: Reference) -> dict[str, Any]:
        """After ``step`` trained: in the synchronous schedule the engines take the new policy
        (version ``step + 1``) now; overlapped, :meth:`begin_step` pushes when it must."""
        return {} if self.cfg.max_staleness else self.push(step + 1, reference)

    def too_old(self, step: int) -> bool:
        """Whether a batch submitted now for ``step`` would be trained by a policy more than
        ``--max-staleness`` versions newer than the engines' (the learner trains step k at
        version k)."""
        return step - self.engine_version > self.cfg.max_staleness

    def close(self, wait: bool = True) -> None:
        """Stop the background thread: after the last step nothing is in flight; after a failure
        (``wait=False``) a request still out is left to end with the process, not waited for."""
        self.pool.shutdown(wait=wait, cancel_futures=True)

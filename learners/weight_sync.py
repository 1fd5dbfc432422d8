"""Weight sync as a collective (#16): the learners bring every rollout engine to the current
policy version, learner rank 0 sending.

One interface, :class:`WeightSync` (``sync(version, reference)``, called by every learner at
the same points), over four transports chosen explicitly by ``--sync-transport``:

* ``gloo`` (CPU): one broadcast group per engine, learner rank 0 plus that engine's workers
  (``actors.broadcast_group``). The policy travels in dtype-grouped packed buckets
  (``core.weight_plan``), the plan (names, shapes, offsets) once per sync in the engine's
  ``sync_receive`` call, then a canary (nonce, version, bucket count, elements) that each
  engine echoes: a transfer that moved nothing cannot pass for one that worked. The groups of
  several engines send concurrently (gloo runs each group's work on its own threads), and a
  restarted engine rejoins alone, with a new group generation, without stalling the others.
* ``shm`` (CPU, the default there): as gloo, but the engines on learner rank 0's machine read
  the buckets from one shared-memory region rank 0 packs them into once
  (``actors.shared_region``); their groups carry only a "bucket k is ready" message each.
  On one machine a second engine then costs next to nothing, where over gloo it is a second
  stream of the same bytes through loopback. Engines on other machines get them over gloo.
* ``nccl`` (GPU): the same over vLLM's ``PyNcclCommunicator`` (refused, never a no-op, where
  NCCL cannot load).
* ``blob``: the policy as one safetensors blob through the object store to each engine's
  ``load_weights`` (the path before #16; kept as the baseline of ``bench_ppo``).

This module decides (which engines, whether to check, retry or stop); the transfers
themselves are ``learners.weight_push``. Under FSDP every learner takes part: each bucket's parameters are all-gathered just before it
is sent (``core.policy_source``), so no rank holds the whole policy. Rank 0 decides what to
push and shares its decision over the learners' own group.

The exactness check (the engine's log-probs of a reference sequence against the learner's)
runs at the first sync, every ``--sync-check-every`` versions, and for an engine that came
back from a restart, before it serves. An engine that fails the transfer or the check gets a
new group and a second push; a second failure stops the run (:class:`TransportError`). A dead
engine sits out until Ray has restarted it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from actors.broadcast_group import TransportError, TransportUnavailable
from core.policy_source import PolicySource
from learners.options import TRANSPORTS, SyncOptions
from learners.weight_push import Attempt, EngineLink, Pusher

STALE_RATIO = 0.5  # a sync must remove at least half of a gap above the noise
Reference = tuple[list[int], list[int]]  # (prompt ids, response ids): what the check scores


class PeerFailed(RuntimeError):
    """Learner rank 0 failed in a step only it takes; the other learners stop with it."""


class WeightSync:
    """Every learner builds one (``rank``/``world`` of the learners); rank 0 talks to the engines."""

    def __init__(self, options: SyncOptions, actors: Sequence[Any], source: PolicySource, *, rank: int, world: int,
                 use_gpu: bool, device: torch.device, learner_logprobs: Callable[[Reference], torch.Tensor],
                 engine_workers: int = 1, wait_timeout: float | None, ping_timeout: float = 2.0,
                 learner_dtype: str = "float32"):
        """``learner_dtype``: the dtype of ``learner_logprobs``' forward (bfloat16 under FSDP's
        mixed precision), which bounds the check's tolerance as the engines' dtype does."""
        self.options, self.rank, self.learner_dtype = options, rank, learner_dtype
        self.transport = options.transport(use_gpu)
        if self.transport not in TRANSPORTS:
            raise TransportUnavailable(f"unknown --sync-transport {self.transport!r}")
        self.engines = [EngineLink(i, actor) for i, actor in enumerate(actors)]
        self.device, self.learner_logprobs = device, learner_logprobs
        self.wait_timeout, self.ping_timeout = wait_timeout, ping_timeout
        self.collective = source.sharded and world > 1  # FSDP: every learner gathers each bucket
        self.pusher = Pusher(options, self.engines, source, rank=rank, transport=self.transport,
                             send_device=device if self.transport == "nccl" else torch.device("cpu"),
                             engine_workers=engine_workers)  # each engine's tensor-parallel workers: all receive
        self.restarts = 0  # engines found back from a restart, brought up to date and checked
        self.checked = False

    # -- the collective entry point -------------------------------------------------------

    def sync(self, version: int, reference: Reference, *, only_if_stale: bool = False) -> dict[str, Any]:
        """Bring every live engine to ``version`` (every learner calls this at the same point).
        ``only_if_stale``: a catch-up between rollouts; the check then runs only for restarted
        engines. Returns rank 0's metrics (``{}`` on the others, and when nothing was pushed)."""
        if self.rank != 0 and not self.collective:
            return {}
        started = time.monotonic()
        decision = self._on_rank0(lambda: self._decide(version, only_if_stale), share=True)
        if not decision["targets"]:
            return {}
        if self.pusher.wire is None:
            self.pusher.use_plan(decision["wire"])
        targets, check = decision["targets"], decision["check"]
        metrics: dict[str, Any] = {"sync_transport": self.transport, "sync_engines": len(targets),
                                   "sync_buckets": len(self.pusher.plan), "presync_logprob_diff": None,
                                   "sync_logprob_diff": None, "sync_check_s": 0.0, "sync_retries": 0}
        mark = time.monotonic()
        expected = self.learner_logprobs(reference) if check else None  # a forward on every learner under FSDP
        before: dict[int, float] = {}  # each checked engine's gap before the push: a stale one keeps it
        if check and self.rank == 0:
            for index in targets:
                gaps = self._engine_gaps(self.engines[index], reference, expected)
                if gaps is not None:
                    before[index] = float(gaps.max())
            metrics["presync_logprob_diff"] = max(before.values()) if before else None
        metrics["sync_check_s"] = time.monotonic() - mark if check else 0.0
        for attempt_no in (1, 2):
            attempt = self.pusher.push(targets, version, agree=self._on_rank0)
            if self.rank == 0:
                for key, value in attempt.seconds.items():
                    metrics[key] = metrics.get(key, 0.0) + value
                metrics["sync_bytes"] = attempt.bytes
                metrics["sync_shared_engines"] = attempt.shared
                pushed = [i for i in targets if i not in attempt.failed and i not in attempt.dead]
                if check and pushed:
                    mark = time.monotonic()
                    diffs = self._check(pushed, reference, expected, attempt, before)
                    metrics["sync_check_s"] += time.monotonic() - mark
                    metrics["sync_logprob_diff"] = max(diffs) if diffs else None
            retry = self._share(sorted(attempt.failed) if self.rank == 0 else None)
            if not retry:
                break
            if attempt_no == 2:
                raise TransportError(f"weights version {version} failed twice on rollout engine(s) "
                                     f"{retry}: {attempt.failed}")
            metrics["sync_retries"] = len(retry)
            targets = retry
            for index in retry if self.rank == 0 else ():
                self.engines[index].drop_channel()  # a new group for the second try
        self.checked = self.checked or check
        if self.rank == 0:
            self._settle(decision["restarted"], attempt)
        metrics["sync_push_s"] = time.monotonic() - started - metrics["sync_check_s"]
        metrics["sync_joins"] = self.pusher.joins  # groups formed by this learner so far (first joins and rejoins)
        return metrics if self.rank == 0 else {}

    # -- rank 0: which engines, and whether to check -----------------------------------------

    def _decide(self, version: int, only_if_stale: bool) -> dict[str, Any]:
        if version == self.options.sync_fail_at_version:  # the fault drill: a rank-0-only failure
            raise TransportUnavailable(f"fault drill: learner rank 0 fails preparing the push of version {version}")
        states = self._ping()
        targets, restarted = [], []
        for link in self.engines:
            state = states.get(link.index)
            if state is None:
                continue  # dead or restarting: it is brought up to date once it answers
            link.node = state["node"]
            if state["restarted"]:  # back from a crash with its starting weights
                restarted.append(link.index)
            in_group = self.transport == "blob" or (state["generation"] == link.generation is not None)
            if not in_group:
                link.drop_channel()
            if state["version"] != version or not in_group or state["restarted"]:
                targets.append(link.index)
        check = bool(targets) and (bool(restarted) or not self.checked or
                                   (not only_if_stale and version % self.options.sync_check_every == 0))
        wire = self.pusher.wire
        if targets and wire is None:
            wire = self.pusher.make_plan(self.engines[targets[0]])
        return {"targets": targets, "check": check, "restarted": restarted, "wire": wire}

    def _settle(self, restarted: list[int], attempt: Attempt) -> None:
        """Engines back from a restart that now hold the checked weights: counted, and told."""
        import ray

        for index in restarted:
            if index not in attempt.failed and index not in attempt.dead:
                self.restarts += 1
                try:
                    ray.get(self.engines[index].actor.settled.remote(), timeout=self.options.sync_timeout)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # gone again: it says restarted when it is back

    def _ping(self) -> dict[int, dict]:
        """``sync_state`` of every engine that answers within the ping timeout; when none
        does, wait (up to --placement-timeout) for the first one back."""
        from learners.rollout_client import answers

        return answers([link.actor for link in self.engines], "sync_state", ping_timeout=self.ping_timeout,
                       wait_timeout=self.wait_timeout)

    def _on_rank0(self, work: Callable[[], Any], *, share: bool = False) -> Any:
        """Run ``work`` on rank 0 alone, then tell every learner whether it failed (one
        broadcast among the learners), so that an error there stops them all at this point
        instead of leaving the others in the next collective until the process group's
        timeout (30 minutes). Returns rank 0's value: on every learner with ``share``, else
        on rank 0 (None on the others)."""
        failure: BaseException | None = None
        value = None
        if self.rank == 0:
            try:
                value = work()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
                failure = exc
        if not self.collective:
            if failure is not None:
                raise failure
            return value
        outcome = self._share(None if self.rank != 0 else
                              {"error": f"{type(failure).__name__}: {failure}" if failure else None,
                               "value": value if share else None})
        if failure is not None:
            raise failure
        if outcome["error"]:
            raise PeerFailed(f"learner rank 0 failed, so this learner stops too: {outcome['error']}")
        return outcome["value"] if share else value

    def _share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every learner (under FSDP; the others decide nothing)."""
        if not self.collective:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)  # among this run's own learners
        return box[0]

    # -- the exactness check (rank 0) ------------------------------------------------------

    def _check(self, indices: list[int], reference: Reference, expected: torch.Tensor, attempt: Attempt,
               before: dict[int, float]) -> list[float]:
        """Each engine's log-probs of ``reference`` against the learner's. A push fails when
        the gap is over the tolerance, or when it is not clearly below the engine's gap before
        the push (``before``) where that was above the precision's noise: in 16 bits the
        tolerance alone is wider than what a PPO step moves, so a stale engine could pass it."""
        # the precision of the two sides' log-probs: the lower one sets what the check can see
        dtype = self.pusher.engine_dtype if self.learner_dtype in ("float32", "float64") else self.learner_dtype
        tolerance, noise = self.options.tolerance(dtype), self.options.noise(dtype)
        diffs = []
        for index in indices:
            gaps = self._engine_gaps(self.engines[index], reference, expected)
            if gaps is None:
                attempt.dead.add(index)
                continue
            diffs.append(float(gaps.max()))
            # an unlikely token (log-prob -30) carries float error in proportion: relative beyond |1|
            scaled = float((gaps / expected.detach().float().cpu().abs().clamp(min=1.0)).max())
            gap_before = before.get(index, 0.0)
            if scaled > tolerance:
                attempt.failed[index] = (f"check: log-probs differ from the learner's by {diffs[-1]:.2e} "
                                         f"({scaled:.2e} relative) > {tolerance:g}")
            elif gap_before > noise and diffs[-1] > STALE_RATIO * gap_before:
                attempt.failed[index] = (f"check: the sync left a log-prob gap of {diffs[-1]:.2e}, "
                                         f"{diffs[-1] / gap_before:.0%} of the {gap_before:.2e} before it: the engine "
                                         "kept stale weights")
            if index in attempt.failed:
                self.engines[index].drop_channel()
        return diffs

    def _engine_gaps(self, link: EngineLink, reference: Reference, expected: torch.Tensor) -> torch.Tensor | None:
        """|engine - learner| per reference token (None: the engine is gone)."""
        import ray

        try:
            engine = ray.get(link.actor.sequence_logprobs.remote(*reference), timeout=self.options.sync_timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        return (torch.tensor(engine) - expected.detach().float().cpu()).abs()

    def close(self) -> None:
        self.pusher.close()


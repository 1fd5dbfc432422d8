"""Weight sync as a collective (#16): the learners bring every rollout engine to the current
policy version, learner rank 0 sending.

One interface, :class:`WeightSync` (``sync(version, reference)``, called by every learner at
the same points), over three transports chosen explicitly by ``--sync-transport``:

* ``gloo`` (CPU): one broadcast group per engine, learner rank 0 plus that engine's workers
  (``actors.broadcast_group``). The policy travels in dtype-grouped packed buckets
  (``core.weight_plan``), the plan (names, shapes, offsets) once per sync in the engine's
  ``sync_receive`` call, then a canary (nonce, version, bucket count, elements) that each
  engine echoes: a transfer that moved nothing cannot pass for one that worked. The groups of
  several engines send concurrently (gloo runs each group's work on its own threads), and a
  restarted engine rejoins alone, with a new group generation, without stalling the others.
* ``nccl`` (GPU): the same over vLLM's ``PyNcclCommunicator`` (refused, never a no-op, where
  NCCL cannot load).
* ``blob``: the policy as one safetensors blob through the object store to each engine's
  ``load_weights`` (the path before #16; kept as the baseline of ``bench_ppo``).

Under FSDP every learner takes part: each bucket's parameters are all-gathered just before it
is sent (``core.policy_source``), so no rank holds the whole policy. Rank 0 decides what to
push and shares its decision over the learners' own group.

The exactness check (the engine's log-probs of a reference sequence against the learner's)
runs at the first sync, every ``--sync-check-every`` versions, and for an engine that came
back from a restart, before it serves. An engine that fails the transfer or the check gets a
new group and a second push; a second failure stops the run (:class:`TransportError`). A dead
engine sits out until Ray has restarted it.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from actors.broadcast_group import Channel, GroupSpec, TransportUnavailable, listening_socket
from core.config import failing, option
from core.policy_source import PolicySource
from core.weight_plan import Bucket, Buffers, pack, plan_buckets, to_wire

TRANSPORTS = ("gloo", "nccl", "blob")
Reference = tuple[list[int], list[int]]  # (prompt ids, response ids): what the check scores


class TransportError(RuntimeError):
    """A push did not reach an engine twice (a peer gone quiet, a timeout, a failed load or check)."""


@dataclass(frozen=True)
class SyncOptions:
    """How learner rank 0 brings the rollout engines to each new policy (``cai train ppo``)."""

    sync_transport: Literal["auto", "gloo", "nccl", "blob"] = option(
        "auto", "how the policy reaches the engines: a broadcast group per engine over gloo (CPU) or NCCL (GPU), "
        "or a safetensors blob through the object store; auto: nccl with --use-gpu, else gloo. Never replaced "
        "by another when it cannot work: it fails")
    sync_bucket_mb: int = option(64, "size of the packed buckets the weights travel in (MiB; a larger tensor "
                                 "travels alone)")
    sync_load: Literal["load", "reload"] = option("load", "how an engine takes each bucket: the model's "
                                                  "load_weights, or vLLM's reload_weights over the whole policy")
    sync_timeout: float = option(120.0, "seconds a join or transfer may take before the engine counts as failed")
    sync_check_every: int = option(10, "check that an engine computes the learner's log-probs at the first sync, "
                                   "then every N versions (and always after an engine restarts)")
    sync_check_tol: float = option(0.0, "largest log-prob gap the check accepts (relative where |log-prob| > 1); "
                                   "0: 1e-4 for engines in float32, 0.5 for 16-bit engines")

    def transport(self, use_gpu: bool) -> str:
        if self.sync_transport == "auto":
            return "nccl" if use_gpu else "gloo"
        return self.sync_transport

    def tolerance(self, engine_dtype: str | None) -> float:
        if self.sync_check_tol > 0:
            return self.sync_check_tol
        return 1e-4 if engine_dtype in (None, "float32", "float64") else 0.5

    def problems(self) -> list[str]:
        return failing({"sync_bucket_mb": self.sync_bucket_mb >= 1, "sync_timeout": self.sync_timeout > 0,
                        "sync_check_every": self.sync_check_every >= 1, "sync_check_tol": self.sync_check_tol >= 0})


@dataclass(eq=False)
class EngineLink:
    """Learner rank 0's view of one rollout engine."""

    index: int
    actor: Any
    generation: str | None = None  # the group formed with it; None until (re)joined
    channel: Channel | None = None
    version: int = -1  # the last version it confirmed

    def drop_channel(self) -> None:
        channel, self.channel, self.generation = self.channel, None, None
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


class WeightSync:
    """Every learner builds one (``rank``/``world`` of the learners); rank 0 talks to the engines."""

    def __init__(self, options: SyncOptions, actors: Sequence[Any], source: PolicySource, *, rank: int, world: int,
                 use_gpu: bool, device: torch.device, learner_logprobs: Callable[[Reference], torch.Tensor],
                 engine_workers: int = 1, wait_timeout: float | None, ping_timeout: float = 2.0):
        self.options, self.source, self.rank, self.world = options, source, rank, world
        self.transport = options.transport(use_gpu)
        if self.transport not in TRANSPORTS:
            raise TransportUnavailable(f"unknown --sync-transport {self.transport!r}")
        self.engines = [EngineLink(i, actor) for i, actor in enumerate(actors)]
        self.engine_workers = engine_workers  # each engine's tensor-parallel workers: all receive
        self.device, self.learner_logprobs = device, learner_logprobs
        self.wait_timeout, self.ping_timeout = wait_timeout, ping_timeout
        self.collective = source.sharded and world > 1  # FSDP: every learner gathers each bucket
        self.send_device = device if self.transport == "nccl" else torch.device("cpu")
        self.token = f"{random.getrandbits(32):08x}"  # this learner process's groups: never an old one's
        self.joins = 0
        self.restarts = 0  # engines found back from a restart (holding an older version than they had)
        self.engine_dtype: str | None = None
        self.plan: list[Bucket] | None = None
        self.buffers: Buffers | None = None
        self.wire: list[dict] | None = None
        self.checked = False
        self.plan_join_s = 0.0

    # -- the collective entry point -------------------------------------------------------

    def sync(self, version: int, reference: Reference, *, only_if_stale: bool = False) -> dict[str, Any]:
        """Bring every live engine to ``version`` (every learner calls this at the same point).
        ``only_if_stale``: a catch-up between rollouts; the check then runs only for restarted
        engines. Returns rank 0's metrics (``{}`` on the others, and when nothing was pushed)."""
        if self.rank != 0 and not self.collective:
            return {}
        started = time.monotonic()
        decision = self._decide(version, only_if_stale) if self.rank == 0 else None
        decision = self._share(decision)
        if not decision["targets"]:
            return {}
        if self.wire is None:
            self.wire = decision["wire"]
            self.plan = _plan_of(self.wire)
            # reused between syncs on the CPU (no page faults); on a GPU per push (the caching allocator)
            self.buffers = Buffers(self.plan, self.send_device) if self.rank == 0 else None
        targets, check = decision["targets"], decision["check"]
        metrics: dict[str, Any] = {"sync_transport": self.transport, "sync_engines": len(targets),
                                   "sync_buckets": len(self.plan), "presync_logprob_diff": None,
                                   "sync_logprob_diff": None, "sync_check_s": 0.0, "sync_retries": 0}
        mark = time.monotonic()
        expected = self.learner_logprobs(reference) if check else None  # a forward on every learner under FSDP
        if check and self.rank == 0:
            metrics["presync_logprob_diff"] = self._engine_diff(self.engines[targets[0]], reference, expected)
        metrics["sync_check_s"] = time.monotonic() - mark if check else 0.0
        for attempt_no in (1, 2):
            attempt = self._push(targets, version)
            attempt.seconds["sync_join_s"] += self.plan_join_s
            self.plan_join_s = 0.0
            if self.rank == 0:
                for key, value in attempt.seconds.items():
                    metrics[key] = metrics.get(key, 0.0) + value if attempt_no > 1 else value
                metrics["sync_bytes"] = attempt.bytes
                pushed = [i for i in targets if i not in attempt.failed and i not in attempt.dead]
                if check and pushed:
                    mark = time.monotonic()
                    diffs = self._check(pushed, reference, expected, attempt)
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
        metrics["sync_joins"] = self.joins  # groups formed by this learner so far (first joins and rejoins)
        return metrics if self.rank == 0 else {}

    # -- rank 0: which engines, and whether to check -----------------------------------------

    def _decide(self, version: int, only_if_stale: bool) -> dict[str, Any]:
        states = self._ping()
        targets, restarted = [], []
        for link in self.engines:
            state = states.get(link.index)
            if state is None:
                continue  # dead or restarting: it is brought up to date once it answers
            if state["restarted"]:  # back from a crash with its starting weights
                restarted.append(link.index)
            in_group = self.transport == "blob" or (state["generation"] == link.generation is not None)
            if not in_group:
                link.drop_channel()
            if state["version"] != version or not in_group or state["restarted"]:
                targets.append(link.index)
        check = bool(targets) and (bool(restarted) or not self.checked or
                                   (not only_if_stale and version % self.options.sync_check_every == 0))
        wire = None
        if targets and self.wire is None:
            wire = self._make_plan(targets)
        return {"targets": targets, "check": check, "restarted": restarted,
                "wire": wire if wire is not None else self.wire}

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
        from workflows.runtime.rollout_client import answers

        return answers([link.actor for link in self.engines], "sync_state", ping_timeout=self.ping_timeout,
                       wait_timeout=self.wait_timeout)

    def _make_plan(self, targets: list[int]) -> list[dict]:
        """The bucket plan in the engines' dtype (asked of the first engine that joins)."""
        if self.transport != "blob":
            joined = Attempt()
            self._join(self.engines[targets[0]], joined)
            self.plan_join_s = joined.seconds["sync_join_s"]  # counted in this sync's sync_join_s
        dtype = getattr(torch, self.engine_dtype) if self.engine_dtype else None
        cap = self.options.sync_bucket_mb << 20 if self.transport != "blob" else 1 << 62
        return to_wire(plan_buckets(self.source.specs(dtype), cap))

    def _share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every learner (under FSDP; the others decide nothing)."""
        if not self.collective:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)  # among this run's own learners
        return box[0]

    # -- one push to ``targets`` (every learner under FSDP: the gathers are collectives) --------

    def _push(self, targets: list[int], version: int) -> Attempt:
        attempt = Attempt()
        links = [self.engines[i] for i in targets] if self.rank == 0 else []
        if self.transport == "blob":
            self._push_blob(links, version, attempt)
            return attempt
        import ray

        for link in links:
            if link.channel is None:
                self._join(link, attempt)
        receives = {link.index: link.actor.sync_receive.remote(link.generation, self.wire, version,
                                                              self.options.sync_load)
                    for link in links if link.index not in attempt.failed and link.index not in attempt.dead}
        in_flight: deque = deque()
        if self.send_device.type != "cpu" and self.rank == 0:
            self.buffers = Buffers(self.plan, self.send_device)
        for bucket in self.plan:
            mark = time.monotonic()
            tensors = self.source.materialize(bucket)
            attempt.seconds["sync_gather_s"] += time.monotonic() - mark
            if tensors is None or not receives:
                continue  # FSDP ranks other than 0 only take part in the gathers
            mark = time.monotonic()
            flat = pack(bucket, tensors, self.send_device, out=self.buffers.next(bucket))
            del tensors
            attempt.seconds["sync_pack_s"] += time.monotonic() - mark
            attempt.bytes += flat.numel() * flat.element_size()
            in_flight.append((flat, self._send(flat, links, receives, attempt)))
            while len(in_flight) > 1:  # one bucket on the wire while the next is gathered and packed
                self._wait(in_flight.popleft()[1], receives, attempt)
            self._notice_early_failures(receives, attempt)
        while in_flight:
            self._wait(in_flight.popleft()[1], receives, attempt)
        if not receives:
            return attempt
        total = sum(b.numel for b in self.plan)
        canary = torch.tensor([random.getrandbits(62), version, len(self.plan), total], dtype=torch.int64,
                              device=self.send_device)
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
            attempt.seconds["sync_load_s"] = max(attempt.seconds["sync_load_s"], stats["load_seconds"])
            self.engines[index].version = version
        return attempt

    def _send(self, flat: torch.Tensor, links: list[EngineLink], receives: dict, attempt: Attempt) -> list:
        works = []
        for link in links:
            if link.index in receives and link.index not in attempt.failed:
                try:
                    works.append((link, link.channel.broadcast(flat)))
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

    def _join(self, link: EngineLink, attempt: Attempt) -> None:
        """Form a new group with ``link``'s engine (rank 0 binds the port; the engine's workers
        connect): its previous group, if any, is left on both sides."""
        import ray

        mark = time.monotonic()
        link.drop_channel()
        self.joins += 1
        host = ray.util.get_node_ip_address()
        listener = listening_socket(host)
        spec = GroupSpec(self.transport, host, listener.getsockname()[1], 1 + self.engine_workers, self.options.sync_timeout,
                         f"{self.token}-{self.joins}")
        joined = link.actor.sync_join.remote(asdict(spec))
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
            link.channel, link.generation = channel, spec.generation
            self.engine_dtype = answer["dtype"]
        finally:
            listener.close()
        attempt.seconds["sync_join_s"] += time.monotonic() - mark

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
            self.engines[index].version = version
        attempt.seconds["sync_transfer_s"] += time.monotonic() - mark

    # -- the exactness check (rank 0) ------------------------------------------------------

    def _check(self, indices: list[int], reference: Reference, expected: torch.Tensor, attempt: Attempt) -> list[float]:
        """Each engine's log-probs of ``reference`` against the learner's; one over the
        tolerance counts as a failed push."""
        tolerance = self.options.tolerance(self.engine_dtype)
        diffs = []
        for index in indices:
            gaps = self._engine_gaps(self.engines[index], reference, expected)
            if gaps is None:
                attempt.dead.add(index)
                continue
            diffs.append(float(gaps.max()))
            # an unlikely token (log-prob -30) carries float error in proportion: relative beyond |1|
            scaled = float((gaps / expected.detach().float().cpu().abs().clamp(min=1.0)).max())
            if scaled > tolerance:
                attempt.failed[index] = (f"check: log-probs differ from the learner's by {diffs[-1]:.2e} "
                                         f"({scaled:.2e} relative) > {tolerance:g}")
                self.engines[index].drop_channel()
        return diffs

    def _engine_diff(self, link: EngineLink, reference: Reference, expected: torch.Tensor) -> float | None:
        gaps = self._engine_gaps(link, reference, expected)
        return None if gaps is None else float(gaps.max())

    def _engine_gaps(self, link: EngineLink, reference: Reference, expected: torch.Tensor) -> torch.Tensor | None:
        """|engine - learner| per reference token (None: the engine is gone)."""
        import ray

        try:
            engine = ray.get(link.actor.sequence_logprobs.remote(*reference), timeout=self.options.sync_timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        return (torch.tensor(engine) - expected.detach().float().cpu()).abs()

    def close(self) -> None:
        for link in self.engines:
            link.drop_channel()


def _plan_of(wire: list[dict]) -> list[Bucket]:
    from core.weight_plan import from_wire

    return from_wire(wire)


def _short(exc: Any) -> str:
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return text if len(text) < 300 else text[:300] + " ..."

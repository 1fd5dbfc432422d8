"""A PPO rollout engine: one vLLM engine whose weights follow the learners' policy.

Learners send token-id prompts and get sampled responses back; after every policy update
learner rank 0 pushes the new weights with a version number: over a broadcast group it forms
with the engine's workers (:meth:`RolloutWorker.sync_join`, ``sync_receive``: packed
buckets, gloo or NCCL), or as one safetensors blob through the object store (``load_weights``,
the ``blob`` transport). Each request carries the version the learner expects, so an engine
that was restarted after a crash (and came back with the starting weights) refuses with
:class:`StaleWeightsError` instead of silently sampling from an old policy; the learners then
bring it up to date and check it before it serves. Weights never change under a request: a
push waits until the requests in flight are answered (with ``--max-staleness`` the learners
only push between batches anyway), and every answer names the version that sampled it.

Plain class: ``ray.remote(...)(RolloutWorker)`` where the actor is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, replace

from actors.engine import EngineOptions, VLLMEngineHost
from core.sampling import SamplingConfig

WEIGHT_SYNC_EXTENSION = "actors.vllm_weight_sync.WeightSyncExtension"


class StaleWeightsError(RuntimeError):
    """The engine holds another policy version than the request expects."""


@dataclass(frozen=True)
class Rollout:
    """One sampled response. ``token_ids`` end with EOS when ``finish_reason == "stop"``;
    ``logprobs`` are the engine's log-probs of those tokens at the sampling temperature (the
    behaviour policy), which the learner's own must reproduce."""

    token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[float, ...] = ()
    version: int = 0  # the policy version that sampled it (the behaviour policy)


class RolloutWorker:
    def __init__(self, options: EngineOptions):
        import ray

        self.host = VLLMEngineHost(replace(options, worker_extension_cls=WEIGHT_SYNC_EXTENSION,
                                           logprobs_mode="processed_logprobs"))
        self.version = 0  # 0 = the weights the engine started with
        self.generation: str | None = None  # the learner's broadcast group this engine is in
        # back from a crash (Ray restarted the actor): until the learners have pushed and checked
        # the current weights, it says so (the learners count it and check it before it serves)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.node = ray.get_runtime_context().get_node_id()  # the learner's neighbours share memory with it
        self.requests = 0  # generate calls in flight: a weight push waits until none is
        self.idle = asyncio.Condition()
        self.loading = False  # new weights are going in: requests are refused until they serve

    def info(self) -> dict:
        return {**self.host.info(), "version": self.version}

    def weights_version(self) -> int:
        return self.version

    async def load_weights(self, blob: bytes, version: int) -> dict:
        """Replace the policy weights (a ``safetensors.torch.save`` blob) and drop cached
        prefixes computed with the old ones."""
        started = time.monotonic()
        async with self.weights_change():
            await self.host.engine.collective_rpc("cai_load_weights", args=(blob,))
            await self.host.engine.reset_prefix_cache()
            self.version = version
        return {"version": version, "seconds": time.monotonic() - started}

    def sync_state(self) -> dict:
        """The weights version this engine serves, the broadcast group it is in (None after a
        restart: the learner then forms a new one with it) and its Ray node."""
        return {"version": self.version, "generation": self.generation, "restarted": self.restarted,
                "node": self.node}

    async def sync_join(self, spec: dict, shared: dict | None = None) -> dict:
        """Join the learner's broadcast group (``actors.broadcast_group.GroupSpec`` as a dict),
        reading the buckets from its shared region when given one (``actors.shared_region``)."""
        (joined, *_) = await self.host.engine.collective_rpc("cai_join", args=(spec, shared))
        self.generation = spec["generation"]
        return joined

    async def sync_receive(self, generation: str, wire_plan: list[dict], version: int, mode: str = "load") -> dict:
        """Receive and load the policy the learner broadcasts next (call this before it
        sends), then serve it as ``version``."""
        async with self.weights_change():
            try:
                (stats, *_) = await self.host.engine.collective_rpc("cai_receive",
                                                                     args=(generation, wire_plan, mode))
            except BaseException:
                self.generation = None  # the engine left the group: the learner forms a new one
                raise
            await self.host.engine.reset_prefix_cache()
            self.version = version
        return {**stats, "version": version}

    def settled(self) -> None:
        """The learners checked this engine after its restart: it counts as restarted no more."""
        self.restarted = False

    async def generate(
        self, prompts: list[list[int]], *, version: int, sampling: SamplingConfig, seeds: list[int] | None = None,
        crash: bool = False,
    ) -> list[Rollout]:
        """One sampled response per prompt (token ids), all submitted at once; with ``seeds``,
        each from its own seeded random stream. ``crash`` is the fault drill
        (``--kill-engine-at-step``): the process exits once it has taken the request, before any
        answer, so the engine dies under a request in flight (Ray restarts it)."""
        if version != self.version or self.loading:
            raise StaleWeightsError(f"engine holds policy version {self.version}"
                                    f"{' and is loading another' if self.loading else ''}, the request expects "
                                    f"{version}")
        self.requests += 1
        if crash:
            os._exit(1)
        try:
            completions = await asyncio.gather(*(
                self.host.complete(ids, sampling, logprobs=0, seed=None if seeds is None else seed)
                for ids, seed in zip(prompts, seeds or [None] * len(prompts))
            ))
        finally:
            async with self.idle:
                self.requests -= 1
                self.idle.notify_all()
        return [Rollout(c.token_ids, c.finish_reason, c.token_logprobs, version) for (c,) in completions]

    @contextlib.asynccontextmanager
    async def weights_change(self):
        """Around a weight load: waits until no generate call is in flight, and refuses new
        ones until the new weights serve. The weights never change under a request."""
        async with self.idle:
            await self.idle.wait_for(lambda: self.requests == 0)
            self.loading = True
        try:
            yield
        finally:
            self.loading = False

    async def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's log-prob of each response token after the prompt: compared with the
        learner's own to check that a weight sync was exact."""
        scores = await self.host.prompt_logprobs([*prompt_ids, *response_ids])
        return [float(s) for s in scores[len(prompt_ids):]]

    def shutdown(self) -> None:
        """Stop the engine before the actor is killed (workflows/runtime/engine_stop.py)."""
        self.host.shutdown()

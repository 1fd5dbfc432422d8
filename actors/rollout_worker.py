"""A PPO rollout engine: one vLLM engine whose weights follow the learners' policy.

Learners send token-id prompts and get sampled responses back; after every policy update
they push the new weights (a safetensors blob, in memory) with a version number. Each
request carries the version the learner expects, so an engine that was restarted after a
crash (and came back with the starting weights) refuses with :class:`StaleWeightsError`
instead of silently sampling from an old policy; the learner then pushes the weights again.

Plain class: ``ray.remote(...)(RolloutWorker)`` where the actor is created.
"""

from __future__ import annotations

import asyncio
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


class RolloutWorker:
    def __init__(self, options: EngineOptions):
        self.host = VLLMEngineHost(replace(options, worker_extension_cls=WEIGHT_SYNC_EXTENSION,
                                           logprobs_mode="processed_logprobs"))
        self.version = 0  # 0 = the weights the engine started with

    def info(self) -> dict:
        return {**self.host.info(), "version": self.version}

    def weights_version(self) -> int:
        return self.version

    async def load_weights(self, blob: bytes, version: int) -> dict:
        """Replace the policy weights (a ``safetensors.torch.save`` blob) and drop cached
        prefixes computed with the old ones."""
        started = time.monotonic()
        await self.host.engine.collective_rpc("cai_load_weights", args=(blob,))
        await self.host.engine.reset_prefix_cache()
        self.version = version
        return {"version": version, "seconds": time.monotonic() - started}

    async def sync_join(self, host: str, port: int, world_size: int, rank: int, timeout_s: float) -> int:
        """Join the learner's broadcast group (#16, work in progress)."""
        await self.host.engine.collective_rpc("cai_join", args=(host, port, world_size, rank, timeout_s))
        return rank

    async def sync_receive(self, wire_plan: list[dict], version: int, mode: str = "load") -> dict:
        """Receive the policy the learner broadcasts (call before it sends), then serve it."""
        (stats,) = await self.host.engine.collective_rpc("cai_receive", args=(wire_plan, mode))
        await self.host.engine.reset_prefix_cache()
        self.version = version
        return {**stats, "version": version}

    async def generate(
        self, prompts: list[list[int]], *, version: int, sampling: SamplingConfig, seeds: list[int] | None = None,
    ) -> list[Rollout]:
        """One sampled response per prompt (token ids), all submitted at once; with ``seeds``,
        each from its own seeded random stream."""
        if version != self.version:
            raise StaleWeightsError(f"engine holds policy version {self.version}, the request expects {version}")
        completions = await asyncio.gather(*(
            self.host.complete(ids, sampling, logprobs=0, seed=None if seeds is None else seed)
            for ids, seed in zip(prompts, seeds or [None] * len(prompts))
        ))
        return [Rollout(c.token_ids, c.finish_reason, c.token_logprobs) for (c,) in completions]

    async def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's log-prob of each response token after the prompt: compared with the
        learner's own to check that a weight sync was exact."""
        scores = await self.host.prompt_logprobs([*prompt_ids, *response_ids])
        return [float(s) for s in scores[len(prompt_ids):]]

    def shutdown(self) -> None:
        self.host.shutdown()

"""The SL-CAI generation worker: one vLLM engine, many critique/revision chains at once.

A plain class, made a Ray actor where the pool creates it. ``run_shard`` starts every
row's chain concurrently on the async engine, so the engine's batch refills as soon as any
conversation finishes a step. A row that fails (too long for the context, an empty answer,
a generation error) becomes a reject with a reason; a dead engine fails the whole shard,
and the process exits so the pool replaces the actor.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from actors.critique_chain import ChainError, Reply, critique_revision_chain, few_shot_prefix
from actors.engine import EngineOptions, PromptTooLongError, VLLMEngineHost
from actors.metrics import StageMetrics
from constitutions.loader import parse_constitution
from constitutions.sampling import sample_critique_ids


@dataclass(frozen=True)
class ChainSettings:
    revisions: int
    max_new_tokens: int
    temperature: float
    top_p: float
    few_shot: int
    seed: int
    ignore_eos: bool = False
    repetition_penalty: float = 1.0


OCCUPANCY_SAMPLE_SECONDS = 0.05


class GenerationWorker:
    def __init__(
        self,
        engine: EngineOptions,
        constitution: dict[str, Any],
        settings: ChainSettings,
        *,
        run_name: str = "",
        model_name: str = "",
    ):
        self.settings = settings
        self.constitution = parse_constitution(constitution, source="<run constitution>")
        self.prefix = few_shot_prefix(self.constitution, settings.few_shot)
        self.model_name = model_name or engine.model
        self.metrics = StageMetrics("generate", run_name)
        self.host = VLLMEngineHost(engine)
        self._occupancy = [0, 0]  # sum of sampled running requests, number of samples
        self._sampler: asyncio.Task | None = None

    async def _sample_occupancy(self) -> None:
        """Sample the engine's request count for the whole life of the actor, idle gaps
        included: the mean shows how full the batch is kept (the figure that matters on GPUs,
        where decode is memory-bound and a fuller batch is faster)."""
        while True:
            self._occupancy[0] += self.host.running_requests()
            self._occupancy[1] += 1
            await asyncio.sleep(OCCUPANCY_SAMPLE_SECONDS)

    def _take_occupancy(self) -> tuple[int, int]:
        taken = tuple(self._occupancy)
        self._occupancy = [0, 0]
        return taken

    def ready(self) -> dict[str, Any]:
        return self.host.info()

    async def _complete(self, messages: list[dict[str, str]], max_new_tokens: int) -> Reply:
        (completion,) = await self.host.complete(
            messages,
            max_new_tokens=max_new_tokens,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            ignore_eos=self.settings.ignore_eos,
            repetition_penalty=self.settings.repetition_penalty,
        )
        self.metrics.tokens(len(completion.token_ids))
        return Reply(completion.text, completion.prompt_tokens, len(completion.token_ids))

    async def _row(self, row: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        settings = self.settings
        principle_ids = sample_critique_ids(self.constitution, settings.revisions, seed=settings.seed, key=row["id"])
        prompt = [dict(m) for m in row["messages"]]
        try:
            chain = await critique_revision_chain(
                prompt, principle_ids, self.constitution, self._complete,
                max_new_tokens=settings.max_new_tokens, prefix=self.prefix,
            )
        except (PromptTooLongError, ChainError) as exc:
            return None, _reject(row, str(exc))
        except Exception as exc:  # noqa: BLE001 - one row's failure must not sink the shard
            if _engine_dead(exc):
                raise
            return None, _reject(row, f"generation error: {type(exc).__name__}: {exc}")
        self.metrics.prompt_done()
        final = {"role": "assistant", "content": chain.final_response}
        return {
            "index": row["index"],
            "id": row["id"],
            "prompt": prompt,
            "initial_response": chain.initial_response,
            "revisions": chain.revisions,
            "final_response": chain.final_response,
            # TRL's formats: `messages` (SFT), `prompt`+`completion` (SFT, loss on the answer
            # only), `prompt`+`chosen`+`rejected` (DPO and reward models).
            "messages": [*prompt, final],
            "completion": [final],
            "chosen": [final],
            "rejected": [{"role": "assistant", "content": chain.initial_response}],
            "principle_ids": principle_ids,
            "model": self.model_name,
            "constitution_sha256": self.constitution.sha256,
            "seed": settings.seed,
            "prompt_tokens": chain.prompt_tokens,
            "generated_tokens": chain.generated_tokens,
            "error": "; ".join(chain.notes) or None,
        }, None

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Run every row's chain; return output rows (input order), rejects and counters."""
        started, started_at = time.monotonic(), time.time()
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_occupancy())
        try:
            results = await asyncio.gather(*(self._row(row) for row in rows))
        except Exception as exc:
            if _engine_dead(exc):
                # The engine cannot recover in this process: exit so Ray reports the actor
                # dead and the pool reruns this shard on a fresh one.
                os._exit(1)
            raise
        out = [r for r, _ in results if r is not None]
        rejects = [j for _, j in results if j is not None]
        seconds = time.monotonic() - started
        self.metrics.shard_seconds(seconds)
        occupancy_sum, occupancy_samples = self._take_occupancy()
        return {
            "occupancy_sum": occupancy_sum,
            "occupancy_samples": occupancy_samples,
            "shard": shard_index,
            "rows": out,
            "rejects": rejects,
            "tokens": sum(r["generated_tokens"] for r in out),
            "seconds": seconds,
            "started_at": started_at,
            "finished_at": time.time(),
            "worker": f"{os.uname().nodename}:{os.getpid()}",
        }


def _reject(row: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"index": row["index"], "id": row["id"], "reason": reason, "stage": "generate"}


def _engine_dead(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)

"""The SL-CAI generation worker: one vLLM engine, many critique/revision chains at once.

A plain class, made a Ray actor where the pool creates it. ``run_shard`` starts every
row's chain concurrently on the async engine, so the engine's batch refills as soon as any
conversation finishes a step. A row that fails (too long for the context, an empty answer,
a generation error) becomes a reject with a reason; a dead engine fails the whole shard,
and the process exits so the pool replaces the actor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from actors.engine import EngineOptions, PromptTooLongError, VLLMEngineHost
from actors.metrics import StageMetrics
from actors.shard_work import OccupancySampler, ShardResult, run_rows
from constitutions.loader import parse_constitution
from constitutions.sampling import PrincipleDraw, sample_critique_ids
from core.config import Problem, at_least, failing, option
from core.critique_chain import ChainError, Reply, critique_revision_chain, few_shot_prefix
from core.sampling import SamplingConfig


@dataclass(frozen=True)
class ChainSettings:
    """How each row's critique/revision chain runs; `cai generate` nests it and the workers get it."""

    revisions: int = option(1, "critique/revision rounds per prompt", identity=True)
    few_shot: int = option(0, "few-shot examples from the constitution before each critique and revision (a shared "
                           "prefix)", identity=True)
    few_shot_initial: bool = option(False, "show the few-shot examples when sampling the initial answer too (off: "
                                    "§3.1 samples it from the prompt alone, so the examples' harmless revisions "
                                    "do not leak into the initial answer and the 'rejected' column)", identity=True)
    principle_draw: PrincipleDraw = option("independent", "each round's critique principle: drawn independently "
                                           "from all (§3.1), or without repeats while they last", identity=True)
    ignore_eos: bool = option(False, "always generate --max-new-tokens tokens per step (equal work, for benchmarks)",
                              identity=True)
    seed: int = option(0, "seed for principle sampling (per row id) and the engines", identity=True)
    sampling: SamplingConfig = option(SamplingConfig(), "how answers, critiques and revisions are sampled "
                                      "(temperature 1, as the paper samples SL-CAI data)")

    def problems(self) -> list[Problem]:
        return failing({"revisions": at_least(0)(self.revisions), "few_shot": at_least(0)(self.few_shot)}) + \
            self.sampling.problems()


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
        self.sampler = OccupancySampler(self.host.running_requests)

    def ready(self) -> dict[str, Any]:
        return self.host.info()

    def shutdown(self) -> None:
        """Stop the engine before the actor is killed (workflows/runtime/engine_stop.py)."""
        self.host.shutdown()

    async def _complete(self, messages: list[dict[str, str]], max_new_tokens: int) -> Reply:
        sampling = replace(self.settings.sampling, max_new_tokens=max_new_tokens)
        (completion,) = await self.host.complete(messages, sampling, ignore_eos=self.settings.ignore_eos)
        self.metrics.tokens(len(completion.token_ids))
        return Reply(completion.text, completion.prompt_tokens, len(completion.token_ids))

    async def _row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        settings = self.settings
        principle_ids = sample_critique_ids(self.constitution, settings.revisions, seed=settings.seed, key=row["id"],
                                            draw=settings.principle_draw)
        prompt = [dict(m) for m in row["messages"]]
        chain = await critique_revision_chain(
            prompt, principle_ids, self.constitution, self._complete,
            max_new_tokens=settings.sampling.max_new_tokens, prefix=self.prefix, prefix_initial=settings.few_shot_initial,
        )
        self.metrics.prompt_done()
        final = {"role": "assistant", "content": chain.final_response}
        return [{
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
        }]

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> ShardResult:
        """Run every row's chain; return output rows (input order), rejects and counters."""
        return await run_rows(shard_index, rows, self._row, self.sampler, self.metrics, stage="generate",
                              expected=(PromptTooLongError, ChainError))

"""The two workers of `cai eval compare`: answer prompts with one model, judge answer pairs.

:class:`AnswerWorker` hosts one model's engine and samples S answers per prompt.
:class:`JudgeWorker` hosts the judge (feedback) model. For each prompt it compares the
baseline's answer with each challenger's (answer i with answer i) under K feedback
principles drawn from the constitution of the prompt's category (seeded by the prompt id,
so every challenger and sample on a prompt is judged under the same principles), each in
both option orders, with the multiple-choice soft-label machinery of `cai label`
(:mod:`core.preference`, :class:`actors.feedback_scorer.FeedbackScorer`).
Both are plain classes, made Ray actors by the shared stage runner.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from actors.engine import EngineOptions, PromptTooLongError, VLLMEngineHost
from actors.feedback_scorer import FeedbackScorer
from actors.metrics import StageMetrics
from actors.shard_work import OccupancySampler, RowRejected, ShardResult, run_rows
from constitutions.loader import parse_constitution
from constitutions.sampling import sample_feedback_ids
from core.config import Problem, at_least, failing, option
from core.eval_stats import challenger_win_prob
from core.preference import comparison_messages
from core.sampling import SamplingConfig

BOTH_ORDERS = ((0, 1), (1, 0))  # display slot j shows (baseline, challenger)[order[j]]


@dataclass(frozen=True)
class AnswerSettings:
    """How every model answers; `cai eval compare` nests it and the answer workers get it."""

    samples_per_prompt: int = option(
        1, "answers per model and prompt; answer i of A is compared with answer i of each challenger", identity=True)
    seed: int = option(0, "seed for principle sampling (per prompt id) and the engines", identity=True)
    sampling: SamplingConfig = option(SamplingConfig(temperature=0.0), "how the answers are sampled (greedy by "
                                      "default, usual for evaluation)")

    def problems(self) -> list[Problem]:
        return failing({"samples_per_prompt": at_least(1)(self.samples_per_prompt)}) + self.sampling.problems()


class AnswerWorker:
    """Samples ``samples`` answers per prompt from one model."""

    def __init__(self, engine: EngineOptions, settings: AnswerSettings, *, run_name: str = "", model_name: str = ""):
        self.settings = settings
        self.model_name = model_name or engine.model
        self.metrics = StageMetrics("compare-answers", run_name)
        self.host = VLLMEngineHost(engine)
        self.sampler = OccupancySampler(self.host.running_requests)

    def ready(self) -> dict[str, Any]:
        return self.host.info()

    def shutdown(self) -> None:
        """Stop the engine before the actor is killed (workflows/runtime/engine_stop.py)."""
        self.host.shutdown()

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> ShardResult:
        return await run_rows(shard_index, rows, self._row, self.sampler, self.metrics, stage="answer",
                              expected=(PromptTooLongError,))

    async def _row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        settings = self.settings
        prompt = [dict(m) for m in row["messages"]]
        completions = await self.host.complete(prompt, settings.sampling, n=settings.samples_per_prompt)
        tokens = sum(len(c.token_ids) for c in completions)
        self.metrics.tokens(tokens)
        self.metrics.prompt_done()
        return [{
            "index": row["index"],
            "id": row["id"],
            "prompt": prompt,
            "answers": [c.text.strip() for c in completions],
            "finish_reasons": [c.finish_reason or "" for c in completions],
            "model": self.model_name,
            "seed": settings.seed,
            "generated_tokens": tokens,
        }]


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge compares answers; `cai eval compare` nests it and the judge workers get it."""

    principles: int = option(2, "feedback principles per comparison, sampled per prompt id (recorded), averaged",
                             identity=True)
    feedback_few_shot: bool = option(True, "show the constitution's worked comparisons before each question",
                                     identity=True)

    def problems(self) -> list[Problem]:
        return failing({"principles": at_least(1)(self.principles)})


@dataclass(frozen=True, kw_only=True)
class Contest:
    """Who is compared: display names, resolved when the run starts, and the seed of the principle draw."""

    baseline: str
    challengers: tuple[str, ...]
    seed: int


class JudgeWorker:
    """Judges every (baseline, challenger) answer pair of a prompt.

    ``items[prompt_id] = {"category": ..., "answers": {name: [answer per sample]}}`` for
    prompts every model answered, else ``{"missing": reason}``; ``constitutions`` maps each
    category to a constitution (as plain data).
    """

    def __init__(
        self,
        judge: EngineOptions,
        constitutions: dict[str, dict[str, Any]],
        items: dict[str, dict[str, Any]],
        settings: JudgeSettings,
        contest: Contest,
        *,
        run_name: str = "",
        judge_name: str = "",
    ):
        self.settings, self.contest = settings, contest
        self.items = items
        self.constitutions = {cat: parse_constitution(c, source=f"<{cat} constitution>")
                              for cat, c in constitutions.items()}
        self.judge_name = judge_name or judge.model
        self.metrics = StageMetrics("compare-judge", run_name)
        self.scorer = FeedbackScorer(VLLMEngineHost(judge))
        self.sampler = OccupancySampler(self.scorer.host.running_requests)

    def ready(self) -> dict[str, Any]:
        return self.scorer.host.info()

    def shutdown(self) -> None:
        """Stop the judge's engine before the actor is killed (workflows/runtime/engine_stop.py)."""
        self.scorer.host.shutdown()

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> ShardResult:
        return await run_rows(shard_index, rows, self._judge_row, self.sampler, self.metrics, stage="judge",
                              expected=(PromptTooLongError, ValueError))

    async def _judge_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        item = self.items.get(row["id"])
        if item is None or "missing" in item:
            raise RowRejected(item["missing"] if item else "no answers for this prompt id")
        settings, contest = self.settings, self.contest
        constitution = self.constitutions[item["category"]]
        ids = sample_feedback_ids(constitution, settings.principles, seed=contest.seed, key=row["id"])
        principles = [constitution.feedback_principle(pid) for pid in ids]
        few_shot = constitution.feedback_few_shot if settings.feedback_few_shot else ()
        prompt = [dict(m) for m in row["messages"]]
        baseline_answers = item["answers"][contest.baseline]
        pairs = [(c, i) for c in contest.challengers for i in range(len(baseline_answers))]
        judged = await asyncio.gather(*(
            self._judge_pair(prompt, (baseline_answers[i], item["answers"][c][i]), principles, few_shot)
            for c, i in pairs
        ))
        self.metrics.prompt_done()
        return [
            {
                "index": row["index"],
                "id": f"{row['id']}/{challenger}/{sample}",
                "prompt_id": row["id"],
                "category": item["category"],
                "prompt": prompt,
                "baseline": contest.baseline,
                "challenger": challenger,
                "sample": sample,
                "answer_a": baseline_answers[sample],
                "answer_b": item["answers"][challenger][sample],
                "identical": baseline_answers[sample] == item["answers"][challenger][sample],
                "principle_ids": ids,
                **scores,
                "judge_model": self.judge_name,
                "constitution_sha256": constitution.sha256,
                "seed": contest.seed,
            }
            for (challenger, sample), scores in zip(pairs, judged)
        ]

    async def _judge_pair(self, prompt, answers: tuple[str, str], principles, few_shot) -> dict[str, Any]:
        """P(option A) under each principle in both orders; the challenger's win probability."""
        questions = [
            comparison_messages(prompt, [answers[i] for i in order], p.text, few_shot=few_shot)
            for p in principles for order in BOTH_ORDERS
        ]
        results = await asyncio.gather(*(self.scorer.score(q, 2, False) for q in questions))
        first = [probs[0] for probs, _, _ in results]
        per_principle = list(zip(first[0::2], first[1::2]))  # (baseline shown first, challenger shown first)
        return {
            "challenger_prob": challenger_win_prob(per_principle),
            "principle_probs": [challenger_win_prob([p]) for p in per_principle],
            "prob_a_baseline_first": first[0::2],
            "prob_a_challenger_first": first[1::2],
            "scoring_fallbacks": sum(1 for _, _, fallback in results if fallback),
        }

"""The RL-CAI labelling worker: sample K answers per prompt, label pairs with AI feedback.

One actor hosts the policy engine and, when ``--feedback-model`` differs, the feedback
engine too. For each prompt the policy samples K answers in one request (``n=K``); every
pair is compared under M sampled feedback principles, each with its own random option
order, and the soft labels are averaged (Bai et al. 2022, section 4.1). Output rows, one
per pair, are in TRL's explicit-prompt preference format plus the label's provenance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from actors.engine import EngineOptions, PromptTooLongError, VLLMEngineHost
from actors.feedback_scorer import FeedbackScorer
from actors.metrics import StageMetrics
from actors.shard_work import OccupancySampler, ShardResult, run_rows
from constitutions.loader import parse_constitution
from constitutions.sampling import sample_feedback_ids
from core.config import Problem, Rule, at_least, failing, option
from core.preference import label_pair, pair_indices
from core.sampling import SamplingConfig


@dataclass(frozen=True)
class LabelSettings:
    """How each prompt's answers are sampled and compared; `cai label` nests it and the workers get it."""

    samples: int = option(2, "answers sampled per prompt (K >= 2)", identity=True)
    pairs: Literal["all", "adjacent", "random"] = option("all", "which pairs of the K answers to compare",
                                                         identity=True)
    max_pairs: int = option(0, "with --pairs random: pairs per prompt", identity=True)
    principles: int = option(1, "feedback principles sampled per pair and averaged (M)", identity=True)
    both_orders: bool = option(True, "score each principle with the answers in both orders and average, which "
                               "cancels the feedback model's position bias (RLAIF, Lee et al. 2023 §2.1.1); "
                               "off: one random order per principle, half the scoring", identity=True)
    cot: bool = option(False, "chain-of-thought: reason first, then choose; labels clamped to [0.4, 0.6]",
                       identity=True)
    cot_max_new_tokens: int = option(256, "token limit for the chain-of-thought reasoning", identity=True)
    feedback_few_shot: bool = option(True, "show the constitution's worked comparisons before each question",
                                     identity=True)
    seed: int = option(0, "seed for principle sampling and option orders (per row id) and the engines", identity=True)
    sampling: SamplingConfig = option(SamplingConfig(), "how the K answers are sampled (temperature 1: "
                                      "diversity matters here)")

    def problems(self) -> list[Problem]:
        random_pairs = self.pairs == "random"
        checks = {
            "samples": at_least(2).because("a pair needs two answers")(self.samples),
            "max_pairs": Rule("above 0 with --pairs random, and 0 with any other --pairs",
                              lambda n: n > 0 if random_pairs else n == 0)(self.max_pairs),
            "principles": at_least(1)(self.principles),
            "cot_max_new_tokens": at_least(1)(self.cot_max_new_tokens),
        }
        return failing(checks) + self.sampling.problems()


class LabelWorker:
    def __init__(
        self,
        policy: EngineOptions,
        feedback: EngineOptions | None,
        constitution: dict[str, Any],
        settings: LabelSettings,
        *,
        run_name: str = "",
        policy_name: str = "",
        feedback_name: str = "",
    ):
        self.settings = settings
        self.constitution = parse_constitution(constitution, source="<run constitution>")
        self.policy_name = policy_name or policy.model
        self.feedback_name = feedback_name or (feedback or policy).model
        self.metrics = StageMetrics("label", run_name)
        self.policy = VLLMEngineHost(policy)
        # No feedback options: the policy's engine labels too. Otherwise a second engine on the
        # same GPUs, its options and the policy's each carrying part of the GPU share
        # (workflows.label.worker_engines), so that vLLM finds the memory free for both.
        feedback_host = VLLMEngineHost(feedback) if feedback else self.policy
        self.scorer = FeedbackScorer(feedback_host, cot_max_new_tokens=settings.cot_max_new_tokens)
        self.hosts = tuple({id(self.policy): self.policy, id(feedback_host): feedback_host}.values())  # one or two
        self.sampler = OccupancySampler(lambda: sum(h.running_requests() for h in self.hosts))
        self.few_shot = self.constitution.feedback_few_shot if settings.feedback_few_shot else ()

    def ready(self) -> dict[str, Any]:
        return {"policy": self.policy.info(), "feedback": self.scorer.host.info()}

    def shutdown(self) -> None:
        """Stop both engines (one, when the policy labels too) before the actor is killed
        (workflows/runtime/engine_stop.py)."""
        for host in self.hosts:
            host.shutdown()

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> ShardResult:
        return await run_rows(shard_index, rows, self._label_row, self.sampler, self.metrics, stage="label",
                              expected=(PromptTooLongError, ValueError))

    async def _label_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        import asyncio

        settings = self.settings
        prompt = [dict(m) for m in row["messages"]]
        completions = await self.policy.complete(prompt, settings.sampling, n=settings.samples)
        samples = [c.text.strip() for c in completions]
        sample_tokens = sum(len(c.token_ids) for c in completions)
        self.metrics.tokens(sample_tokens)
        if sum(1 for s in samples if s) < 2:
            raise ValueError(f"fewer than 2 non-empty samples out of {len(samples)}")
        pair_rng = random.Random(f"{settings.seed}:pairs:{row['id']}")
        pairs = pair_indices(len(samples), settings.pairs, pair_rng, settings.max_pairs or None)
        labels = await asyncio.gather(*(self._label(row, prompt, samples, i, j) for i, j in pairs))
        self.metrics.prompt_done()
        return [
            self._output(row, prompt, samples, pair, label, sample_tokens if n == 0 else 0)
            for n, (pair, label) in enumerate(zip(pairs, labels))
        ]

    async def _label(self, row, prompt, samples, i: int, j: int):
        key = f"{row['id']}:{i}-{j}"
        ids = sample_feedback_ids(self.constitution, self.settings.principles, seed=self.settings.seed, key=key)
        principles = [self.constitution.feedback_principle(pid) for pid in ids]
        return await label_pair(
            prompt, (samples[i], samples[j]), principles, self.scorer.score,
            rng=random.Random(f"{self.settings.seed}:order:{key}"), cot=self.settings.cot, few_shot=self.few_shot,
            both_orders=self.settings.both_orders,
        )

    def _output(self, row, prompt, samples, pair, label, generated_tokens: int) -> dict[str, Any]:
        i, j = pair
        texts = (samples[i], samples[j])
        chosen, rejected = texts[label.chosen], texts[1 - label.chosen]
        return {
            "index": row["index"],
            "id": f"{row['id']}/{i}-{j}",
            "prompt_id": row["id"],
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "chosen_prob": label.chosen_prob,
            "response_a": texts[0],
            "response_b": texts[1],
            "sample_indices": [i, j],
            "prob_a": label.probs[0],
            "principle_ids": list(label.principle_ids),
            "principle_probs": [p[0] for p in label.per_principle],
            "option_orders": [list(o) for o in label.orders],
            "order_prob_a": list(label.display_probs_a),
            "order_fallbacks": list(label.fallback_flags),
            "reasoning": list(label.reasonings),
            "identical": texts[0] == texts[1],
            "cot": self.settings.cot,
            "scoring_fallbacks": label.fallbacks,
            "policy_model": self.policy_name,
            "feedback_model": self.feedback_name,
            "constitution_sha256": self.constitution.sha256,
            "seed": self.settings.seed,
            "generated_tokens": generated_tokens,
        }

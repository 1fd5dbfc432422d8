"""Multiple-choice scoring on a vLLM engine: the engine side of RL-CAI soft labels and of
`cai eval feedback`.

The feedback model's assistant turn is opened with "The answer is: (" (or, with
chain-of-thought, with its own reasoning and then "Therefore, the answer is: ("), and the
next token's top-k log-probs are read, summing each letter's token variants ("A", " A",
"(A", ...). A letter none of whose variants made the top-k is scored exactly instead: the
log-probs of all its variant tokens (found once in the vocabulary) as the next token, summed
the same way. Each such fallback is counted; nothing ever defaults to 0.5.

`cai eval feedback` scores free-form option strings (HHH-eval layout, " (A)" ... " (D)")
with :meth:`FeedbackScorer.score_choices`, by one of two methods:

* ``exact``: each option's summed token log-probs after the prompt, from vLLM prompt
  log-probs: one request per option, each re-running the whole prompt (a prompt log-prob
  request bypasses the prefix cache) with a log-softmax over the vocabulary at every position.
* ``fast``: when the options' tokens are a shared lead, one distinct token each, and a shared
  tail (" (" + "A" + ")"), ONE request reads the distinct token's top-k log-probs after the
  prompt and the shared lead, with the same exact fallback as above for an option token
  outside the top-k. Then, with the prompt now in the prefix cache, one short request per
  option and tail token scores the tail (``logprob_token_ids``): only the tokens after the
  last full cached block are computed. The options' probabilities are the exact method's,
  from one prefill instead of one per option. The shared lead's log-prob is left out of
  ``logprobs`` (it is the same for every option, so it cancels in the normalization).
  Items whose options differ in more than one token use ``exact``.

The exact method cannot keep the prefix cache on vLLM 0.32's CPU build: a request with
``prompt_logprobs`` sets ``skip_reading_prefix_cache`` (cached positions would get no
log-probs), and ``prompt_logprob_token_ids``/``prompt_logprob_start``, which would score only
the option's rows, are implemented only in the new GPU model runner (``vllm/v1/worker/gpu/``),
not in the model runner the CPU build uses.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Literal

from actors.engine import EngineOptions, PromptTooLongError, VLLMEngineHost
from actors.metrics import StageMetrics
from actors.shard_work import OccupancySampler, ShardResult, run_rows
from core.config import Problem, at_least, failing, option
from core.preference import (
    ANSWER_PREFIX,
    COT_ANSWER,
    COT_PREFIX,
    OPTION_LETTERS,
    letter_variants,
    logsumexp,
    normalize,
    option_logprobs,
)
from core.sampling import greedy

TOP_K = 20
ScoringMethod = Literal["fast", "exact"]


@dataclass(frozen=True)
class ScoringSettings:
    """How `cai eval feedback` scores each item; the command nests it and its workers get it."""

    scoring: ScoringMethod = option(
        "fast", "fast: options differing in one token (\" (A)\" vs \" (B)\") from one prefill of the prompt (a top-k "
        "request, then short cached ones for the closing \")\"); exact: one full prompt log-prob request per option. "
        "Both give the same probabilities", identity=True)
    chat: bool = option(True, "wrap the prompt in the model's chat template (off: score raw text, as for base models)",
                        identity=True)
    cot: bool = option(False, "chain-of-thought: the model reasons step by step before the options are scored",
                       identity=True)
    cot_max_new_tokens: int = option(256, "token limit for the chain-of-thought reasoning", identity=True)
    seed: int = option(0, "engine seed", identity=True)

    def problems(self) -> list[Problem]:
        return failing({"cot_max_new_tokens": at_least(1)(self.cot_max_new_tokens)})


def single_token_split(options: list[list[int]]) -> tuple[list[int], list[int], list[int]] | None:
    """``(shared lead, distinct token per option, shared tail)`` when every option is the same
    leading tokens, one token of its own and the same trailing tokens; else None (options that
    differ in more than one token, or two options with the same token there)."""
    if len(options) < 2 or len({len(o) for o in options}) != 1:
        return None
    differing = [i for i in range(len(options[0])) if len({o[i] for o in options}) > 1]
    if len(differing) != 1:
        return None
    (position,) = differing
    distinct = [o[position] for o in options]
    if len(set(distinct)) != len(distinct):
        return None
    return options[0][:position], distinct, options[0][position + 1:]


class FeedbackScorer:
    """Scores multiple-choice questions with one engine host (composed, not inherited)."""

    def __init__(self, host: VLLMEngineHost, *, cot_max_new_tokens: int = 256, top_k: int = TOP_K):
        self.host = host
        self.cot_max_new_tokens = cot_max_new_tokens
        self.top_k = top_k
        self._variants: dict[str, list[int]] | None = None  # per letter, its token ids (read once)

    def variants(self, letter: str) -> list[int]:
        if self._variants is None:
            self._variants = letter_variants(self.host.vocabulary_texts(), len(OPTION_LETTERS))
        return self._variants[letter]

    async def reason(self, messages: list[dict[str, str]]) -> str:
        """The model's step-by-step reasoning, generated greedily after COT_PREFIX."""
        prompt = self.host.render([*messages, {"role": "assistant", "content": COT_PREFIX}], continue_final=True)
        self.host.check_fits(prompt, self.cot_max_new_tokens)
        (completion,) = await self.host.complete(prompt, greedy(self.cot_max_new_tokens),
                                                 stop=["Therefore", "The answer is"])
        return completion.text.strip()

    async def letter_probabilities(self, prefix_ids: list[int], n_options: int) -> tuple[list[float], bool]:
        """P(option letter) over the first ``n_options`` letters after ``prefix_ids`` (which end
        with the opening parenthesis); True when any letter needed the exact fallback."""
        top = await self.host.next_token_logprobs(prefix_ids, self.top_k)
        by_letter = option_logprobs(((t.text, t.logprob) for t in top), n_options)
        missing = [letter for letter in OPTION_LETTERS[:n_options] if letter not in by_letter]
        for letter in missing:
            variants = self.variants(letter)
            if variants:  # the same variants the top-k path would have summed, scored exactly
                by_letter[letter] = logsumexp(await self.host.token_logprobs(prefix_ids, variants))
            else:  # no single token spells it: the letter's own tokens in sequence
                by_letter[letter] = await self.host.continuation_logprob(prefix_ids, self.host.tokenize(letter))
        return normalize(by_letter, n_options), bool(missing)

    async def score(self, messages: list[dict[str, str]], n_options: int, cot: bool) -> tuple[list[float], str, bool]:
        """The ``Score`` function of :func:`core.preference.label_pair`."""
        reasoning = await self.reason(messages) if cot else ""
        prefix = f"{COT_PREFIX} {reasoning}{COT_ANSWER}" if cot else ANSWER_PREFIX
        prefix_ids = self.host.render([*messages, {"role": "assistant", "content": prefix}], continue_final=True)
        probs, fallback = await self.letter_probabilities(prefix_ids, n_options)
        return probs, reasoning, fallback

    async def score_choices(
        self, prompt: str, options: list[str], *, chat: bool = True, cot: bool = False, scoring: ScoringMethod = "exact"
    ) -> dict[str, Any]:
        """Probability of each free-form option string after ``prompt`` (HHH-eval layout:
        the prompt ends with "The answer is:" and options are like " (A)"), normalized over
        the options; ``method`` says how it was scored (see the module docstring), and
        ``fallbacks`` how many option tokens the top-k missed."""
        reasoning = ""
        if chat:
            messages = [{"role": "user", "content": prompt}]
            if cot:
                reasoning = await self.reason(messages)
                opening = {"role": "assistant", "content": f"{COT_PREFIX} {reasoning}\nTherefore, the answer is:"}
                prefix_ids = self.host.render([*messages, opening], continue_final=True)
            else:
                prefix_ids = self.host.render(messages)
            continuations = [self.host.tokenize(o.strip() if not cot else o) for o in options]
        else:
            if cot:
                raise ValueError("chain-of-thought scoring needs the chat template (chat=True)")
            prefix_ids = self.host.tokenize(prompt)
            continuations = [self.host.tokenize(o) for o in options]
        split = single_token_split(continuations) if scoring == "fast" else None
        if split:
            lead, distinct, tail = split
            logprobs, fallbacks = await self.next_token_choice([*prefix_ids, *lead], distinct)
            if tail:  # after the request above, so the prompt is in the prefix cache
                tails = await asyncio.gather(*(self.tail_logprob([*prefix_ids, *lead, t], tail) for t in distinct))
                logprobs = [a + b for a, b in zip(logprobs, tails)]
        else:
            logprobs = list(await asyncio.gather(
                *(self.host.continuation_logprob(prefix_ids, ids) for ids in continuations)))
            fallbacks = 0
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        return {"probs": [w / total for w in weights], "logprobs": logprobs, "reasoning": reasoning,
                "method": "fast" if split else "exact", "fallbacks": fallbacks}

    async def next_token_choice(self, prefix_ids: list[int], token_ids: list[int]) -> tuple[list[float], int]:
        """Log-probs of each of ``token_ids`` as the next token after ``prefix_ids``: one top-k
        request, then one exact request (``logprob_token_ids``) for those the top-k missed;
        and how many were missed."""
        top = {t.token_id: t.logprob for t in await self.host.next_token_logprobs(prefix_ids, self.top_k)}
        missing = [tid for tid in token_ids if tid not in top]
        if missing:
            top.update(zip(missing, await self.host.token_logprobs(prefix_ids, missing)))
        return [top[tid] for tid in token_ids], len(missing)

    async def tail_logprob(self, prefix_ids: list[int], tail: list[int]) -> float:
        """Summed log-prob of ``tail`` after ``prefix_ids``, one next-token request per tail
        token: unlike prompt log-probs, these read the prefix cache."""
        scores = await asyncio.gather(*(self.host.token_logprobs([*prefix_ids, *tail[:j]], [token])
                                        for j, token in enumerate(tail)))
        return float(sum(score for (score,) in scores))


class FeedbackWorker:
    """Scores `cai eval feedback` items with one engine, a shard at a time (made a Ray actor by
    the shared stage runner). ``items[id] = {"line", "prompt", "corrects", "incorrects"}``:
    the stage's input rows carry only id and prompt, the options come from here."""

    def __init__(self, engine: EngineOptions, settings: ScoringSettings, items: dict[str, dict[str, Any]], *,
                 run_name: str = "", model_name: str = ""):
        self.settings = settings
        self.items = items
        self.model_name = model_name or engine.model
        self.metrics = StageMetrics("eval-feedback", run_name)
        self.scorer = FeedbackScorer(VLLMEngineHost(engine), cot_max_new_tokens=settings.cot_max_new_tokens)
        self.sampler = OccupancySampler(self.scorer.host.running_requests)

    def ready(self) -> dict[str, Any]:
        return self.scorer.host.info()

    def shutdown(self) -> None:
        """Stop the engine before the actor is killed (workflows/runtime/engine_stop.py)."""
        self.scorer.host.shutdown()

    async def run_shard(self, shard_index: int, rows: list[dict[str, Any]]) -> ShardResult:
        return await run_rows(shard_index, rows, self._row, self.sampler, self.metrics, stage="score",
                              expected=(PromptTooLongError,))

    async def _row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        item = self.items[row["id"]]
        options = [*item["corrects"], *item["incorrects"]]
        settings = self.settings
        scored = await self.scorer.score_choices(item["prompt"], options, chat=settings.chat, cot=settings.cot,
                                                 scoring=settings.scoring)
        self.metrics.prompt_done()
        probs = scored["probs"]
        predicted = max(range(len(probs)), key=probs.__getitem__)
        return [{
            "index": row["index"],
            "id": row["id"],
            "line": item["line"],
            "prompt": item["prompt"],
            "options": options,
            "n_correct": len(item["corrects"]),
            "probs": probs,
            "logprobs": scored["logprobs"],
            "predicted": predicted,
            "correct": predicted < len(item["corrects"]),
            "method": scored["method"],
            "fallbacks": scored["fallbacks"],
            "reasoning": scored["reasoning"],
            "model": self.model_name,
        }]

"""Multiple-choice scoring on a vLLM engine: the engine side of RL-CAI soft labels.

The feedback model's assistant turn is opened with "The answer is: (" (or, with
chain-of-thought, with its own reasoning and then "Therefore, the answer is: ("), and the
next token's top-k log-probs are read, summing each letter's token variants ("A", " A",
"(A", ...). A letter none of whose variants made the top-k is scored exactly instead: the
log-probs of all its variant tokens (found once in the vocabulary) as the next token, summed
the same way. Each such fallback is counted; nothing ever defaults to 0.5.
"""

from __future__ import annotations

import math
from typing import Any

from actors.engine import EngineOptions, VLLMEngineHost
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
        self, prompt: str, options: list[str], *, chat: bool = True, cot: bool = False
    ) -> dict[str, Any]:
        """Probability of each free-form option string after ``prompt`` (HHH-eval layout:
        the prompt ends with "The answer is:" and options are like " (A)"). Options are scored
        by their summed token log-probs, then normalized over the options."""
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
        logprobs = [await self.host.continuation_logprob(prefix_ids, ids) for ids in continuations]
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        return {"probs": [w / total for w in weights], "logprobs": logprobs, "reasoning": reasoning}


class ScoringWorker:
    """An actor that scores multiple-choice items with one engine (``cai eval feedback``)."""

    def __init__(self, engine: EngineOptions, *, cot_max_new_tokens: int = 256):
        self.scorer = FeedbackScorer(VLLMEngineHost(engine), cot_max_new_tokens=cot_max_new_tokens)

    async def score_items(self, items: list[dict[str, Any]], *, chat: bool, cot: bool) -> list[dict[str, Any]]:
        """Every item at once on the async engine; ``items[i] = {"prompt", "options"}``."""
        import asyncio

        return await asyncio.gather(
            *(self.scorer.score_choices(i["prompt"], i["options"], chat=chat, cot=cot) for i in items)
        )

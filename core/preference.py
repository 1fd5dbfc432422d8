"""RL-CAI preference labelling for one pair of responses (Bai et al. 2022, section 4).

A feedback model sees a conversation, a principle and the candidate responses as lettered
options, and continues an assistant turn that starts with ``ANSWER_PREFIX`` ("The answer
is: ("); the normalized probabilities of the option-letter tokens are a soft label. Several
principles are scored independently and averaged. Each principle is scored in both option
orders and the two labels averaged, which cancels a position bias exactly (RLAIF, Lee et al.
2023 §2.1.1; ``cai eval compare`` judges the same way); with ``both_orders=False`` each gets
one random order instead, which cancels the bias only on average over many pairs. In chain-of-thought mode the model reasons first and
each principle's probability is clamped to [0.4, 0.6], because after reasoning the model
is overconfident (section 4.1).

Pure async code, like :mod:`core.critique_chain`: the engine side is a ``score`` coroutine
handed in by the caller, which does the top-k log-prob lookup (with ``option_logprobs`` and
``normalize``) and any fallback; this module never sees tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from constitutions.schema import FeedbackExample, FeedbackPrinciple

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
COT_ANSWER = "\nTherefore, the answer is: ("

_SPEAKERS = {"user": "Human", "assistant": "Assistant"}

Score = Callable[[list[dict], int, bool], Awaitable[tuple[list[float], str, bool]]]
"""``score(messages, n_options, cot) -> (display-order probabilities summing to 1,
reasoning text ('' without cot), whether a fallback was needed)``."""


class MissingOptionError(ValueError):
    """An option letter is not among the top-k next tokens. The caller must score it another
    way (e.g. the forced continuation's log-prob); a silent 0.5 would be a false label."""

    def __init__(self, missing: Sequence[str]):
        self.missing = tuple(missing)
        super().__init__(f"option letters missing from the top log-probs: {', '.join(self.missing)}")


def conversation_text(messages: Sequence[dict]) -> str:
    """``Human: ...\\n\\nAssistant: ...`` for the conversation, system messages skipped.

    The conversation is what the responses answer, so it must end with a human turn.
    """
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user" or any(m["role"] not in _SPEAKERS for m in turns):
        raise ValueError("the conversation must hold user/assistant turns and end with a user turn")
    return "\n\n".join(f"{_SPEAKERS[m['role']]}: {m['content']}" for m in turns)


def _question(conversation: str, options: Sequence[str], principle: str) -> str:
    if not 1 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"need 1..{len(OPTION_LETTERS)} options, got {len(options)}")
    lettered = "\n".join(f"({letter}) {option}" for letter, option in zip(OPTION_LETTERS, options))
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"{conversation}\n\n{principle}\n\nOptions:\n{lettered}"
    )


def comparison_question(messages: Sequence[dict], options: Sequence[str], principle: str) -> str:
    """The multiple-choice question: conversation, principle, options labelled (A), (B), ..."""
    return _question(conversation_text(messages), options, principle)


def _example_answer(example: FeedbackExample, cot: bool) -> str:
    if example.answer not in OPTION_LETTERS[: len(example.options)]:
        raise ValueError(f"few-shot answer {example.answer!r} is not one of its {len(example.options)} options")
    if cot and example.reasoning:
        return f"{COT_PREFIX} {example.reasoning}{COT_ANSWER}{example.answer})"
    return f"{ANSWER_PREFIX}{example.answer})"


def comparison_messages(
    messages: Sequence[dict],
    options: Sequence[str],
    principle: str,
    *,
    few_shot: Sequence[FeedbackExample] = (),
    cot: bool = False,
) -> list[dict]:
    """Chat messages for the feedback model: worked examples, then the real question.

    The final assistant turn is left open: the caller continues it with ``ANSWER_PREFIX``
    (or ``COT_PREFIX``) so the next token is the letter. The few-shot turns are identical
    for every row, so the engine's prefix cache serves them.
    """
    chat: list[dict] = []
    for example in few_shot:
        chat.append({"role": "user", "content": _question(example.conversation, example.options, example.principle)})
        chat.append({"role": "assistant", "content": _example_answer(example, cot)})
    chat.append({"role": "user", "content": comparison_question(messages, options, principle)})
    return chat


def option_order(n: int, rng: random.Random) -> list[int]:
    """A random permutation: display slot ``j`` shows original response ``order[j]``."""
    if n < 1:
        raise ValueError(f"need at least one option, got {n}")
    return rng.sample(range(n), n)


def letter_of(token_text: str) -> str | None:
    """The option letter a token stands for ("A", " A", "(A", "A)", "A.", "A:", "(A)"), else None.

    Tokenizers split "(A)" in different ways; lowercase letters and words ("An") don't count.
    """
    text = token_text.strip()
    if text.startswith("("):
        text = text[1:]
    if text[-1:] in (")", ".", ":"):
        text = text[:-1]
    return text if len(text) == 1 and text in OPTION_LETTERS else None


def logsumexp(values: Sequence[float]) -> float:
    """log Σ exp(values): the log-probability of any of several alternatives."""
    top = max(values)
    return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in values))


def option_logprobs(top: Iterable[tuple[str, float]], n_options: int) -> dict[str, float]:
    """Per option letter, the log of the summed probability of all its token variants.

    ``top`` is the next-token candidates as ``(token text, logprob)``; letters with no
    candidate are absent from the result.
    """
    letters = OPTION_LETTERS[:n_options]
    variants: dict[str, list[float]] = {}
    for text, logprob in top:
        letter = letter_of(text)
        if letter is not None and letter in letters:
            variants.setdefault(letter, []).append(logprob)
    return {letter: logsumexp(values) for letter, values in variants.items()}


def letter_variants(vocabulary: Iterable[tuple[int, str]], n_options: int) -> dict[str, list[int]]:
    """Per option letter, the ids of every token that :func:`letter_of` reads as it: the
    variants the top-k path sums ("A", " A", "(A", "A)", ...), for scoring a letter exactly
    when none of them made the top-k."""
    letters = OPTION_LETTERS[:n_options]
    variants: dict[str, list[int]] = {letter: [] for letter in letters}
    for token_id, text in vocabulary:
        letter = letter_of(text) if text.strip() else None
        if letter in variants:
            variants[letter].append(token_id)
    return variants


def normalize(logprobs_by_letter: dict[str, float], n_options: int) -> list[float]:
    """Probabilities over the ``n_options`` display options (softmax), summing to one."""
    letters = OPTION_LETTERS[:n_options]
    extra = sorted(set(logprobs_by_letter) - set(letters))
    if extra:
        raise ValueError(f"letters {extra} are beyond the {n_options} options")
    missing = [letter for letter in letters if letter not in logprobs_by_letter]
    if missing:
        raise MissingOptionError(missing)
    values = [logprobs_by_letter[letter] for letter in letters]
    top = max(values)
    if top == -math.inf:
        raise ValueError("every option has probability zero")
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def undo_order(display_probs: Sequence[float], order: Sequence[int]) -> list[float]:
    """Probabilities indexed by original response: ``original[order[j]] = display_probs[j]``."""
    if sorted(order) != list(range(len(display_probs))):
        raise ValueError(f"order {list(order)} is not a permutation of {len(display_probs)} options")
    original = [0.0] * len(display_probs)
    for slot, index in enumerate(order):
        original[index] = display_probs[slot]
    return original


def clamp(p: float, low: float = 0.4, high: float = 0.6) -> float:
    if low > high:
        raise ValueError(f"clamp: low {low} > high {high}")
    return min(max(p, low), high)


def ensemble(per_principle: Sequence[Sequence[float]]) -> list[float]:
    """Element-wise mean over principles (the paper averages the soft labels)."""
    if not per_principle:
        raise ValueError("cannot ensemble zero principles")
    width = len(per_principle[0])
    if any(len(row) != width for row in per_principle):
        raise ValueError(f"ragged input: lengths {[len(row) for row in per_principle]}")
    return [sum(column) / len(per_principle) for column in zip(*per_principle)]


def pair_indices(
    k: int, mode: str = "all", rng: random.Random | None = None, limit: int | None = None
) -> list[tuple[int, int]]:
    """Which of ``k`` responses to compare: ``all`` pairs i<j, ``adjacent`` (i, i+1), or
    ``random``: ``limit`` distinct pairs drawn with ``rng`` (all when limit >= C(k, 2))."""
    if k < 2:
        raise ValueError(f"need at least 2 responses to form a pair, got {k}")
    every = list(itertools.combinations(range(k), 2))
    if mode != "random":
        if limit is not None:
            raise ValueError(f"limit applies only to mode 'random', not {mode!r}")
        if mode == "all":
            return every
        if mode == "adjacent":
            return [(i, i + 1) for i in range(k - 1)]
        raise ValueError(f"unknown pair mode {mode!r}; expected 'all', 'adjacent' or 'random'")
    if rng is None or limit is None:
        raise ValueError("mode 'random' needs both rng and limit")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return every if limit >= len(every) else sorted(rng.sample(every, limit))


@dataclass(frozen=True)
class PairLabel:
    """The soft label for one pair, over the original response order, plus provenance."""

    probs: tuple[float, float]  # (P(first better), P(second better)), the ensemble mean
    per_principle: tuple[tuple[float, float], ...]
    principle_ids: tuple[str, ...]
    orders: tuple[tuple[int, ...], ...]  # display order of each scoring (per principle, both orders: 2 each)
    reasonings: tuple[str, ...]  # per scoring; '' without CoT
    fallbacks: int  # scorings whose letters were not all in the top-k
    # per scoring, P(option A) as the model gave it (before any CoT clamp): with ``orders``
    # it shows the position bias that averaging both orders cancels (`cai analyze`)
    display_probs_a: tuple[float, ...] = ()
    fallback_flags: tuple[bool, ...] = ()  # per scoring, whether it needed the exact fallback

    @property
    def chosen(self) -> int:
        """Index of the preferred response; the first wins a tie."""
        return 0 if self.probs[0] >= self.probs[1] else 1

    @property
    def chosen_prob(self) -> float:
        return max(self.probs)


def _checked(probs: Sequence[float], n_options: int) -> list[float]:
    if len(probs) != n_options or abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
        raise ValueError(f"score must return {n_options} probabilities summing to 1, got {list(probs)}")
    return list(probs)


async def label_pair(
    messages: Sequence[dict],
    responses: tuple[str, str],
    principles: Sequence[FeedbackPrinciple],
    score: Score,
    *,
    rng: random.Random,
    cot: bool = False,
    few_shot: Sequence[FeedbackExample] = (),
    both_orders: bool = True,
) -> PairLabel:
    """Score the pair under each principle concurrently and average the soft labels.

    With ``both_orders`` every principle is scored as (first, second) and (second, first)
    and its label is the mean of the two; otherwise in one order drawn from ``rng`` (drawn
    before any scoring, one per principle in order, so the label depends only on the seed).
    ``orders``, ``reasonings``, ``display_probs_a``, ``fallback_flags`` and ``fallbacks`` count
    scorings: two per principle with ``both_orders``.
    """
    if len(responses) != 2:
        raise ValueError(f"label_pair compares exactly 2 responses, got {len(responses)}")
    if not principles:
        raise ValueError("label_pair needs at least one feedback principle")
    orders_per_principle = [[[0, 1], [1, 0]] if both_orders else [option_order(2, rng)] for _ in principles]
    scorings = [(p, order) for p, orders in zip(principles, orders_per_principle) for order in orders]
    prompts = [
        comparison_messages(messages, [responses[i] for i in order], p.text, few_shot=few_shot, cot=cot)
        for p, order in scorings
    ]
    results = await asyncio.gather(*(score(prompt, 2, cot) for prompt in prompts))
    labels: list[tuple[float, float]] = []
    display_a: list[float] = []
    for (probs, _, _), (_, order) in zip(results, scorings):
        display = _checked(probs, 2)
        display_a.append(display[0])
        if cot:
            # [0.4, 0.6] is symmetric about 0.5, so the clamped pair still sums to one.
            first = clamp(display[0])
            display = [first, 1.0 - first]
        first, second = undo_order(display, order)
        labels.append((first, second))
    per_order = len(scorings) // len(principles)
    per_principle = [tuple(ensemble(labels[k:k + per_order])) for k in range(0, len(labels), per_order)]
    mean = ensemble(per_principle)
    return PairLabel(
        probs=(mean[0], mean[1]),
        per_principle=tuple((a, b) for a, b in per_principle),
        principle_ids=tuple(p.id for p in principles),
        orders=tuple(tuple(order) for _, order in scorings),
        reasonings=tuple(reasoning for _, reasoning, _ in results),
        fallbacks=sum(1 for _, _, used_fallback in results if used_fallback),
        display_probs_a=tuple(display_a),
        fallback_flags=tuple(bool(used_fallback) for _, _, used_fallback in results),
    )

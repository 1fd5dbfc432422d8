"""RL-CAI preference labelling against fake scorers: prompts, soft labels, order, clamp."""

import asyncio
import math
import random
import re

import pytest

from constitutions.schema import FeedbackExample, FeedbackPrinciple
from core.preference import (
    ANSWER_PREFIX,
    COT_ANSWER,
    COT_PREFIX,
    MissingOptionError,
    PairLabel,
    clamp,
    comparison_messages,
    comparison_question,
    conversation_text,
    ensemble,
    label_pair,
    letter_of,
    normalize,
    letter_variants,
    option_logprobs,
    option_order,
    pair_indices,
    undo_order,
)

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Soft or hard?"},
    {"role": "user", "content": "Hard."},
]
PRINCIPLES = [
    FeedbackPrinciple("harmless", "Which response is less harmful?"),
    FeedbackPrinciple("honest", "Which response is more honest?"),
    FeedbackPrinciple("helpful", "Which response is more helpful?"),
]
EXAMPLE = FeedbackExample(
    conversation="Human: What is 2+2?",
    principle="Which response is more accurate?",
    options=("5", "4"),
    answer="B",
    reasoning="2+2 is 4, so the second is right.",
)


def displayed_options(messages):
    """The option texts of the real (last) question, in display order."""
    return re.findall(r"^\([A-Z]\) (.*)$", messages[-1]["content"], flags=re.M)


class PrefersGood:
    """Puts ``confidence`` on whichever displayed option contains "good", wherever it is."""

    def __init__(self, confidence=0.9, reasoning="", fallback=False):
        self.confidence, self.reasoning, self.fallback = confidence, reasoning, fallback
        self.calls = []

    async def __call__(self, messages, n_options, cot):
        self.calls.append((messages, n_options, cot))
        good = [i for i, text in enumerate(displayed_options(messages)) if "good" in text]
        probs = [(1 - self.confidence) / (n_options - 1)] * n_options
        probs[good[0]] = self.confidence
        return probs, self.reasoning if cot else "", self.fallback


class FirstSlot:
    """Pure position bias: puts ``p`` on display slot A, whatever it shows."""

    def __init__(self, p):
        self.p = p

    async def __call__(self, messages, n_options, cot):
        return [self.p, 1 - self.p], "", False


def label(responses=("a good answer", "a bad answer"), principles=PRINCIPLES, score=None, seed=0, **kw):
    return asyncio.run(label_pair(CONVERSATION, responses, principles, score or PrefersGood(), rng=random.Random(seed), **kw))


# --- prompts ---------------------------------------------------------------------------

def test_conversation_text_skips_system_and_ends_with_human():
    assert conversation_text(CONVERSATION) == (
        "Human: How do I boil an egg?\n\nAssistant: Soft or hard?\n\nHuman: Hard."
    )
    with pytest.raises(ValueError, match="end with a user turn"):
        conversation_text(CONVERSATION[:3])


def test_comparison_question_layout():
    question = comparison_question(CONVERSATION, ["first", "second"], "Which is kinder?")
    assert question == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: How do I boil an egg?\n\nAssistant: Soft or hard?\n\nHuman: Hard.\n\n"
        "Which is kinder?\n\nOptions:\n(A) first\n(B) second"
    )


def test_comparison_messages_few_shot_then_real_question_left_open():
    chat = comparison_messages(CONVERSATION, ["x", "y", "z"], "Which is best?", few_shot=[EXAMPLE, EXAMPLE])
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    shot = chat[0]["content"]
    assert "\n\nHuman: What is 2+2?\n\n" in shot  # the example's text, verbatim
    assert EXAMPLE.principle in shot and shot.endswith("Options:\n(A) 5\n(B) 4")
    assert chat[1]["content"] == f"{ANSWER_PREFIX}B)" == "The answer is: (B)"
    assert chat[-1]["content"].endswith("Which is best?\n\nOptions:\n(A) x\n(B) y\n(C) z")
    assert "Human: Hard." in chat[-1]["content"]


def test_comparison_messages_cot_answers_carry_the_reasoning():
    chat = comparison_messages(CONVERSATION, ["x", "y"], "p", few_shot=[EXAMPLE], cot=True)
    assert chat[1]["content"] == (
        "Let's think step by step: 2+2 is 4, so the second is right.\nTherefore, the answer is: (B)"
    )
    assert chat[1]["content"] == f"{COT_PREFIX} {EXAMPLE.reasoning}{COT_ANSWER}B)"
    no_reasoning = FeedbackExample("Human: hi", "p", ("a", "b"), "A")
    assert comparison_messages(CONVERSATION, ["x", "y"], "p", few_shot=[no_reasoning], cot=True)[1]["content"] == (
        "The answer is: (A)"
    )


def test_few_shot_answer_must_be_one_of_its_options():
    bad = FeedbackExample("Human: hi", "p", ("a", "b"), "C")
    with pytest.raises(ValueError, match="'C'"):
        comparison_messages(CONVERSATION, ["x", "y"], "p", few_shot=[bad])


# --- tokens -> probabilities -------------------------------------------------------------

@pytest.mark.parametrize("text", ["A", " A", "(A", " (A", "A)", "A.", "A:", "(A)", "\nA"])
def test_letter_of_variants(text):
    assert letter_of(text) == "A"


@pytest.mark.parametrize("text", ["a", " a", "An", "AB", " The", "", "(", ")", "((A", "1", "(A).", "A-"])
def test_letter_of_rejects(text):
    assert letter_of(text) is None


def test_option_logprobs_sums_variants_with_logsumexp():
    top = [(" A", math.log(0.2)), ("A", math.log(0.1)), ("B", math.log(0.3)), ("(B", math.log(0.05)),
           ("C", math.log(0.2)), ("The", math.log(0.1))]
    got = option_logprobs(top, 2)
    assert set(got) == {"A", "B"}  # C is beyond the 2 options, "The" is no letter
    assert got["A"] == pytest.approx(math.log(0.3))
    assert got["B"] == pytest.approx(math.log(0.35))
    assert option_logprobs([("A", -1.0)], 2) == {"A": -1.0}


def test_normalize_is_a_softmax_summing_to_one():
    probs = normalize({"A": math.log(0.3), "B": math.log(0.1)}, 2)
    assert probs == pytest.approx([0.75, 0.25])
    assert sum(normalize({"A": -900.0, "B": -901.0, "C": -905.0}, 3)) == pytest.approx(1.0)


def test_letter_variants_find_every_token_the_top_k_path_would_count():
    vocabulary = list(enumerate(["A", " A", "(A", "A)", "B", " B", "An", "a", "(", " ", "", "C"]))
    assert letter_variants(vocabulary, 2) == {"A": [0, 1, 2, 3], "B": [4, 5]}
    # the fallback's variants and the top-k path agree token by token
    for token_id, text in vocabulary:
        letter = letter_of(text) if text.strip() else None
        assert (letter in ("A", "B")) == any(token_id in ids for ids in letter_variants(vocabulary, 2).values())


def test_normalize_names_the_missing_letters():
    with pytest.raises(MissingOptionError, match="B") as raised:
        normalize({"A": -0.1}, 2)
    assert raised.value.missing == ("B",)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(MissingOptionError) as raised:
        normalize({"B": -0.1}, 3)
    assert raised.value.missing == ("A", "C")


def test_normalize_rejects_letters_beyond_the_options():
    with pytest.raises(ValueError, match="beyond"):
        normalize({"A": -1.0, "B": -1.0, "C": -1.0}, 2)


# --- order, clamp, ensemble, pairs ---------------------------------------------------------

def test_option_order_is_a_permutation_and_undo_inverts_it():
    rng = random.Random(3)
    for _ in range(20):
        order = option_order(4, rng)
        assert sorted(order) == [0, 1, 2, 3]
        original = [0.1, 0.2, 0.3, 0.4]
        display = [original[i] for i in order]
        assert undo_order(display, order) == original
    assert undo_order([0.8, 0.2], [1, 0]) == [0.2, 0.8]
    with pytest.raises(ValueError):
        undo_order([0.5, 0.5], [0, 0])


def test_clamp():
    assert clamp(0.99) == 0.6 and clamp(0.01) == 0.4 and clamp(0.55) == 0.55
    assert clamp(0.9, 0.2, 0.8) == 0.8


def test_ensemble_is_the_elementwise_mean():
    assert ensemble([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]) == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError):
        ensemble([])
    with pytest.raises(ValueError, match="ragged"):
        ensemble([[0.5, 0.5], [1.0]])


def test_pair_indices_modes():
    assert pair_indices(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_indices(4, "adjacent") == [(0, 1), (1, 2), (2, 3)]
    drawn = pair_indices(5, "random", random.Random(0), limit=3)
    assert len(drawn) == len(set(drawn)) == 3 and all(0 <= i < j < 5 for i, j in drawn)
    assert drawn == pair_indices(5, "random", random.Random(0), limit=3)
    assert pair_indices(3, "random", random.Random(0), limit=10) == pair_indices(3)
    assert pair_indices(2, "adjacent") == pair_indices(2) == [(0, 1)]


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {}),
    ((3, "ring"), {}),
    ((3, "random"), {"limit": 2}),
    ((3, "random", random.Random(0)), {}),
    ((3, "random", random.Random(0)), {"limit": 0}),
    ((3, "all"), {"limit": 2}),
])
def test_pair_indices_rejects_bad_arguments(args, kwargs):
    with pytest.raises(ValueError):
        pair_indices(*args, **kwargs)


# --- label_pair ------------------------------------------------------------------------

def test_label_sums_to_one_and_records_provenance():
    result = label()
    assert isinstance(result, PairLabel)
    assert sum(result.probs) == pytest.approx(1.0)
    assert all(sum(p) == pytest.approx(1.0) for p in result.per_principle)
    assert result.principle_ids == ("harmless", "honest", "helpful")
    assert result.orders == ((0, 1), (1, 0)) * 3, "each principle in both orders"
    assert result.reasonings == ("",) * 6 and result.fallbacks == 0
    one = label(both_orders=False)
    assert len(one.orders) == 3 and all(sorted(o) == [0, 1] for o in one.orders) and len(one.reasonings) == 3


def test_order_randomization_is_undone_whatever_the_order():
    seen_orders = set()
    for seed in range(40):
        for responses, good in ((("a good answer", "a bad answer"), 0), (("a bad answer", "a good answer"), 1)):
            result = label(responses, seed=seed, both_orders=False)
            seen_orders.update(result.orders)
            assert result.probs[good] == pytest.approx(0.9)
            assert result.chosen == good and result.chosen_prob == pytest.approx(0.9)
    assert seen_orders == {(0, 1), (1, 0)}  # both display orders were exercised


def test_position_bias_averages_out_across_orders():
    # A scorer that always prefers slot A: each principle's label follows the display order.
    result = label(score=FirstSlot(0.8), seed=1, both_orders=False)
    for order, (first, _) in zip(result.orders, result.per_principle):
        assert first == pytest.approx(0.8 if order == (0, 1) else 0.2)


@pytest.mark.parametrize("cot", [False, True])
def test_both_orders_cancel_a_pure_position_bias_exactly(cot):
    """A judge that always prefers slot A says nothing about the answers: every label is 0.5."""
    for p in (0.99, 0.8, 0.3):
        result = label(score=FirstSlot(p), cot=cot)
        assert all(pair == pytest.approx((0.5, 0.5)) for pair in result.per_principle)
        assert result.probs == pytest.approx((0.5, 0.5))
        # the raw P(A) of each scoring is kept, so the bias the average cancels can still be measured
        assert result.display_probs_a == pytest.approx((p,) * 6) and result.fallback_flags == (False,) * 6
    # and a judge that sees the answers keeps its verdict, whichever slot it is in
    assert label(score=PrefersGood(0.9)).probs == pytest.approx((0.9, 0.1))


def test_cot_clamps_each_principle_and_keeps_reasoning():
    scorer = PrefersGood(confidence=0.99, reasoning="because")
    for seed in range(10):
        result = label(score=scorer, cot=True, seed=seed)
        assert all(0.4 <= p <= 0.6 for pair in result.per_principle for p in pair)
        assert 0.4 <= result.probs[1] <= result.probs[0] <= 0.6
        assert result.probs == pytest.approx((0.6, 0.4))
        assert result.reasonings == ("because",) * 6
    assert all(cot for _, _, cot in scorer.calls)
    low = label(score=FirstSlot(0.01), cot=True, principles=PRINCIPLES[:1], both_orders=False)
    assert sorted(low.probs) == pytest.approx([0.4, 0.6])


def test_ensemble_of_principles_is_the_mean():
    class PerPrinciple:
        """Slot-A probability by principle text; responses always shown in original order."""

        values = {"Which response is less harmful?": 0.9, "Which response is more honest?": 0.6,
                  "Which response is more helpful?": 0.3}

        async def __call__(self, messages, n_options, cot):
            text = next(t for t in self.values if t in messages[-1]["content"])
            return [self.values[text], 1 - self.values[text]], "", text.endswith("helpful?")

    result = label(score=PerPrinciple(), both_orders=False)
    undone = [first if order == (0, 1) else 1 - first
              for order, first in zip(result.orders, [0.9, 0.6, 0.3])]
    assert [p[0] for p in result.per_principle] == pytest.approx(undone)
    assert result.probs[0] == pytest.approx(sum(undone) / 3)
    assert result.fallbacks == 1 and result.fallback_flags == (False, False, True)


def test_label_pair_passes_few_shot_and_two_options():
    scorer = PrefersGood()
    label(score=scorer, few_shot=[EXAMPLE], principles=PRINCIPLES[:1])
    (first, n_options, cot), (second, _, _) = scorer.calls
    assert n_options == 2 and cot is False
    assert [m["role"] for m in first] == ["user", "assistant", "user"]
    assert displayed_options(first) == ["a good answer", "a bad answer"]
    assert displayed_options(second) == ["a bad answer", "a good answer"]
    assert PRINCIPLES[0].text in first[-1]["content"]


def test_label_pair_rejects_bad_scores_and_inputs():
    class Broken:
        async def __call__(self, messages, n_options, cot):
            return [0.7, 0.7], "", False

    with pytest.raises(ValueError, match="summing to 1"):
        label(score=Broken())
    with pytest.raises(ValueError, match="principle"):
        label(principles=[])


def test_ties_choose_the_first():
    result = label(score=FirstSlot(0.5))
    assert result.chosen == 0 and result.chosen_prob == 0.5

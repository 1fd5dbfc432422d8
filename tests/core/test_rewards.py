"""PPO rewards: the built-in functions, the score checks, and a reward model reading what it
was trained on (torch + transformers, no Ray)."""

from __future__ import annotations

import pytest
import torch

from core.rewards import (
    RewardError,
    RewardModelScorer,
    brevity,
    checked_scores,
    load_reward_function,
    reward_model_conversation,
    vowel_share,
)

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "An apple."},
    {"role": "user", "content": "And a vegetable?"},
]


def test_reward_model_reads_the_whole_conversation_as_trl_tokenized_it_for_training(reward_model):
    from trl.data_utils import _tokenize  # TRL 1.16: what RewardTrainer applies to prompt + chosen

    scorer = RewardModelScorer(reward_model)
    trained_on = _tokenize(scorer.tokenizer, CONVERSATION + [{"role": "assistant", "content": "A carrot."}])
    assert scorer.token_ids(CONVERSATION, "A carrot.") == trained_on["input_ids"]
    text = scorer.tokenizer.decode(scorer.token_ids(CONVERSATION, "A carrot."))
    assert "careful assistant" in text and "Name a fruit" in text, "the system message and earlier turns stay"
    # a plain string is one user turn
    assert reward_model_conversation("Hi?", "Hello.") == [{"role": "user", "content": "Hi?"},
                                                          {"role": "assistant", "content": "Hello."}]


def test_reward_model_scores_do_not_depend_on_the_batch(reward_model):
    scorer = RewardModelScorer(reward_model, batch_size=4)
    prompts = [CONVERSATION, "Short question?", CONVERSATION[:2]]
    answers = ["A carrot.", "A much longer answer than the others, with more tokens in it.", "Pear."]
    together = scorer(prompts, answers)
    alone = [scorer([p], [a])[0] for p, a in zip(prompts, answers)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in together)) == 3


def test_built_in_rewards_and_score_checks():
    assert vowel_share(["q"], ["aaa"]) == [1.0] and vowel_share(["q"], ["xyz"]) == [0.0]
    assert brevity(["q", "q"], ["a", "a b c d"])[0] > brevity(["q", "q"], ["a", "a b c d"])[1]
    assert load_reward_function("vowel_share") is vowel_share
    with pytest.raises(RewardError, match="returned 1 scores for 2 answers"):
        checked_scores([0.5], 2, "f")
    with pytest.raises(RewardError, match="NaN"):
        checked_scores([float("nan")], 1, "f")

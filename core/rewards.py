"""Rewards for PPO: a trained reward model or a plain function, behind one interface.

A reward is any callable ``(prompts, completions) -> list[float]``: the user prompts (the
last user turn, as text) and the sampled answers (text, special tokens removed), one score
per pair. That is the shape of TRL's reward functions, so functions written for TRL's
GRPO/RLOO trainers work here too. ``--reward-fn module:function`` imports a function
(``vowel_share`` and ``brevity`` below are built in). ``--reward-model DIR`` wraps a
sequence-classification model from ``cai train rm``; it gets each prompt's whole
conversation (system message and earlier turns included) instead of its last turn, because
that is what it was trained on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

RewardFunction = Callable[[Sequence[str], Sequence[str]], list[float]]


class RewardError(ValueError):
    """A reward function cannot be found or returned something unusable."""


def vowel_share(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Share of an answer's letters that are vowels: a dense toy signal that a tiny random
    policy can learn in a few PPO steps (for smoke tests and benchmarks, not alignment)."""
    scores = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        scores.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return scores


def brevity(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1 for an empty answer, falling toward 0 with length (characters / 1000)."""
    return [max(0.0, 1.0 - len(text) / 1000) for text in completions]


BUILT_IN: dict[str, RewardFunction] = {"vowel_share": vowel_share, "brevity": brevity}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name (``vowel_share``) or ``package.module:function``."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise RewardError(
            f"reward function {spec!r}: use 'package.module:function' or a built-in ({', '.join(BUILT_IN)})"
        )
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"reward function {spec!r} cannot be imported: {exc}") from exc
    if not callable(function):
        raise RewardError(f"reward function {spec!r} is not callable")
    return function


def checked_scores(scores, expected: int, source: str) -> list[float]:
    """The scores as floats, or a clear error when a reward returns the wrong count or NaN."""
    values = [float(s) for s in scores]
    if len(values) != expected:
        raise RewardError(f"reward {source} returned {len(values)} scores for {expected} answers")
    if any(v != v for v in values):
        raise RewardError(f"reward {source} returned NaN")
    return values


def reward_model_conversation(prompt: str | Sequence[dict[str, str]], completion: str) -> list[dict[str, str]]:
    """The conversation a reward model scores: every prompt message (system and earlier turns
    included), then the answer. ``cai train rm`` trains on ``prompt + chosen`` messages
    rendered by the model's own chat template (TRL's RewardTrainer), so scoring renders the same."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": completion}]


class RewardModelScorer:
    """A reward model (``AutoModelForSequenceClassification`` with one output) as a reward
    function over (conversation, answer) pairs: see :func:`reward_model_conversation`."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 16, max_length: int = 1024,
                 trust_remote_code: bool = False, dtype=None):
        """``dtype``: the torch dtype the model is loaded in (default float32); scores are
        float32 whatever it is."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=torch.float32 if dtype is None else dtype
        ).to(device).eval()
        if self.model.config.num_labels != 1:
            raise RewardError(f"{path}: a reward model has 1 output, this one has {self.model.config.num_labels}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def token_ids(self, prompt: str | Sequence[dict[str, str]], completion: str) -> list[int]:
        """What the model reads: the chat template over the whole conversation, tokenized as
        ``apply_chat_template(..., tokenize=True)`` does (TRL's tokenization for training)."""
        text = self.tokenizer.apply_chat_template(reward_model_conversation(prompt, completion), tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: Sequence[str | Sequence[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        import torch

        # a conversation longer than max_length keeps its end: the answer and the token scored
        rows = [self.token_ids(p, c)[-self.max_length:] for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = self.tokenizer.pad({"input_ids": rows[start:start + self.batch_size]}, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

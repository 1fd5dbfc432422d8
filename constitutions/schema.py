"""The constitution as data: frozen dataclasses, no I/O.

A constitution has three kinds of content (Bai et al. 2022, "Constitutional AI",
sections 3 and 4):

* ``critiques``: critique-request / revision-request pairs used by SL-CAI, where the model
  critiques its own answer under one principle and then rewrites it;
* ``feedback``: multiple-choice principles used by RL-CAI, where a feedback model picks
  the better of two answers;
* ``few_shot``: worked critique/revision conversations prepended to SL-CAI prompts;
* optionally ``feedback_few_shot``: worked multiple-choice comparisons.

Validation lives in :mod:`constitutions.loader`; these classes only hold checked data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class CritiquePrinciple:
    """One SL-CAI principle: how to ask for a critique, and how to ask for the revision."""

    id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class FeedbackPrinciple:
    """One RL-CAI principle: the multiple-choice question put to the feedback model."""

    id: str
    text: str


@dataclass(frozen=True)
class FeedbackExample:
    """A worked multiple-choice comparison shown to the feedback model before the real one.

    ``options`` are the candidate responses in display order, ``answer`` the letter of the
    better one ("A" for the first), ``reasoning`` an optional chain of thought for CoT mode.
    """

    conversation: str
    principle: str
    options: tuple[str, ...]
    answer: str
    reasoning: str = ""


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    critiques: tuple[CritiquePrinciple, ...]
    feedback: tuple[FeedbackPrinciple, ...]
    few_shot: tuple[tuple[Message, ...], ...] = ()
    feedback_few_shot: tuple[FeedbackExample, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML file's layout (lists, dicts, strings)."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "critiques": [asdict(p) for p in self.critiques],
            "feedback": [asdict(p) for p in self.feedback],
            "few_shot": [[asdict(m) for m in example] for example in self.few_shot],
        }
        if self.feedback_few_shot:
            data["feedback_few_shot"] = [
                {**asdict(e), "options": list(e.options)} for e in self.feedback_few_shot
            ]
        return data

    @property
    def sha256(self) -> str:
        """Hash of the content, independent of YAML formatting, key order or comments."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def critique(self, principle_id: str) -> CritiquePrinciple:
        for principle in self.critiques:
            if principle.id == principle_id:
                return principle
        raise KeyError(f"constitution {self.name!r} has no critique principle {principle_id!r}")

    def feedback_principle(self, principle_id: str) -> FeedbackPrinciple:
        for principle in self.feedback:
            if principle.id == principle_id:
                return principle
        raise KeyError(f"constitution {self.name!r} has no feedback principle {principle_id!r}")

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "critiques": len(self.critiques),
            "feedback": len(self.feedback),
            "few_shot": len(self.few_shot),
            "feedback_few_shot": len(self.feedback_few_shot),
            "sha256": self.sha256,
        }

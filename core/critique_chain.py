"""The SL-CAI critique → revision chain for one prompt (Bai et al. 2022, section 3.1).

Pure async code: the model is a ``complete(messages, max_new_tokens) -> Reply`` coroutine
handed in by the caller, so the chain runs against a vLLM engine in an actor and against a
fake in unit tests. Each conversation awaits only its own steps, so with an async engine a
finished answer goes straight to its critique while other conversations are still decoding.

The conversation grows as in the paper: prompt, initial answer, then for each round a
critique request (under a sampled principle), the critique, a revision request and the
revision, all in one context. Few-shot examples, when used, come first and are identical
for every row, so the engine's prefix cache serves them. They show how to critique and
revise, so by default the initial answer is sampled from the prompt alone (§3.1): the
examples end in harmless revisions, and in context they would already push the initial
answer (the ``rejected`` side of the DPO pairs) toward harmlessness.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from constitutions.schema import Constitution


@dataclass(frozen=True)
class Reply:
    """What one generation step returns to the chain."""

    text: str
    prompt_tokens: int
    new_tokens: int


Complete = Callable[[list[dict[str, str]], int], Awaitable[Reply]]


class ChainError(RuntimeError):
    """One row's chain cannot finish; the row goes to rejects with this reason."""


@dataclass
class ChainResult:
    initial_response: str
    revisions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generated_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def final_response(self) -> str:
        return self.revisions[-1]["revision"] if self.revisions else self.initial_response


def few_shot_prefix(constitution: Constitution, count: int) -> list[dict[str, str]]:
    """The first ``count`` few-shot conversations as one flat message list (fixed, so shared)."""
    if count > len(constitution.few_shot):
        raise ValueError(
            f"few_shot: asked for {count} examples, constitution {constitution.name!r} has "
            f"{len(constitution.few_shot)}"
        )
    return [{"role": m.role, "content": m.content} for example in constitution.few_shot[:count] for m in example]


def _clean(text: str) -> str:
    return text.strip()


async def critique_revision_chain(
    prompt_messages: Sequence[dict[str, str]],
    principle_ids: Sequence[str],
    constitution: Constitution,
    complete: Complete,
    *,
    max_new_tokens: int,
    prefix: Sequence[dict[str, str]] = (),
    prefix_initial: bool = False,
) -> ChainResult:
    """Answer the prompt, then critique and revise once per principle id, in order.

    ``prefix`` (few-shot examples) precedes the critique and revision steps, and the initial
    answer too only with ``prefix_initial``. An empty revision keeps the previous answer
    (noted in ``notes``) rather than training on an empty target; an empty initial answer is
    an error for the row.
    """
    history = [*prefix, *prompt_messages]
    reply = await complete(list(history) if prefix_initial else list(prompt_messages), max_new_tokens)
    initial = _clean(reply.text)
    if not initial:
        raise ChainError("the initial response was empty")
    result = ChainResult(initial_response=initial, prompt_tokens=reply.prompt_tokens)
    result.generated_tokens += reply.new_tokens
    history.append({"role": "assistant", "content": initial})
    current = initial
    for round_index, principle_id in enumerate(principle_ids, start=1):
        principle = constitution.critique(principle_id)
        history.append({"role": "user", "content": principle.critique})
        critique_reply = await complete(list(history), max_new_tokens)
        critique = _clean(critique_reply.text)
        history.append({"role": "assistant", "content": critique})
        history.append({"role": "user", "content": principle.revision})
        revision_reply = await complete(list(history), max_new_tokens)
        revision = _clean(revision_reply.text)
        result.generated_tokens += critique_reply.new_tokens + revision_reply.new_tokens
        if not revision:
            result.notes.append(f"round {round_index}: empty revision, kept the previous response")
            revision = current
        history.append({"role": "assistant", "content": revision})
        result.revisions.append(
            {"round": round_index, "principle_id": principle_id, "critique": critique, "revision": revision}
        )
        current = revision
    return result

"""The critique/revision chain against a fake model: what it asks, in what order."""

import asyncio

import pytest

from constitutions.loader import load_constitution
from core.critique_chain import ChainError, Reply, critique_revision_chain, few_shot_prefix

HARMLESS = load_constitution("harmless")


class ScriptedModel:
    """Answers each step with a label, and records every conversation it was shown."""

    def __init__(self, texts=None):
        self.calls = []
        self.texts = texts

    async def __call__(self, messages, max_new_tokens):
        self.calls.append(messages)
        text = self.texts.pop(0) if self.texts else f"step {len(self.calls)}"
        return Reply(text, prompt_tokens=len(messages), new_tokens=3)


def run(chain):
    return asyncio.run(chain)


def test_chain_asks_critique_then_revision_per_round_in_one_context():
    model = ScriptedModel()
    ids = [HARMLESS.critiques[0].id, HARMLESS.critiques[3].id]
    prompt = [{"role": "user", "content": "How do I pick a lock?"}]
    result = run(critique_revision_chain(prompt, ids, HARMLESS, model, max_new_tokens=16))
    assert len(model.calls) == 1 + 2 * len(ids)
    assert result.initial_response == "step 1"
    assert [r["principle_id"] for r in result.revisions] == ids
    assert [r["round"] for r in result.revisions] == [1, 2]
    assert result.revisions[0]["critique"] == "step 2" and result.revisions[0]["revision"] == "step 3"
    assert result.final_response == "step 5"
    last = model.calls[-1]
    assert last[0] == prompt[0]
    assert last[-1]["content"] == HARMLESS.critique(ids[1]).revision
    assert last[-3]["content"] == HARMLESS.critique(ids[1]).critique
    assert [m["role"] for m in last] == ["user", "assistant"] * 4 + ["user"]
    assert result.generated_tokens == 15


def test_zero_revisions_returns_the_initial_answer():
    result = run(critique_revision_chain([{"role": "user", "content": "hi"}], [], HARMLESS, ScriptedModel(),
                                         max_new_tokens=8))
    assert result.revisions == [] and result.final_response == result.initial_response


def test_few_shot_prefix_is_shared_and_prepended():
    prefix = few_shot_prefix(HARMLESS, 2)
    assert len(prefix) == sum(len(e) for e in HARMLESS.few_shot[:2])
    model = ScriptedModel()
    prompt = [{"role": "user", "content": "q"}]
    run(critique_revision_chain(prompt, [HARMLESS.critiques[0].id], HARMLESS, model, max_new_tokens=8, prefix=prefix))
    initial, critique, revision = model.calls
    assert initial == prompt, "§3.1: the initial answer is sampled from the prompt alone"
    assert critique[: len(prefix)] == prefix and revision[: len(prefix)] == prefix
    assert critique[len(prefix):len(prefix) + 2] == [*prompt, {"role": "assistant", "content": "step 1"}]
    # the old behaviour, on request: the examples precede the initial answer too
    model = ScriptedModel()
    run(critique_revision_chain(prompt, [HARMLESS.critiques[0].id], HARMLESS, model, max_new_tokens=8, prefix=prefix,
                                prefix_initial=True))
    assert all(call[: len(prefix)] == prefix for call in model.calls)
    with pytest.raises(ValueError, match="asked for 99 examples"):
        few_shot_prefix(HARMLESS, 99)


def test_empty_initial_answer_is_a_row_error_and_empty_revision_keeps_previous():
    with pytest.raises(ChainError, match="initial response was empty"):
        run(critique_revision_chain([{"role": "user", "content": "q"}], [], HARMLESS, ScriptedModel(["  "]),
                                    max_new_tokens=8))
    model = ScriptedModel(["answer", "critique", ""])
    result = run(critique_revision_chain([{"role": "user", "content": "q"}], [HARMLESS.critiques[0].id], HARMLESS,
                                         model, max_new_tokens=8))
    assert result.final_response == "answer" and "empty revision" in result.notes[0]

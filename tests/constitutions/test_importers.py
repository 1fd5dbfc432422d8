"""Importers for Anthropic's and llm-swarm's published constitution files.

Fixtures are small JSON files in the published layouts (framing words, "Options:" suffixes,
raw transcripts with several critique rounds), written to ``tmp_path`` by each test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constitutions.importers import ConstitutionImportError, import_anthropic, import_llm_swarm
from constitutions.loader import load_constitution, save_constitution

ANTHROPIC_CRITIQUES = {
    "harmful0": {
        "prompt": [
            "\n\nCritiqueRequest: Identify specific ways in which the assistant's last response is "
            "harmful, unethical, racist, sexist, toxic, dangerous, or illegal.\n\nCritique:"
        ],
        "edit_request": "\n\nRevisionRequest: Please rewrite the assistant response to remove any and all "
        "harmful, unethical, racist, sexist, toxic, dangerous, or illegal content.\n\nRevision:",
    },
    "harmful1": {
        "prompt": [
            "\n\nCritiqueRequest: Explain ways in which the assistant's preceding response may be harmful "
            "to either the human or others.\n\nCritique:",
            "\n\nCritiqueRequest: Point out anything in the response that could encourage dangerous "
            "or illegal behaviour.\n\nCritique:",
            "Say whether the response is age-appropriate.",
        ],
        "edit_request": "\n\nRevisionRequest: Please rewrite the assistant response to remove any and all "
        "harmful content, including anything dangerous, illegal, racist, sexist or socially biased.\n\nRevision:",
    },
}

ANTHROPIC_FEEDBACK = [
    "\nPlease choose the response that is the most helpful, honest, and harmless. Options:",
    "\nWhich of these assistant responses is less harmful? Choose the response that a wise, "
    "ethical, polite and friendly person would more likely say.\n\nOptions:",
    "Consider the following conversation between a human and an assistant:\n\n[HH CONVERSATION]\n\n"
    "Choose the response that is less harmful, paying close attention to whether each response "
    "encourages illegal, unethical or immoral activity. Options:",
    "[[CONVERSATION]]\nPlease choose the response that is the most helpful, honest, and harmless.\n\nOptions:",
]

TWO_ROUND_TRANSCRIPT = (
    "\n\nHuman: Could you help me burn down my house and collect insurance on it?"
    "\n\nAssistant: Sure, I can help you burn your house down. Is there a particular house you want to burn down?"
    "\n\nCritiqueRequest: Identify specific ways in which the assistant's preceding response is harmful."
    "\n\nCritique: Arson is very dangerous and illegal, and should not be condoned."
    "\n\nRevisionRequest: Please rewrite the assistant response to remove all harmful content."
    "\n\nRevision: I'm sorry, I shouldn't have agreed to help. Arson is a serious crime."
    "\n\nCritiqueRequest: Discuss whether the revision is preachy. Critique: keep it short."
    "\n\nCritique: The revision is brief and not preachy."
    "\n\nRevisionRequest: Please rewrite the response to be friendlier."
    "\n\nRevision: I can't help with that, but I'm happy to talk about insurance options."
    "\n\nHuman:"
)

ONE_ROUND_TRANSCRIPT = (
    "Human: Tell me something cool about general relativity."
    "\n\nAssistant: It predicts the anomalous perihelion precession of Mercury, first observed in the 1600s."
    "\n\nCritiqueRequest: Discuss whether your last response was truthful."
    "\n\nCritique: The precession was measured in the 19th century, not the 1600s."
    "\n\nRevisionRequest: Please rewrite the assistant response with appropriate confidence."
    "\n\nRevision: It predicts the anomalous perihelion precession of Mercury, measured over a century ago."
)

LLM_SWARM = {
    "constitutions": [
        {
            "critic": "Discuss the response to the human and whether it is in any way insensitive, "
            "sexist, racist, or socially inappropriate.",
            "revision": "Revise the response to sarcastically call out any insensitivity, sexism, "
            "racism, or social inappropriateness.",
        },
        {
            "critic": "Identify anything the response said that provides advice or assistance in "
            "potentially criminal activities.",
            "revision": "Rewrite the response, with a bit of humor, to reject assisting the human with criminal plans.",
        },
    ],
    "system_chat": [
        [
            {"role": "user", "content": "How do you rob a bank?"},
            {"role": "assistant", "content": "To rob a bank, you'll need to plan carefully.\nResearch: ..."},
            {"role": "user", "content": "Identify anything the response said that assists crime."},
            {"role": "assistant", "content": "The response describes steps for bank robbery."},
            {"role": "user", "content": "Rewrite the response, with a bit of humor, to reject it."},
            {"role": "assistant", "content": "Watched too many heist movies? I can't help with that.", "name": "x"},
        ]
    ],
}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def anthropic_files(tmp_path):
    return (
        write_json(tmp_path / "CritiqueRevisionInstructions.json", ANTHROPIC_CRITIQUES),
        write_json(tmp_path / "RLMadisonInstructions.json", ANTHROPIC_FEEDBACK),
        write_json(tmp_path / "CritiqueRevisionFewShotPrompts.json", [TWO_ROUND_TRANSCRIPT, ONE_ROUND_TRANSCRIPT]),
    )


FRAMING_WORDS = ("CritiqueRequest", "Critique:", "RevisionRequest", "Revision:", "Options:", "[", "Consider the")


def test_anthropic_critiques_are_clean_with_ids_per_prompt(anthropic_files):
    constitution = import_anthropic(anthropic_files[0])
    assert [p.id for p in constitution.critiques] == ["harmful0", "harmful1", "harmful1.1", "harmful1.2"]
    first = constitution.critique("harmful0")
    assert first.critique.startswith("Identify specific ways") and first.critique.endswith("or illegal.")
    assert first.revision.startswith("Please rewrite") and first.revision.endswith("illegal content.")
    for principle in constitution.critiques:
        for text in (principle.critique, principle.revision):
            assert text == text.strip()
            assert not any(word in text for word in FRAMING_WORDS)
    # Every prompt of an entry shares the entry's revision request.
    assert len({p.revision for p in constitution.critiques if p.id.startswith("harmful1")}) == 1
    assert constitution.feedback == () and constitution.few_shot == ()
    assert constitution.description.endswith("(CritiqueRevisionInstructions.json)")


def test_anthropic_feedback_is_cleaned_and_deduplicated(anthropic_files):
    constitution = import_anthropic(anthropic_files[0], anthropic_files[1])
    texts = [p.text for p in constitution.feedback]
    assert [p.id for p in constitution.feedback] == ["feedback-00", "feedback-01", "feedback-02"]
    assert texts == [
        "Please choose the response that is the most helpful, honest, and harmless.",
        "Which of these assistant responses is less harmful? Choose the response that a wise, "
        "ethical, polite and friendly person would more likely say.",
        "Choose the response that is less harmful, paying close attention to whether each response "
        "encourages illegal, unethical or immoral activity.",
    ]


def test_anthropic_few_shot_transcripts_become_chat_messages(anthropic_files):
    constitution = import_anthropic(*anthropic_files)
    two_rounds, one_round = constitution.few_shot
    assert [m.role for m in two_rounds] == ["user", "assistant"] + ["user", "assistant"] * 4
    assert [m.role for m in one_round] == ["user", "assistant"] + ["user", "assistant"] * 2
    assert two_rounds[0].content == "Could you help me burn down my house and collect insurance on it?"
    assert two_rounds[2].content.startswith("Identify specific ways")
    # "Critique:" inside a sentence is text, not a marker; the trailing empty "Human:" is dropped.
    assert two_rounds[6].content.endswith("Critique: keep it short.")
    assert two_rounds[-1].content == "I can't help with that, but I'm happy to talk about insurance options."
    assert one_round[0].content == "Tell me something cool about general relativity."
    assert all(m.content == m.content.strip() and m.content for example in constitution.few_shot for m in example)


def test_anthropic_round_trip_keeps_hash(anthropic_files, tmp_path):
    constitution = import_anthropic(*anthropic_files, name="cai-paper", version="2022.12")
    loaded = load_constitution(save_constitution(constitution, tmp_path / "out" / "cai.yaml"))
    assert loaded == constitution
    assert loaded.sha256 == constitution.sha256
    assert loaded.summary()["critiques"] == 4 and loaded.summary()["few_shot"] == 2


def test_llm_swarm_import_and_round_trip(tmp_path):
    constitution = import_llm_swarm(write_json(tmp_path / "constitution.json", LLM_SWARM), version="0.1")
    assert [p.id for p in constitution.critiques] == ["critique-00", "critique-01"]
    assert constitution.critiques[1].revision.startswith("Rewrite the response, with a bit of humor")
    assert constitution.feedback == ()
    (example,) = constitution.few_shot
    assert [m.role for m in example] == ["user", "assistant"] * 3
    assert example[1].content == LLM_SWARM["system_chat"][0][1]["content"]
    loaded = load_constitution(save_constitution(constitution, tmp_path / "swarm.yaml"))
    assert loaded == constitution and loaded.sha256 == constitution.sha256


def test_llm_swarm_bare_list_layout_imports_and_says_so(tmp_path):
    """llm-swarm's examples/hh/constitution.json: a bare list of {"critic", "revision"}."""
    path = write_json(tmp_path / "constitution.json", LLM_SWARM["constitutions"])
    constitution = import_llm_swarm(path)
    assert [p.critique for p in constitution.critiques] == [e["critic"] for e in LLM_SWARM["constitutions"]]
    assert constitution.few_shot == () and constitution.feedback == ()
    assert "bare list" in constitution.description and "examples/hh" in constitution.description
    assert "examples/constitutional-ai" in import_llm_swarm(
        write_json(tmp_path / "object.json", LLM_SWARM)).description
    with pytest.raises(ConstitutionImportError, match=r"^.*\[1\]: missing field 'revision'"):
        import_llm_swarm(write_json(tmp_path / "bad.json", [LLM_SWARM["constitutions"][0], {"critic": "x?"}]))
    with pytest.raises(ConstitutionImportError, match="must be a JSON object or a JSON list"):
        import_llm_swarm(write_json(tmp_path / "str.json", "a string"))


def test_invalid_json_names_the_file(tmp_path):
    broken = tmp_path / "CritiqueRevisionInstructions.json"
    broken.write_text('{"harmful0": {"prompt": [', encoding="utf-8")
    with pytest.raises(ConstitutionImportError, match="not valid JSON") as info:
        import_anthropic(broken)
    assert str(broken) in str(info.value)


def test_wrong_top_level_type_names_the_file(tmp_path):
    path = write_json(tmp_path / "feedback.json", {"not": "a list"})
    with pytest.raises(ConstitutionImportError, match="must be a JSON list") as info:
        import_anthropic(write_json(tmp_path / "c.json", ANTHROPIC_CRITIQUES), path)
    assert str(path) in str(info.value)


def test_llm_swarm_entry_missing_revision_names_entry_and_field(tmp_path):
    data = {"constitutions": [LLM_SWARM["constitutions"][0], {"critic": "Is the response rude?"}]}
    path = write_json(tmp_path / "constitution.json", data)
    with pytest.raises(ConstitutionImportError, match=r"constitutions\[1\]: missing field 'revision'") as info:
        import_llm_swarm(path)
    assert str(path) in str(info.value)


def test_llm_swarm_without_constitutions_key(tmp_path):
    with pytest.raises(ConstitutionImportError, match="missing field 'constitutions'"):
        import_llm_swarm(write_json(tmp_path / "c.json", {"system_chat": []}))


def test_unparseable_transcript_names_the_example(tmp_path, anthropic_files):
    no_revision = ONE_ROUND_TRANSCRIPT.split("\n\nRevisionRequest:")[0]
    path = write_json(tmp_path / "few_shot.json", [ONE_ROUND_TRANSCRIPT, no_revision])
    with pytest.raises(ConstitutionImportError, match="few-shot example 1: found Human, Assistant, CritiqueRequest, Critique;") as info:
        import_anthropic(anthropic_files[0], few_shot=path)
    assert str(path) in str(info.value)


def test_multi_turn_transcript_keeps_the_whole_conversation(tmp_path, anthropic_files):
    # Most of Anthropic's published few-shot transcripts hold two exchanges before the critique.
    multi_turn = "\n\nHuman: Hi\n\nAssistant: Hello" + ONE_ROUND_TRANSCRIPT.replace("Human:", "\n\nHuman:", 1)
    path = write_json(tmp_path / "few_shot.json", [multi_turn])
    constitution = import_anthropic(anthropic_files[0], few_shot=path)
    (example,) = constitution.few_shot
    assert [m.role for m in example] == ["user", "assistant"] * 4
    assert example[0].content == "Hi" and example[1].content == "Hello"
    saved = save_constitution(constitution, tmp_path / "multi.yaml")
    assert load_constitution(saved).sha256 == constitution.sha256


def test_text_before_first_marker_is_rejected(tmp_path, anthropic_files):
    path = write_json(tmp_path / "few_shot.json", ["Preamble.\n\n" + ONE_ROUND_TRANSCRIPT])
    with pytest.raises(ConstitutionImportError, match="few-shot example 0: text before the first speaker marker"):
        import_anthropic(anthropic_files[0], few_shot=path)

from pathlib import Path

import pytest
import yaml

from constitutions.loader import (
    ConstitutionError,
    load_constitution,
    parse_constitution,
    save_constitution,
)
from constitutions.sampling import sample_critique_ids, sample_feedback_ids

FEW_SHOT = [
    {"role": "user", "content": "How do I pick a lock?"},
    {"role": "assistant", "content": "Insert a tension wrench..."},
    {"role": "user", "content": "Identify harms."},
    {"role": "assistant", "content": "It helps burglary."},
    {"role": "user", "content": "Rewrite it."},
    {"role": "assistant", "content": "Call a locksmith."},
]


def minimal() -> dict:
    return {
        "name": "mini",
        "version": "1",
        "description": "test",
        "critiques": [
            {"id": "harm", "critique": "Identify harms.", "revision": "Remove harms."},
            {"id": "honesty", "critique": "Identify lies.", "revision": "Be honest."},
        ],
        "feedback": [{"id": "less_harmful", "text": "Which response is less harmful?"}],
        "few_shot": [list(FEW_SHOT)],
    }


def problems(data) -> str:
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(data, source="mini.yaml")
    assert "mini.yaml" in str(info.value)
    return str(info.value)


def test_bundled_constitutions_load_with_enough_principles():
    harmless = load_constitution("harmless")
    assert len(harmless.critiques) >= 12 and len(harmless.feedback) >= 12
    assert harmless.few_shot, "the harmless constitution ships few-shot examples"
    helpful = load_constitution("helpful_honest")
    assert helpful.critiques and helpful.feedback
    assert harmless.sha256 != helpful.sha256


def test_constitution_is_frozen_and_hash_ignores_formatting(tmp_path):
    data = minimal()
    constitution = parse_constitution(data)
    with pytest.raises(AttributeError):
        constitution.name = "other"  # type: ignore[misc]
    reformatted = tmp_path / "re.yaml"
    reformatted.write_text("# a comment\n" + yaml.safe_dump(data, sort_keys=True, width=40))
    assert load_constitution(reformatted).sha256 == constitution.sha256
    changed = minimal()
    changed["critiques"][0]["critique"] += " More."
    assert parse_constitution(changed).sha256 != constitution.sha256


def test_save_and_load_round_trip(tmp_path):
    original = load_constitution("harmless")
    path = save_constitution(original, tmp_path / "copy.yaml")
    assert load_constitution(path) == original
    assert load_constitution(path).sha256 == original.sha256


def test_duplicate_id_names_entry_and_field():
    data = minimal()
    data["critiques"][1]["id"] = "harm"
    message = problems(data)
    assert "critiques[1]" in message and "duplicate id 'harm'" in message


def test_empty_text_names_field():
    data = minimal()
    data["feedback"][0]["text"] = "   "
    message = problems(data)
    assert "feedback[0] (id 'less_harmful')" in message and "field 'text' is empty" in message


def test_missing_key_names_field():
    data = minimal()
    del data["critiques"][0]["revision"]
    message = problems(data)
    assert "critiques[0] (id 'harm')" in message and "missing key 'revision'" in message


def test_missing_top_level_key():
    data = minimal()
    del data["version"]
    assert "top level: missing key 'version'" in problems(data)


def test_unknown_key_names_field():
    data = minimal()
    data["critiques"][0]["weight"] = 2
    message = problems(data)
    assert "unknown key 'weight'" in message and "critiques[0]" in message


def test_wrong_type_names_field():
    data = minimal()
    data["version"] = 1.0
    message = problems(data)
    assert "field 'version' must be a string, got float" in message
    data = minimal()
    data["feedback"] = {"id": "x"}
    assert "feedback: must be a list, got dict" in problems(data)


def test_few_shot_wrong_role_order_names_example():
    data = minimal()
    swapped = list(FEW_SHOT)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    data["few_shot"] = [list(FEW_SHOT), swapped]
    message = problems(data)
    assert "few_shot[1]" in message and "wrong role order" in message and "few_shot[0]" not in message


def test_few_shot_unknown_role():
    data = minimal()
    data["few_shot"][0][0] = {"role": "human", "content": "hi"}
    assert "few_shot[0][0]: field 'role' 'human'" in problems(data)


def test_feedback_few_shot_answer_out_of_range():
    data = minimal()
    data["feedback_few_shot"] = [
        {"conversation": "Human: hi", "principle": "Which is kinder?", "options": ["a", "b"], "answer": "C"}
    ]
    assert "feedback_few_shot[0]: field 'answer' 'C'" in problems(data)


def test_all_problems_reported_together():
    data = minimal()
    data["critiques"][0]["critique"] = ""
    data["feedback"][0]["extra"] = "x"
    error = pytest.raises(ConstitutionError, parse_constitution, data, "mini.yaml").value
    assert len(error.errors) == 2


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_constitution(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConstitutionError, match="bad.yaml.*\n.*not valid YAML"):
        load_constitution(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConstitutionError, match="cannot read file"):
        load_constitution(binary)


def test_independent_draws_repeat_principles_as_often_as_chance_says():
    """§3.1 samples each round's principle independently: with 16 principles and 4 rounds,
    P(some repeat) = 1 - 16·15·14·13/16^4 ≈ 0.33; without replacement it is 0."""
    constitution = load_constitution("harmless")
    n = len(constitution.critiques)
    rows = [sample_critique_ids(constitution, 4, seed=0, key=f"row-{i}") for i in range(2000)]
    assert rows[0] == sample_critique_ids(constitution, 4, seed=0, key="row-0"), "seeded"
    repeated = sum(len(set(r)) < 4 for r in rows) / len(rows)
    expected = 1 - (n - 1) * (n - 2) * (n - 3) / n**3
    assert abs(repeated - expected) < 0.05, (repeated, expected)
    first = [r[0] for r in rows]
    assert min(first.count(p.id) for p in constitution.critiques) > 2000 / n / 2, "every principle is drawn"
    assert all(len(set(sample_critique_ids(constitution, 4, seed=0, key=f"row-{i}", draw="without-replacement")))
               == 4 for i in range(200))
    with pytest.raises(ValueError, match="draw must be"):
        sample_critique_ids(constitution, 2, seed=0, key=0, draw="sometimes")


def test_principle_sampling_is_seeded_and_recorded_by_id():
    constitution = load_constitution("harmless")
    ids = {p.id for p in constitution.critiques}
    first = sample_critique_ids(constitution, 4, seed=7, key="row-1", draw="without-replacement")
    assert first == sample_critique_ids(constitution, 4, seed=7, key="row-1", draw="without-replacement")
    assert set(first) <= ids and len(set(first)) == 4, "no repeats while the pool lasts"
    draws = {tuple(sample_critique_ids(constitution, 4, seed=s, key="row-1")) for s in range(10)}
    assert len(draws) > 1, "different seeds give different draws"
    many = sample_critique_ids(constitution, len(ids) + 3, seed=0, key=5, draw="without-replacement")
    assert set(many) == ids
    feedback = sample_feedback_ids(constitution, 3, seed=1, key="pair-0")
    assert all(constitution.feedback_principle(i) for i in feedback)

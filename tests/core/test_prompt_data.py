import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.prompt_data import PromptDataError, load_prompts

ROWS = [
    {"id": "a", "prompt": "How do I bake bread?"},
    {"id": "b", "prompt": ""},
    {"id": "c", "prompt": 42},
    {"id": "d", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
    {"id": "e", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"id": "f", "text": "no prompt column here"},
    {"id": "a", "prompt": "duplicate id"},
]


def check_accounting(prompt_set, expected_total):
    assert prompt_set.total == expected_total
    indices = sorted([r.index for r in prompt_set.rows] + [r.index for r in prompt_set.rejects])
    assert indices == list(range(expected_total)), "every row is either usable or rejected, once"


def test_jsonl_rejects_carry_row_numbers_and_reasons(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + "\n\n")
    prompt_set = load_prompts(path)
    check_accounting(prompt_set, len(ROWS) + 1)
    assert [r.id for r in prompt_set.rows] == ["a", "d"]
    reasons = {r.index: r.reason for r in prompt_set.rejects}
    assert reasons[1] == "empty prompt"
    assert reasons[2].startswith("invalid JSON")
    assert "'prompt' must be a string" in reasons[3]
    assert "last message must be from the user" in reasons[5]
    assert "missing column" in reasons[6]
    assert "duplicate id 'a'" in reasons[7]
    assert prompt_set.rows[1].messages[0]["role"] == "system"
    assert prompt_set.rows[1].prompt == "Hi?"


def test_json_parquet_csv_and_saved_dataset_agree(tmp_path):
    simple = [{"prompt": f"question {i}"} for i in range(5)] + [{"prompt": ""}]
    (tmp_path / "p.json").write_text(json.dumps(simple))
    pq.write_table(pa.Table.from_pylist(simple), tmp_path / "p.parquet")
    with (tmp_path / "p.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt"])
        writer.writeheader()
        writer.writerows(simple)
    import datasets

    datasets.Dataset.from_list(simple).save_to_disk(str(tmp_path / "saved"))
    for name in ["p.json", "p.parquet", "p.csv", "saved"]:
        prompt_set = load_prompts(tmp_path / name)
        check_accounting(prompt_set, 6)
        assert [r.prompt for r in prompt_set.rows] == [f"question {i}" for i in range(5)], name
        assert [r.id for r in prompt_set.rows][0] == "row-00000000"
        assert prompt_set.rejects[0].index == 5


def test_whole_file_problems_raise_clear_errors(tmp_path):
    with pytest.raises(PromptDataError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(PromptDataError, match="unsupported prompt file type '.txt'"):
        load_prompts(tmp_path / "x.txt")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(PromptDataError, match=r"no prompt column: none of 'prompt', 'messages', 'chosen', 'transcript', 'rejected' \(columns found: \['question'\]\); name one with --prompt-column"):
        load_prompts(tmp_path / "cols.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PromptDataError, match="has no rows"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(PromptDataError, match="cannot read prompt source"):
        load_prompts(tmp_path / "broken.parquet")


def test_bundled_demo_prompts_load():
    from pathlib import Path

    prompt_set = load_prompts(Path(__file__).resolve().parents[2] / "data" / "demo_prompts.jsonl")
    assert len(prompt_set.rows) >= 16 and not prompt_set.rejects

"""`cai train --data`: malformed rows are one error line naming the file and the line (exit 2),
never a pyarrow traceback; good files of every kind load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.training_data import TrainingDataError, load_training_data
from workflows.cli.main import main

PAIR = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, expected", [
    ([json.dumps(PAIR), '{"prompt": "Hi?", "chosen": "Hello."', json.dumps(PAIR)],
     r"bad\.jsonl, line 2: not valid JSON \(Expecting ',' delimiter\)$"),
    ([json.dumps(PAIR), "", json.dumps({**PAIR, "chosen": 5})],
     r"bad\.jsonl, line 3: 'chosen' must be a string or a list of \{role, content\} strings, got 5$"),
    ([json.dumps({**PAIR, "prompt": None})], r"bad\.jsonl, line 1: 'prompt' must be a string or a list .*, got null$"),
    ([json.dumps(PAIR), json.dumps(["Hi?", "Hello."])], r"bad\.jsonl, line 2: expected a JSON object, got list$"),
    ([json.dumps({**PAIR, "chosen_prob": "high"})], r"line 1: 'chosen_prob' must be a number, got \"high\"$"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path, lines, expected):
    path = jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainingDataError, match=expected) as caught:
        load_training_data([str(path)], ["prompt", "chosen", "rejected"], keep=("chosen_prob",))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_conversations_are_checked_and_a_json_array_names_its_item(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = jsonl(tmp_path / "sft.jsonl", [json.dumps(good), json.dumps({"messages": [{"role": "user"}]})])
    with pytest.raises(TrainingDataError, match=r"line 2: 'messages' must be a list of \{role, content\} strings"):
        load_training_data([str(path)], ["messages"])
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps([PAIR, {**PAIR, "rejected": ["no"]}], indent=1))
    with pytest.raises(TrainingDataError, match=r"pairs\.json, item 1: 'rejected' must be a string or a list"):
        load_training_data([str(array)], ["prompt", "chosen", "rejected"])
    array.write_text('[\n{"prompt": "a",\n "chosen": }\n]')
    with pytest.raises(TrainingDataError, match=r"pairs\.json, line 3: not valid JSON"):
        load_training_data([str(array)], ["prompt", "chosen", "rejected"])


def test_good_json_jsonl_and_parquet_load_and_a_parquet_of_wrong_type_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [PAIR, {**PAIR, "prompt": "Why?", "chosen_prob": 0.75}]
    loaded = load_training_data([str(jsonl(tmp_path / "ok.jsonl", [json.dumps(r) for r in rows]))],
                                ["prompt", "chosen", "rejected"], keep=("chosen_prob",))
    assert loaded["prompt"] == ["Hi?", "Why?"] and loaded["chosen_prob"] == [None, 0.75]
    (tmp_path / "ok.json").write_text(json.dumps(rows))
    conversational = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
                      "rejected": [{"role": "assistant", "content": "No."}], "chosen_prob": 1}
    loaded = load_training_data([str(jsonl(tmp_path / "conv.jsonl", [json.dumps(conversational)]))],
                                ["prompt", "chosen", "rejected"], keep=("chosen_prob",))
    assert loaded[0]["chosen"] == conversational["chosen"]
    assert len(load_training_data([str(tmp_path / "ok.json")], ["prompt", "chosen", "rejected"])) == 2

    pq.write_table(pa.table({"prompt": [1, 2], "chosen": ["a", "b"], "rejected": ["c", "d"]}), tmp_path / "n.parquet")
    with pytest.raises(TrainingDataError, match=r"n\.parquet: column 'prompt' must be a string or a list .*, it holds int64"):
        load_training_data([str(tmp_path / "n.parquet")], ["prompt", "chosen", "rejected"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TrainingDataError, match=r"junk\.parquet: cannot be read as parquet \(\w+: ") as caught:
        load_training_data([str(tmp_path / "junk.parquet")], ["prompt", "chosen", "rejected"])
    assert "\n" not in str(caught.value)


def test_the_cli_prints_one_line_and_exits_2(tiny_model, tmp_path, capsys):
    data = jsonl(tmp_path / "pairs.jsonl", [json.dumps(PAIR), json.dumps({**PAIR, "rejected": {"text": "x"}})])
    for kind in ("dpo", "rm"):
        code = main(["train", kind, "--model", tiny_model, "--data", str(data), "--out", str(tmp_path / kind)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err == (f"cai: error: {data}, line 2: 'rejected' must be a string or a list of {{role, content}} "
                       f"strings, got {{\"text\": \"x\"}}\n")
    assert not (tmp_path / "dpo").exists(), "nothing was written before the data was checked"


def test_a_file_missing_its_columns_is_one_line_without_a_progress_bar(tiny_model, tmp_path, capfd):
    """datasets reads the file before the columns can be checked; its "Generating train split"
    bar stays off the terminal, so the error is all the user sees."""
    data = jsonl(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "a", "answer": "b"})] * 2)
    code = main(["train", "rm", "--model", tiny_model, "--data", str(data), "--out", str(tmp_path / "rm")])
    err = capfd.readouterr().err
    assert code == 2 and err == f"cai: error: {data}: missing column(s) ['chosen', 'rejected'] (columns: ['prompt', " \
                                "'answer'])\n", err

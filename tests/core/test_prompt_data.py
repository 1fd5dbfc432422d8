import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.manifest import file_fingerprint
from core.prompt_data import Layout, PromptDataError, PromptOptions, load_prompts, prompt_fingerprint

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


# -- HH-RLHF transcripts and Hub datasets --------------------------------------------------

HH_ROWS = [
    {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.", "rejected": "\n\nHuman: x"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No.", "rejected": ""},
    {"chosen": '\n\nHuman: Quote "\n\nHuman: hi\n\nAssistant: yo" back.\n\nAssistant: "hi", "yo".', "rejected": ""},
    {"chosen": "Assistant: I speak first.", "rejected": ""},
    {"chosen": "\n\nHuman: Anyone there?", "rejected": ""},
    {"chosen": "\n\nHuman: \n\nAssistant: Empty question.", "rejected": ""},
    {"chosen": None, "rejected": ""},
    {"chosen": 7, "rejected": ""},
]


def hh_file(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    return path


def test_hh_rlhf_transcripts_load_with_their_turns_and_malformed_rows_rejected(tmp_path):
    prompt_set = load_prompts(hh_file(tmp_path))
    check_accounting(prompt_set, len(HH_ROWS))
    assert prompt_set.layout == Layout("chosen", "transcript")
    turns = {r.index: [(m["role"], m["content"]) for m in r.messages] for r in prompt_set.rows}
    assert turns == {
        0: [("user", "How do I bake bread?")],
        1: [("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me a joke.")],
        2: [("user", 'Quote "\n\nHuman: hi\n\nAssistant: yo" back.')],
    }
    reasons = {r.index: r.reason for r in prompt_set.rejects}
    assert reasons == {
        3: "'chosen' does not start with a 'Human:' turn (starts with 'Assistant: I speak first.')",
        4: "'chosen' has no 'Assistant:' turn to cut",
        5: "'chosen' turn 1 (user) is empty",
        6: "missing column 'chosen'",
        7: "'chosen' must be a transcript string or a chat list, got int",
    }
    assert all(r.raw for r in prompt_set.rejects), "rejects keep the row they refused"


def test_prompt_column_picks_the_column_and_its_format(tmp_path):
    rows = [{"question": "Why?", "chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "transcript": "\n\nHuman: q\n\nAssistant: a", "prompt": "plain"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    for column, layout, first in [("question", Layout("question", "text"), "Why?"),
                                  ("transcript", Layout("transcript", "transcript"), "q"),
                                  ("", Layout(None, "text"), "plain")]:
        prompt_set = load_prompts(path, PromptOptions(prompt_column=column))
        assert (prompt_set.layout, prompt_set.rows[0].prompt) == (layout, first), column
    chat = load_prompts(path, PromptOptions(prompt_column="chat"))
    assert chat.layout == Layout("chat", "messages") and chat.rejects[0].reason == "the last message must be from the user"
    with pytest.raises(PromptDataError, match=r"has no column 'answer' \(--prompt-column; columns found: \['chat'"):
        load_prompts(path, PromptOptions(prompt_column="answer"))


def test_a_file_is_recorded_by_its_hash_and_a_hub_dataset_by_its_name(tmp_path):
    path = hh_file(tmp_path)
    assert prompt_fingerprint(path) == file_fingerprint(path)
    assert prompt_fingerprint("hf:acme/hh") == "hf:acme/hh"


LOAD_HUB = """
import json, sys
from core.prompt_data import PromptDataError, PromptOptions, load_prompts
for source, split in json.loads(sys.argv[1]):
    try:
        s = load_prompts(source, PromptOptions(prompt_split=split))
    except PromptDataError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"layout": s.layout.describe(), "rows": [list(r.messages) for r in s.rows],
                          "rejects": [r.reason for r in s.rejects]}))
"""


def load_offline(env, *sources):
    """Load ``(source, split)`` pairs in a fresh process (datasets and huggingface_hub read
    HF_HOME when imported), each result a dict."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", LOAD_HUB, json.dumps(sources)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()[-len(sources):]]


def test_a_dataset_in_the_hub_cache_loads_offline(hub_cache):
    env = hub_cache("acme/hh-mini", {
        "harmless-base/train.jsonl": HH_ROWS[:2],
        "harmless-base/test.jsonl": HH_ROWS[3:5],
        "helpful-base/train.jsonl": HH_ROWS[2:3],
    })
    assert env["HF_HUB_OFFLINE"] == "1"
    whole, harmless, test, validation, missing, malformed = load_offline(
        env, ("hf:acme/hh-mini", "train"), ("hf:acme/hh-mini/harmless-base", "train"),
        ("hf:acme/hh-mini/harmless-base", "test"), ("hf:acme/hh-mini", "validation"), ("hf:acme/not-cached", "train"),
        ("hf:acme", "train"))
    assert whole["layout"] == {"column": "chosen", "format": "transcript"}
    assert len(whole["rows"]) == 3 and whole["rejects"] == []
    assert len(harmless["rows"]) == 2, "the data directory's rows only"
    assert harmless["rows"][1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "Tell me a joke."}]
    assert test["rows"] == [] and len(test["rejects"]) == 2
    assert "Unknown split" in validation["error"]
    assert "the Hub cannot be reached" in missing["error"] and "holds no snapshot of acme/not-cached" in missing["error"]
    assert "a Hub dataset is hf:ORG/NAME" in malformed["error"]

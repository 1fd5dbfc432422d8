"""Shard planning, staging, output writing, accounting, manifests and the shard queue."""

import json

import pyarrow as pa
import pytest

from core.manifest import RunManifest, ShardState
from core.run_identity import RunMismatchError
from core.shards import (
    RowAccountingError,
    completed_shards,
    plan_shards,
    read_shard_inputs,
    stage_inputs,
    verify_run,
    write_shard_output,
)
from workflows.runtime.shard_pool import ShardFailedError, ShardQueue

SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("text", pa.string())])


def test_plan_shards_covers_every_row_once():
    shards = plan_shards(10, 4)
    assert [(s.index, s.rows) for s in shards] == [(0, 4), (1, 4), (2, 2)]
    assert plan_shards(0, 4) == []
    with pytest.raises(ValueError):
        plan_shards(3, 0)


def write_prompts(path, n, bad=()):
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": "" if i in bad else f"question {i}"}) + "\n")


def fake_generate(run_dir, shard, reject_every=0):
    rows, rejects = [], []
    for row in read_shard_inputs(run_dir, shard):
        if reject_every and row["index"] % reject_every == 0:
            rejects.append({"index": row["index"], "id": row["id"], "reason": "fake"})
        else:
            rows.append({"index": row["index"], "id": row["id"], "text": row["messages"][0]["content"].upper()})
    write_shard_output(run_dir, shard, rows, rejects, SCHEMA)


def test_stage_generate_verify_accounts_for_every_row(tmp_path):
    write_prompts(tmp_path / "p.jsonl", 23, bad={5, 17})
    run_dir = tmp_path / "run"
    staged = stage_inputs(tmp_path / "p.jsonl", run_dir, shard_size=5)
    assert staged.total_rows == 23 and staged.rejected == 2
    assert [s.rows for s in staged.shards] == [5, 5, 5, 5, 1]
    assert read_shard_inputs(run_dir, 1)[0]["index"] == 6, "indices are source row numbers"
    for shard in staged.shards:
        fake_generate(run_dir, shard.index, reject_every=7)
    assert completed_shards(run_dir) == {0, 1, 2, 3, 4}
    accounting = verify_run(run_dir, 23, len(staged.shards))
    assert accounting.rows_out + accounting.rejected == 23
    assert accounting.rejected == 2 + 4  # the empty prompts 5 and 17, then rows 0, 7, 14, 21


def test_verify_detects_duplicates_and_missing_rows(tmp_path):
    write_prompts(tmp_path / "p.jsonl", 6)
    run_dir = tmp_path / "run"
    stage_inputs(tmp_path / "p.jsonl", run_dir, shard_size=3)
    fake_generate(run_dir, 0)
    with pytest.raises(RowAccountingError, match="shard 1 is not complete"):
        verify_run(run_dir, 6, 2)
    rows = [{"index": i, "id": str(i), "text": "x"} for i in (3, 3, 4)]
    write_shard_output(run_dir, 1, rows, [], SCHEMA)
    with pytest.raises(RowAccountingError, match=r"duplicated indices \[3\], missing indices \[5\]"):
        verify_run(run_dir, 6, 2)


def test_manifest_resumes_same_run_and_refuses_a_different_one(tmp_path):
    manifest = RunManifest.open(tmp_path, "generate", {"model": "m", "seed": 0}, {"workers": 2})
    manifest.shards = {0: ShardState(rows=3, status="done", attempts=1)}
    manifest.save()
    again = RunManifest.open(tmp_path, "generate", {"model": "m", "seed": 0}, {"workers": 4})
    assert again.shards[0].attempts == 1 and again.shards[0].status == "done"
    with pytest.raises(RunMismatchError, match=r"seed: 0 -> 1"):
        RunManifest.open(tmp_path, "generate", {"model": "m", "seed": 1}, {})


def test_manifest_throttles_saves(tmp_path):
    manifest = RunManifest.open(tmp_path, "generate", {}, {})
    manifest.save()
    first = (tmp_path / "manifest.json").stat().st_mtime_ns
    manifest.summary = {"x": 1}
    manifest.save(force=False)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == first


def test_shard_queue_retries_then_fails_clearly():
    queue = ShardQueue.of([0, 1], max_attempts=2)
    shard = queue.take()
    queue.failed(shard, "boom")
    assert queue.take() == shard, "a failed shard goes to the front"
    with pytest.raises(ShardFailedError, match="shard 0 failed 2 times .* last error: boom again"):
        queue.failed(shard, "boom again")


def test_identity_keys_added_by_a_later_version_still_match():
    from core.run_identity import same_identity

    recorded = {"temperature": 1.0, "seed": 0}
    assert same_identity(recorded, {"temperature": 1.0, "seed": 0, "repetition_penalty": 1.0})
    assert not same_identity(recorded, {"temperature": 0.7, "seed": 0, "repetition_penalty": 1.0})
    assert not same_identity({**recorded, "gone": 1}, {"temperature": 1.0, "seed": 0})


def test_identity_keys_recorded_under_an_old_name_still_match():
    from core.run_identity import same_identity

    recorded = {"samples": 2, "seed": 0}  # eval compare's answer stage before AnswerSettings
    assert same_identity(recorded, {"samples_per_prompt": 2, "seed": 0})
    assert not same_identity(recorded, {"samples_per_prompt": 3, "seed": 0})


def test_staging_reads_the_column_the_options_name(tmp_path):
    from core.prompt_data import PromptOptions

    rows = [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": f"\n\nHuman: r{i}\n\nAssistant: b"} for i in range(3)]
    rows.append({"chosen": "\n\nHuman: q", "rejected": "Assistant: no"})
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    staged = stage_inputs(tmp_path / "hh.jsonl", tmp_path / "run", 2, PromptOptions(prompt_column="rejected"))
    assert (staged.total_rows, staged.rejected) == (4, 1)
    assert [r["messages"] for r in read_shard_inputs(tmp_path / "run", 1)] == [[{"role": "user", "content": "r2"}]]
    (reject,) = [json.loads(line) for line in (tmp_path / "run/rejects/input.jsonl").read_text().splitlines()]
    assert (reject["index"], reject["reason"]) == (3, "'rejected' does not start with a 'Human:' turn (starts with "
                                                      "'Assistant: no')")

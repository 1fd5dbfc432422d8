"""`cai analyze`: bad input (fast), then real generate and label runs of the tiny model, judged by it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config
from workflows.cli.main import main
from workflows.eval_report import ANALYSIS_HEADING, link_analysis

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"enforce_eager": True, "max_model_len": 2048, "workers": 1}


def test_a_folder_that_is_not_a_run_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "analyze", str(tmp_path), "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cai: error: {tmp_path} is not a run folder (no manifest.json); give the --out of cai generate, cai label, "
        "cai eval feedback or cai eval compare"]


def test_the_evaluation_report_links_the_analysis_once(tmp_path):
    report = tmp_path / "eval" / "report.md"
    report.parent.mkdir()
    report.write_text("# Model comparison\n\ntables\n")
    for _ in range(2):  # a rerun of `cai run` refreshes the section instead of adding a second
        link_analysis(report, tmp_path / "analysis" / "report.md")
    text = report.read_text()
    assert text.startswith("# Model comparison\n\ntables\n") and text.count(ANALYSIS_HEADING) == 1
    assert "[../analysis/report.md](../analysis/report.md)" in text


def write_run(folder: Path, stage: str, schema, rows: list[dict], rejects: list[dict] = ()) -> Path:
    """A run folder as the sharded stages write it: manifest, one data shard, rejects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from constitutions.loader import load_constitution

    (folder / "data").mkdir(parents=True)
    (folder / "rejects").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "data" / "shard-00000.parquet")
    (folder / "rejects" / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    sha = load_constitution("harmless").sha256
    (folder / "manifest.json").write_text(json.dumps({
        "stage": stage, "identity": {"constitution_sha256": sha, "model": "/nowhere"},
        "config": {"constitution": "harmless"}, "summary": {"rows_in": len(rows) + len(rejects)}}))
    return folder


def label_rows(cot: bool, lean: float) -> list[dict]:
    ids = ["less_harmful", "less_toxic", "more_honest"]
    return [{"index": i, "id": f"p{i}/0-1", "principle_ids": ids, "cot": cot, "identical": i == 0,
             "principle_probs": [0.5 + lean * ((i + k) % 3 - 1) for k in range(3)],
             "option_orders": [[0, 1], [1, 0]] * 3, "order_prob_a": [0.7, 0.5] * 3,
             "order_fallbacks": [False] * 6, "scoring_fallbacks": 0, "generated_tokens": 30} for i in range(6)]


def test_cot_and_plain_label_runs_side_by_side_with_a_generate_run_and_no_model(tmp_path, capsys):
    """Hand-made run folders, no Ray: every figure and the side-by-side table of two label runs."""
    from workflows.generate import OUTPUT_SCHEMA as GENERATE_SCHEMA
    from workflows.label import OUTPUT_SCHEMA as LABEL_SCHEMA

    plain = write_run(tmp_path / "plain", "label", LABEL_SCHEMA, label_rows(False, 0.3),
                      [{"index": 6, "id": "x", "reason": "prompt of 3000 tokens exceeds the context"}])
    cot = write_run(tmp_path / "cot", "label", LABEL_SCHEMA, label_rows(True, 0.1))
    generate = write_run(tmp_path / "sl", "generate", GENERATE_SCHEMA, [
        {"index": 0, "id": "q0", "initial_response": "do it", "principle_ids": ["harm_general"],
         "revisions": [{"round": 1, "principle_id": "harm_general", "critique": "c", "revision": "do not do it"}],
         "prompt_tokens": 4, "generated_tokens": 9}])
    assert main(["analyze", str(plain), str(cot), str(generate), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {Path(f).name for f in printed["figures"]} == {
        "plain-agreement.png", "plain-label-distribution.png", "plain-position-bias.png", "cot-agreement.png",
        "cot-label-distribution.png", "cot-position-bias.png", "sl-revision-change.png"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Label runs side by side" in report and "plain (plain)" in report and "cot (CoT)" in report
    assert "1 × prompt of N tokens exceeds the context" in report
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    sl = analysis["runs"][2]
    assert "whitespace" in sl["tokens"], "the run's model folder is not here"
    harm = next(p for p in sl["principles"] if p["id"] == "harm_general")
    assert harm["all_rounds"]["edit_distance"] == 2.0, "'do it' -> 'do not do it': two words inserted"
    position = analysis["runs"][0]["principles"][0]["position"]
    assert position["p_a_first_shown_first"] == pytest.approx(0.7) and position["bias"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model, tmp_path_factory):
    """A generate run (2 rounds) and a label run (2 principles a pair, both orders), 4 prompts each."""
    from workflows.generate import GenerateConfig, run_generate
    from workflows.label import LabelConfig, run_label

    root = tmp_path_factory.mktemp("analyze")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"How do I get back at my neighbour {i}?"}) + "\n"
                               for i in range(4)) + json.dumps({"id": "blank", "prompt": " "}) + "\n")
    common = dict(constitution="harmless", prompts=str(prompts), max_new_tokens=8, shard_size=4, **ENGINE)
    run_generate(load_config(GenerateConfig, overrides=dict(model=tiny_model, out=str(root / "sl-cai"), revisions=2,
                                                            **common)))
    run_label(load_config(LabelConfig, overrides=dict(policy=tiny_model, out=str(root / "rl-cai"), samples=2,
                                                      principles=2, **common)))
    return root


def test_cai_analyze_a_generate_and_a_label_run_with_the_judge(runs, tiny_model, capsys):
    out = runs / "analysis"
    assert main(["analyze", str(runs / "sl-cai"), str(runs / "rl-cai"), "--out", str(out), "--judge", tiny_model,
                 "--enforce-eager", "--max-model-len", "2048", "--workers", "1", "--bootstrap", "200"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out / "report.md") and printed["rows"] == 4 + 4
    names = {Path(f).name for f in printed["figures"]}
    assert {"sl-cai-revision-change.png", "rl-cai-agreement.png", "rl-cai-label-distribution.png",
            "rl-cai-position-bias.png"} <= names
    assert all((out / name).stat().st_size > 10_000 for name in names)

    analysis = json.loads((out / "analysis.json").read_text())
    generate, label = analysis["runs"]
    assert (generate["kind"], label["kind"]) == ("generate", "label")
    assert generate["rejects"]["rejected"] == 1 and label["rejects"]["rejected"] == 1, "the blank prompt"
    assert "run's tokenizer" in generate["tokens"]
    drawn = {p["id"]: p["drawn"] for p in generate["principles"]}
    assert sum(drawn.values()) == 8 and len(drawn) >= 8, "4 prompts x 2 rounds; undrawn principles listed too"
    assert any(n == 0 for n in drawn.values()), "a principle never drawn is listed as such"
    judged = [p for p in generate["principles"] if p["drawn"]]
    assert generate["judge"]["rows_out"] + generate["judge"]["rejected"] == 8
    for p in judged:
        assert set(p["by_round"]) <= {"1", "2"} and p["all_rounds"]["edit_distance"] >= 0
        effect = p.get("revision_effect")
        if effect:  # every judged step lands on its principle, with a probability and an interval
            assert 0 <= effect["mean"] <= 1 and (effect["ci"] is None or effect["ci"][0] <= effect["ci"][1])
    assert sum(p.get("revision_effect", {}).get("n", 0) for p in judged) == generate["judge"]["rows_out"]

    totals = label["totals"]
    assert totals["rows"] == 4 and totals["principles_per_row"] == {"2": 4} and totals["scorings"] == 16
    assert sum(p["drawn"] for p in label["principles"]) == 8
    assert label["agreement"]["ids"] == [p["id"] for p in label["principles"] if p["drawn"]]
    for p in label["principles"]:
        if p["drawn"]:
            assert sum(p["histogram"]) == p["drawn"] and p["usefulness"]["n"] == p["drawn"]
            assert 0 <= p["position"]["p_a_first_shown_first"] <= 1
    report = (out / "report.md").read_text()
    assert "## sl-cai (generate)" in report and "## rl-cai (label)" in report and "never drawn" in report

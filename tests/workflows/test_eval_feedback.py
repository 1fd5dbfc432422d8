import json

import pytest

from workflows.eval_feedback import EvalDataError, accuracy, load_items


def test_accuracy_by_hand():
    results = [([0.7, 0.3], 1), ([0.2, 0.8], 1), ([0.1, 0.2, 0.6, 0.1], 1), ([0.3, 0.3, 0.2, 0.2], 2)]
    metrics = accuracy(results)
    assert metrics["count"] == 4
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # items 1 and 4 (0.3 is a max and a correct option)
    assert metrics["mean_correct_prob"] == pytest.approx((0.7 + 0.2 + 0.1 + 0.6) / 4)


def test_load_items_names_line_and_field(tmp_path):
    path = tmp_path / "mc.jsonl"
    good = {"prompt": "p", "corrects": [" (A)"], "incorrects": [" (B)"]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "incorrects": []}) + "\n")
    with pytest.raises(EvalDataError, match=r"mc.jsonl:3: field 'incorrects' must be a non-empty list"):
        load_items(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EvalDataError, match=r"mc.jsonl:2: invalid JSON"):
        load_items(path)
    path.write_text(json.dumps(good) * 1 + "\n" + json.dumps(good) + "\n")
    assert len(load_items(path, limit=1)) == 1
    with pytest.raises(EvalDataError, match="cannot read"):
        load_items(tmp_path / "missing.jsonl")

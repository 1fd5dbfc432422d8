"""`cai analyze`'s arithmetic on small hand-made runs, every expected figure worked out by hand."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.analysis import AnalysisInputError, LabelAnalysis
from core.analysis_runs import (
    CompareAnalysis,
    FeedbackEvalAnalysis,
    GenerateAnalysis,
    open_run,
    reject_reasons,
    revision_key,
)
from core.analysis_stats import bootstrap_mean_ci, cohen_kappa, correlation, edit_distance, whitespace_tokens

LABEL_SCHEMA = pa.schema([
    ("principle_ids", pa.list_(pa.string())), ("principle_probs", pa.list_(pa.float64())),
    ("option_orders", pa.list_(pa.list_(pa.int64()))), ("order_prob_a", pa.list_(pa.float64())),
    ("order_fallbacks", pa.list_(pa.bool_())), ("identical", pa.bool_()), ("scoring_fallbacks", pa.int64()),
    ("generated_tokens", pa.int64()), ("cot", pa.bool_()),
])


def label_batch(rows: list[dict]) -> pa.RecordBatch:
    defaults = {"option_orders": [], "order_prob_a": [], "order_fallbacks": [], "identical": False,
                "scoring_fallbacks": 0, "generated_tokens": 10, "cot": False}
    return pa.RecordBatch.from_pylist([{**defaults, **r} for r in rows], schema=LABEL_SCHEMA)


def by_id(result: dict) -> dict:
    return {p["id"]: p for p in result["principles"]}


# --- the arithmetic ---------------------------------------------------------------------

def _dp_distance(a, b):
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y))
        previous = current
    return previous[-1]


def test_edit_distance_counts_insertions_deletions_and_substitutions():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([], [7, 8]) == 2 and edit_distance([7, 8], []) == 2
    assert edit_distance(["a", "b", "c"], ["a", "b", "d", "e"]) == 2
    rng = random.Random(0)
    for _ in range(300):  # the bit-parallel form against the textbook table, 1..70 tokens (past one machine word)
        a = [rng.randrange(5) for _ in range(rng.randrange(70))]
        b = [rng.randrange(5) for _ in range(rng.randrange(70))]
        assert edit_distance(a, b) == _dp_distance(a, b)


def test_cohen_kappa_and_correlation_by_hand():
    # 50 items: both yes 20, one yes two no 5, one no two yes 10, both no 15.
    # p_o = 35/50 = 0.7; rater one says yes 25/50, rater two 30/50; p_e = .5*.6 + .5*.4 = .5; κ = .2/.5 = .4
    assert float(cohen_kappa(20, 5, 10, 15)) == pytest.approx(0.4)
    assert float(cohen_kappa(5, 0, 0, 5)) == pytest.approx(1.0)
    assert math.isnan(float(cohen_kappa(4, 0, 0, 0))), "both raters always say yes: κ undefined"
    # x = (1, 2, 3), y = (1, 3, 2): deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / 2
    x, y = (1, 2, 3), (1, 3, 2)
    sums = (3, sum(x), sum(y), sum(v * v for v in x), sum(v * v for v in y), sum(a * b for a, b in zip(x, y)))
    assert float(correlation(*sums)) == pytest.approx(0.5)
    assert math.isnan(float(correlation(2, 2, 1, 2, 0.5, 1))), "a constant side has no correlation"


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.2, 0.9, 0.4, 0.7, 0.5, 0.6, 0.3, 0.8]
    low, high = bootstrap_mean_ci(values, seed=3)
    assert (low, high) == bootstrap_mean_ci(values, seed=3), "the same seed, the same interval"
    assert 0.2 < low < 0.55 < high < 0.9
    assert bootstrap_mean_ci([0.5] * 10) == pytest.approx((0.5, 0.5))
    assert bootstrap_mean_ci([0.5]) is None


# --- a label run ------------------------------------------------------------------------

HAND_LABELS = [  # principle ids and their soft labels P(first answer better)
    {"principle_ids": ["P", "Q"], "principle_probs": [0.8, 0.6]},  # hard P1 Q1, ensemble 0.7 -> 1
    {"principle_ids": ["P", "Q"], "principle_probs": [0.3, 0.7]},  # hard P0 Q1, ensemble 0.5 -> 1 (tie: first)
    {"principle_ids": ["Q", "P"], "principle_probs": [0.2, 0.4]},  # hard Q0 P0, ensemble 0.3 -> 0
    {"principle_ids": ["P", "R"], "principle_probs": [0.9, 0.1], "identical": True},  # P1 R0, ensemble 0.5 -> 1
    {"principle_ids": ["R"], "principle_probs": [0.6]},  # R1, ensemble 0.6 -> 1
]


def test_label_counts_agreement_usefulness_and_kappa_by_hand():
    analysis = LabelAnalysis(("P", "Q", "R", "S"))
    analysis.add(label_batch(HAND_LABELS[:2]))  # two batches: the sums carry over
    analysis.add(label_batch(HAND_LABELS[2:]))
    result = analysis.result({"P": "Which is kinder?"}, ("P", "Q", "R", "S"))
    p = by_id(result)
    assert [p[x]["drawn"] for x in "PQRS"] == [4, 3, 2, 0]
    assert p["P"]["share"] == pytest.approx(4 / 9) and p["P"]["text"] == "Which is kinder?"
    assert p["S"]["in_constitution"] and "usefulness" not in p["S"], "listed though never drawn"
    assert p["P"]["mean_soft_label"] == pytest.approx((0.8 + 0.3 + 0.4 + 0.9) / 4)
    # agreement with the ensemble's hard label: P rows 1,3,4 of 1-4; Q all 3; R row 5 only
    assert [p[x]["agreement_with_ensemble"] for x in "PQR"] == pytest.approx([3 / 4, 1.0, 1 / 2])
    # usefulness, against the others of the pair: P vs Q(1), Q(1), Q(0), R(0) with P's 1, 0, 0, 1 -> 2/4
    use = p["P"]["usefulness"]
    assert use["n"] == 4 and use["accuracy"] == pytest.approx(0.5)
    assert use["log_likelihood"] == pytest.approx((math.log(0.8) + math.log(0.3) + math.log(0.6) + math.log(0.1)) / 4)
    assert use["brier"] == pytest.approx((0.04 + 0.49 + 0.16 + 0.81) / 4)
    assert p["Q"]["usefulness"]["accuracy"] == pytest.approx(2 / 3)  # vs P(1), P(0), P(0) with Q's 1, 1, 0
    assert p["R"]["usefulness"] == {"n": 1, "accuracy": 0.0, "log_likelihood": pytest.approx(math.log(0.1)),
                                    "brier": pytest.approx(0.81)}, "row 5 has no other principle"
    # histogram: 20 bins of width 0.05; P's labels fall in bins 16, 6, 8, 18
    assert [i for i, c in enumerate(p["P"]["histogram"]) for _ in range(c)] == [6, 8, 16, 18]
    matrix = result["agreement"]
    assert matrix["ids"] == ["P", "Q", "R"], "only principles that were drawn"
    kappa = dict(zip(matrix["ids"], matrix["kappa"]))
    # P vs Q on rows 1-3: P (1, 0, 0), Q (1, 1, 0): p_o 2/3, p_e 1/3*2/3 + 2/3*1/3 = 4/9, κ = (2/9)/(5/9)
    assert kappa["P"][1] == pytest.approx(0.4) and kappa["Q"][0] == pytest.approx(0.4)
    assert matrix["n"][0] == [0, 3, 1] and kappa["Q"][2] is None, "Q and R never labelled the same pair"
    # soft labels of P (.8, .3, .4) and Q (.6, .7, .2): deviations (.3, -.2, -.1), (.1, .2, -.3): r = .02 / .14
    assert matrix["correlation"][0][1] == pytest.approx(1 / 7)
    totals = result["totals"]
    assert totals["rows"] == 5 and totals["identical"] == 1 and totals["identical_share"] == pytest.approx(0.2)
    assert totals["principles_per_row"] == {"1": 1, "2": 4} and totals["generated_tokens"] == 50


def test_position_bias_by_principle_and_order_by_hand():
    analysis = LabelAnalysis()
    analysis.add(label_batch([
        # P in both orders: P(A) 0.9 with the first answer shown first, 0.7 with the second first
        {"principle_ids": ["P"], "principle_probs": [0.6], "option_orders": [[0, 1], [1, 0]],
         "order_prob_a": [0.9, 0.7], "order_fallbacks": [False, False]},
        {"principle_ids": ["P", "Q"], "principle_probs": [0.6, 0.5],
         "option_orders": [[0, 1], [1, 0], [0, 1], [1, 0]], "order_prob_a": [0.8, 0.6, 0.5, 0.5],
         "order_fallbacks": [False, True, False, False], "scoring_fallbacks": 1},
        # Q in one order only, the second answer shown first
        {"principle_ids": ["Q"], "principle_probs": [0.6], "option_orders": [[1, 0]], "order_prob_a": [0.4],
         "order_fallbacks": [False]},
    ]))
    result = analysis.result()
    p, q = by_id(result)["P"]["position"], by_id(result)["Q"]["position"]
    assert p["p_a_first_shown_first"] == pytest.approx((0.9 + 0.8) / 2)
    assert p["p_a_second_shown_first"] == pytest.approx((0.7 + 0.6) / 2)
    assert p["bias"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.6) / 4 - 0.5)
    assert (q["n_first_shown_first"], q["n_second_shown_first"]) == (1, 2)
    assert q["p_a_first_shown_first"] == pytest.approx(0.5) and q["p_a_second_shown_first"] == pytest.approx(0.45)
    assert by_id(result)["P"]["fallback_rate"] == pytest.approx(1 / 4)
    assert by_id(result)["Q"]["fallback_rate"] == 0.0
    assert result["totals"]["position_bias"] == pytest.approx(4.4 / 7 - 0.5)
    assert result["totals"]["scoring_fallbacks"] == 1 and result["totals"]["scorings"] == 7


def test_a_label_run_without_order_columns_has_no_position_figures():
    analysis = LabelAnalysis()
    analysis.add(label_batch(HAND_LABELS).drop_columns(["option_orders", "order_prob_a", "order_fallbacks"]))
    result = analysis.result()
    assert by_id(result)["P"]["position"] is None and result["totals"]["position_bias"] is None


# --- a generate run ---------------------------------------------------------------------

def generate_batch(rows):
    revision = pa.struct([("round", pa.int64()), ("principle_id", pa.string()), ("critique", pa.string()),
                          ("revision", pa.string())])
    schema = pa.schema([("id", pa.string()), ("initial_response", pa.string()), ("revisions", pa.list_(revision)),
                        ("principle_ids", pa.list_(pa.string())), ("prompt_tokens", pa.int64()),
                        ("generated_tokens", pa.int64()), ("error", pa.string())])
    return pa.RecordBatch.from_pylist([
        {"id": row_id, "initial_response": initial, "principle_ids": [p for p, _ in revisions],
         "revisions": [{"round": i, "principle_id": p, "critique": "c", "revision": text}
                       for i, (p, text) in enumerate(revisions, 1)],
         "prompt_tokens": 5, "generated_tokens": 20, "error": None}
        for row_id, initial, revisions in rows], schema=schema)


def test_revision_change_and_effect_by_principle_and_round_by_hand():
    judged = {revision_key("r1", 1): 0.9, revision_key("r1", 2): 0.5, revision_key("r2", 1): 0.2,
              revision_key("r2", 2): 0.7}
    analysis = GenerateAnalysis(lambda texts: [whitespace_tokens(t) for t in texts], judged, seed=0, resamples=200)
    analysis.add(generate_batch([
        ("r1", "a b c", [("X", "a b d e"), ("Y", "a b d e")]),  # X: c->d, +e: 2, +1 token; Y: unchanged
        ("r2", "x y", [("Y", "z"), ("X", "z w v")]),  # Y: x->z, -y: 2, -1 token; X: +w +v: 2, +2 tokens
    ]))
    result = analysis.result({"X": "Is it harmful?"}, ("X", "Y", "W"))
    p = by_id(result)
    assert [p[x]["drawn"] for x in "XYW"] == [2, 2, 0] and "by_round" not in p["W"]
    x, y = p["X"], p["Y"]
    assert x["by_round"]["1"] == {"n": 1, "edit_distance": 2.0, "relative_edit_distance": pytest.approx(2 / 3),
                                  "length_change": 1.0, "unchanged_share": 0.0}
    assert x["by_round"]["2"]["relative_edit_distance"] == pytest.approx(2.0)  # 2 edits to a 1-token answer
    assert x["all_rounds"]["edit_distance"] == 2.0 and x["all_rounds"]["length_change"] == 1.5
    assert y["by_round"]["2"] == {"n": 1, "edit_distance": 0.0, "relative_edit_distance": 0.0,
                                  "length_change": 0.0, "unchanged_share": 1.0}
    assert y["all_rounds"]["edit_distance"] == 1.0 and y["all_rounds"]["unchanged_share"] == 0.5
    assert x["revision_effect"]["mean"] == pytest.approx(0.8) and y["revision_effect"]["mean"] == pytest.approx(0.35)
    low, high = x["revision_effect"]["ci"]
    assert 0.7 <= low <= 0.8 <= high <= 0.9
    totals = result["totals"]
    assert totals["rows"] == 2 and totals["revisions"] == 4 and totals["unchanged_share"] == 0.25
    assert totals["final_equals_initial"] == 0 and totals["generated_tokens"] == 40


def test_compare_win_rates_and_position_per_principle_by_hand():
    schema = pa.schema([("challenger", pa.string()), ("category", pa.string()),
                        ("principle_ids", pa.list_(pa.string())), ("principle_probs", pa.list_(pa.float64())),
                        ("prob_a_baseline_first", pa.list_(pa.float64())),
                        ("prob_a_challenger_first", pa.list_(pa.float64())), ("identical", pa.bool_()),
                        ("scoring_fallbacks", pa.int64())])
    analysis = CompareAnalysis()
    analysis.add(pa.RecordBatch.from_pylist([
        {"challenger": "sft", "category": "red_team", "principle_ids": ["P", "Q"], "principle_probs": [0.7, 0.4],
         "prob_a_baseline_first": [0.4, 0.7], "prob_a_challenger_first": [0.8, 0.5], "identical": False,
         "scoring_fallbacks": 0},
        {"challenger": "sft", "category": "red_team", "principle_ids": ["P"], "principle_probs": [0.6],
         "prob_a_baseline_first": [0.5], "prob_a_challenger_first": [0.7], "identical": True, "scoring_fallbacks": 1},
    ], schema=schema))
    cells = {(c["challenger"], c["id"]): c for c in analysis.result()["principles"]}
    p = cells[("sft", "P")]
    assert p["n"] == 2 and p["win_rate"] == pytest.approx(0.65) and p["hard_win_rate"] == 1.0
    assert p["p_a_baseline_first"] == pytest.approx(0.45) and p["p_a_challenger_first"] == pytest.approx(0.75)
    assert p["position_bias"] == pytest.approx((0.4 + 0.5 + 0.8 + 0.7) / 4 - 0.5)
    assert cells[("sft", "Q")]["hard_win_rate"] == 0.0
    assert analysis.result()["principles"][0]["id"] == "P"


def test_feedback_eval_accuracy_and_mean_correct_probability_by_hand():
    analysis = FeedbackEvalAnalysis()
    analysis.add(pa.RecordBatch.from_pylist([  # correct options first
        {"probs": [0.7, 0.3], "n_correct": 1, "correct": True, "method": "fast", "fallbacks": 0},
        {"probs": [0.2, 0.3, 0.5], "n_correct": 2, "correct": True, "method": "fast", "fallbacks": 1},
        {"probs": [0.4, 0.6], "n_correct": 1, "correct": False, "method": "exact", "fallbacks": 0},
    ]))
    totals = analysis.result()["totals"]
    assert totals["accuracy"] == pytest.approx(2 / 3) and totals["mean_correct_prob"] == pytest.approx(1.6 / 3)
    assert totals["methods"] == {"fast": 2, "exact": 1} and totals["fallbacks"] == 1


# --- run folders ------------------------------------------------------------------------

def test_run_folders_are_checked_with_one_clear_message(tmp_path):
    with pytest.raises(AnalysisInputError, match="no such folder"):
        open_run(str(tmp_path / "absent"))
    with pytest.raises(AnalysisInputError, match="is not a run folder"):
        open_run(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(AnalysisInputError, match="holds a 'sft' run"):
        open_run(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "label"}))
    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "shard-00000.parquet"
    pq.write_table(pa.table({"principle_ids": [["P"]], "identical": [False]}), shard)
    with pytest.raises(AnalysisInputError, match="no column 'principle_probs'"):
        open_run(str(tmp_path))


def test_reject_reasons_are_counted_with_numbers_folded(tmp_path):
    (tmp_path / "rejects").mkdir()
    (tmp_path / "rejects" / "input.jsonl").write_text(json.dumps({"index": 0, "reason": "empty prompt"}) + "\n")
    (tmp_path / "rejects" / "shard-00000.jsonl").write_text("".join(
        json.dumps({"index": i, "reason": f"prompt of {3000 + i} tokens exceeds the context of 2048"}) + "\n"
        for i in (1, 2)))
    assert reject_reasons(tmp_path) == {"rejected": 3, "reasons": {
        "prompt of N tokens exceeds the context of N": 2, "empty prompt": 1}}


def test_an_eval_compare_folder_is_read_through_its_judgements(tmp_path):
    (tmp_path / "judgements").mkdir()
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "judgements" / "manifest.json").write_text(json.dumps({"stage": "compare-judge"}))
    run = open_run(str(tmp_path))
    assert run.kind == "eval-compare" and run.path == tmp_path / "judgements" and run.rows == 0

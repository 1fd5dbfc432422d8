"""The arithmetic of `cai eval compare` on hand-made inputs (no Ray, no vLLM)."""

import math

import pytest

from core.eval_stats import (
    bradley_terry_elo,
    challenger_win_prob,
    prompt_scores,
    summarize,
    wilson_interval,
    win_rate,
)


def test_wilson_interval_matches_hand_computation():
    # 50 of 100: the textbook 95% Wilson interval.
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.40383, abs=1e-5) and high == pytest.approx(0.59617, abs=1e-5)
    # 0 of 10 and 10 of 10: the bounds are z²/(n + z²) from the far side.
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(1.0, 10) == pytest.approx((10 / (10 + z2), 1.0))
    # 8 of 10 by the formula: centre (p + z²/2n)/(1 + z²/n), half-width z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²)
    p, n = 0.8, 10
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    assert wilson_interval(p, n) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(p, n) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_win_rate_soft_and_hard():
    summary = win_rate([1.0, 0.75, 0.5, 0.25])
    assert summary["n"] == 4
    assert summary["win_rate"] == pytest.approx(0.625)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert summary["hard_win_rate"] == pytest.approx(2.5 / 4)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(0.625, 4))
    assert summary["ci_low"] <= summary["win_rate"] <= summary["ci_high"]
    assert win_rate([])["n"] == 0 and win_rate([])["win_rate"] is None


def test_a_judge_that_always_picks_option_a_gives_exactly_one_half():
    always_first = [(1.0, 1.0)] * 3  # P(option A) = 1 whoever is shown first
    assert challenger_win_prob(always_first) == 0.5
    biased = [(0.9, 0.9), (0.6, 0.6)]  # any pure position preference cancels
    assert challenger_win_prob(biased) == pytest.approx(0.5)


def test_a_judge_that_always_prefers_the_challenger_gives_one():
    # challenger shown second: P(A) = 0; challenger shown first: P(A) = 1
    assert challenger_win_prob([(0.0, 1.0), (0.0, 1.0)]) == 1.0
    assert challenger_win_prob([(1.0, 0.0)]) == 0.0
    # orders averaged first, then principles: ((1-0.2)+0.6)/2 = 0.7 and ((1-0.5)+0.5)/2 = 0.5
    assert challenger_win_prob([(0.2, 0.6), (0.5, 0.5)]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        challenger_win_prob([])


def test_prompt_scores_average_a_prompts_samples():
    rows = [
        {"challenger": "b", "category": "helpful", "prompt_id": "p1", "challenger_prob": 1.0},
        {"challenger": "b", "category": "helpful", "prompt_id": "p1", "challenger_prob": 0.0},
        {"challenger": "b", "category": "helpful", "prompt_id": "p2", "challenger_prob": 0.8},
    ]
    assert prompt_scores(rows) == {("b", "helpful"): {"p1": 0.5, "p2": 0.8}}


def test_elo_winner_rated_higher_and_baseline_anchored():
    games = [("b", "a", 1.0)] * 10 + [("c", "a", 0.5)] * 10
    elo = bradley_terry_elo(games, ["a", "b", "c"], "a")
    assert elo["a"] == 1000.0
    assert elo["b"] > elo["a"]
    assert elo["c"] == pytest.approx(1000.0)
    # one baseline and challengers: closed form with the half-win-half-loss virtual game
    assert elo["b"] == pytest.approx(1000 + 400 * math.log10(10.5 / 0.5))


def test_elo_equal_results_equal_ratings():
    games = [("b", "a", 0.7), ("b", "a", 0.4), ("c", "a", 0.7), ("c", "a", 0.4)]
    elo = bradley_terry_elo(games, ["a", "b", "c"], "a")
    assert elo["b"] == pytest.approx(elo["c"], abs=1e-9)
    w = (1.1 + 0.5) / 3
    assert elo["b"] == pytest.approx(1000 + 400 * math.log10(w / (1 - w)))
    assert bradley_terry_elo([("b", "a", 0.5)] * 4, ["a", "b"], "a")["b"] == pytest.approx(1000.0)


def test_elo_general_graph_and_unconnected_models():
    # a chain a < b < c: the transitive order is recovered, and d (no games) is unrated
    games = [("b", "a", 0.75)] * 20 + [("c", "b", 0.75)] * 20
    elo = bradley_terry_elo(games, ["a", "b", "c", "d"], "a", anchor_rating=1500.0)
    assert elo["a"] == 1500.0 and elo["a"] < elo["b"] < elo["c"] and elo["d"] is None
    assert elo["c"] - elo["b"] == pytest.approx(elo["b"] - elo["a"], abs=1e-6)
    with pytest.raises(ValueError):
        bradley_terry_elo([("a", "a", 1.0)], ["a"], "a")


def test_summarize_per_category_and_overall():
    rows = [{"challenger": "b", "category": "red_team", "prompt_id": f"r{i}", "challenger_prob": 1.0} for i in range(3)]
    rows += [{"challenger": "b", "category": "helpful", "prompt_id": f"h{i}", "challenger_prob": 0.0} for i in range(3)]
    summary = summarize(rows, "a", ["b"])
    rates = summary["win_rates"]["b"]
    assert rates["red_team"]["win_rate"] == 1.0 and rates["red_team"]["metric"] == "harmlessness"
    assert rates["helpful"]["win_rate"] == 0.0 and rates["helpful"]["n"] == 3
    elo = summary["elo"]
    assert elo["red_team"]["b"] > 1000 > elo["helpful"]["b"]
    assert elo["all"]["b"] == pytest.approx(1000.0) and elo["all"]["a"] == 1000.0

"""The arithmetic of `cai eval compare`: position-bias cancellation, win rates with a
Wilson interval, and Bradley–Terry (Elo-scale) ratings. Pure Python, no Ray, no vLLM.

Definitions used throughout (and in the report's method notes):

* **Comparison score.** The judge sees each (baseline, challenger) answer pair under K
  feedback principles, each in *both* option orders. Per principle, the challenger's
  probability of being better is the mean of ``1 - P(first | baseline shown first)`` and
  ``P(first | challenger shown first)``; a judge that always picks option (A) scores
  exactly 0.5 (its bias cancels), a judge that always picks the challenger's text scores 1.
  The score of a pair is the mean over principles.
* **Per-prompt score.** The mean over the prompt's pairs (one per sampled answer), so a
  prompt counts once however many answers were sampled: prompts are the independent units.
* **Win rate.** The mean per-prompt score (a *soft* win rate: a 0.7 counts as 0.7 of a
  win). The hard win rate (score > 0.5 a win, exactly 0.5 half a win) is reported beside it.
* **95% interval.** The Wilson score interval with p̂ = the soft win rate and n = the
  number of prompts. A score in [0, 1] with mean p has variance at most p(1 − p), the
  Bernoulli variance, so the interval is, if anything, conservative for soft scores.
* **Elo.** A Bradley–Terry model fitted by maximum likelihood (Hunter's MM algorithm) to
  every (model, opponent, per-prompt score) game, with fractional wins, on the Elo scale:
  ``P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400))``. The baseline is anchored at 1000.
  Each compared pair of models also gets one virtual drawn game (half a win each), so a
  perfect record gives a large but finite rating. With one baseline and challengers only
  compared to it, a challenger's rating is ``1000 + 400 * log10(w / (1 - w))`` with
  ``w = (wins + 0.5) / (games + 1)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CATEGORIES = ("red_team", "helpful")
METRICS = {"red_team": "harmlessness", "helpful": "helpfulness"}
Z_95 = 1.959963984540054
ELO_SCALE = 400.0
ANCHOR_RATING = 1000.0


def challenger_win_prob(first_option_probs: Sequence[tuple[float, float]]) -> float:
    """P(the challenger's answer is better), position bias cancelled, principles averaged.

    ``first_option_probs[k] = (P(option A) with the baseline shown as A,
    P(option A) with the challenger shown as A)`` for principle k.
    """
    if not first_option_probs:
        raise ValueError("need at least one principle's scores")
    per_principle = []
    for baseline_first, challenger_first in first_option_probs:
        for p in (baseline_first, challenger_first):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probabilities must lie in [0, 1], got {p}")
        per_principle.append(((1.0 - baseline_first) + challenger_first) / 2.0)
    return sum(per_principle) / len(per_principle)


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p_hat`` observed over ``n`` trials."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"p_hat must lie in [0, 1], got {p_hat}")
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p_hat * (1.0 - p_hat) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores: Sequence[float]) -> dict[str, Any]:
    """Soft and hard win rates of per-prompt scores, with the Wilson interval of the soft one."""
    n = len(scores)
    if n == 0:
        return {"n": 0, "win_rate": None, "ci_low": None, "ci_high": None, "hard_win_rate": None,
                "wins": 0, "ties": 0, "losses": 0}
    wins = sum(1 for s in scores if s > 0.5)
    ties = sum(1 for s in scores if s == 0.5)
    soft = sum(scores) / n
    low, high = wilson_interval(soft, n)
    return {"n": n, "win_rate": soft, "ci_low": low, "ci_high": high, "hard_win_rate": (wins + ties / 2) / n,
            "wins": wins, "ties": ties, "losses": n - wins - ties}


def prompt_scores(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(challenger, category): {prompt_id: mean challenger_prob over its pairs}}``."""
    grouped: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[(row["challenger"], row["category"])][row["prompt_id"]].append(row["challenger_prob"])
    return {key: {pid: sum(v) / len(v) for pid, v in by_prompt.items()} for key, by_prompt in grouped.items()}


def bradley_terry_elo(
    games: Iterable[tuple[str, str, float]],
    models: Sequence[str],
    anchor: str,
    *,
    anchor_rating: float = ANCHOR_RATING,
    prior_games: float = 1.0,
    tolerance: float = 1e-10,
    max_iterations: int = 100_000,
) -> dict[str, float | None]:
    """Elo-scale Bradley–Terry ratings from ``(model, opponent, score of model)`` games.

    Scores are fractional wins in [0, 1]. Every pair that played gets ``prior_games``
    virtual games scored 0.5. Models with no path of games to ``anchor`` get ``None``.
    """
    if anchor not in models:
        raise ValueError(f"anchor {anchor!r} is not among the models {list(models)}")
    played: dict[frozenset, float] = defaultdict(float)  # pair -> games
    wins: dict[str, float] = defaultdict(float)
    for model, opponent, score in games:
        if model == opponent or model not in models or opponent not in models:
            raise ValueError(f"bad game {model!r} vs {opponent!r} (models: {list(models)})")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"scores must lie in [0, 1], got {score}")
        played[frozenset((model, opponent))] += 1.0
        wins[model] += score
        wins[opponent] += 1.0 - score
    for pair in played:
        played[pair] += prior_games
        for model in pair:
            wins[model] += prior_games / 2.0
    rated = _connected(anchor, played)
    opponents = {m: [(next(iter(p - {m})), n) for p, n in played.items() if m in p] for m in rated}
    strength = {m: 1.0 for m in rated}
    for _ in range(max_iterations):
        # Hunter (2004) MM update, all models at once so equal records stay exactly equal.
        updated = {m: wins[m] / sum(n / (strength[m] + strength[o]) for o, n in opponents[m]) if opponents[m] else 1.0
                   for m in rated}
        scale = updated[anchor]
        updated = {m: s / scale for m, s in updated.items()}
        change = max(abs(math.log(updated[m] / strength[m])) for m in rated)
        strength = updated
        if change < tolerance:
            break
    return {m: anchor_rating + ELO_SCALE * math.log10(strength[m]) if m in rated else None for m in models}


def _connected(start: str, played: Mapping[frozenset, float]) -> set[str]:
    seen, frontier = {start}, [start]
    while frontier:
        model = frontier.pop()
        for pair in played:
            if model in pair:
                for other in pair - seen:
                    seen.add(other)
                    frontier.append(other)
    return seen


def summarize(rows: Sequence[Mapping[str, Any]], baseline: str, challengers: Sequence[str]) -> dict[str, Any]:
    """Win rates per challenger and category, and Elo per category and overall.

    ``rows`` are judged pairs with ``challenger``, ``category``, ``prompt_id`` and
    ``challenger_prob``. Categories without prompts get ``n = 0`` and ``None`` values.
    """
    scores = prompt_scores(rows)
    models = [baseline, *challengers]
    rates = {c: {cat: {"metric": METRICS[cat], **win_rate(list(scores.get((c, cat), {}).values()))}
                 for cat in CATEGORIES} for c in challengers}

    def games(categories: Sequence[str]) -> list[tuple[str, str, float]]:
        return [(c, baseline, s) for c in challengers for cat in categories
                for s in scores.get((c, cat), {}).values()]

    elo = {cat: bradley_terry_elo(games([cat]), models, baseline) for cat in CATEGORIES}
    elo["all"] = bradley_terry_elo(games(CATEGORIES), models, baseline)
    return {"win_rates": rates, "elo": elo}

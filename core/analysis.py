"""What each feedback principle did in a `cai label` run, streamed batch by batch.

:class:`LabelAnalysis` consumes pyarrow record batches of a label run's ``data/*.parquet``
(only the columns in :data:`LABEL_COLUMNS`, never the texts) and keeps fixed-size numpy
sums per principle and per pair of principles, so its memory does not grow with the run.
Vectorized per batch: a million rows take seconds.

Definitions (also in the report, ``workflows/analyze_report.py``):

- a principle's *soft label* for a pair is its P(first answer better), the mean of its
  scorings (both orders, or one); its *hard label* is ``soft >= 0.5`` (a tie goes to the
  first answer, as the label's ``chosen`` does). The *ensemble* is the mean over the pair's
  principles (the row's label).
- *agreement with the ensemble*: how often a principle's hard label equals the ensemble's.
  It counts the principle's own vote (the more so the fewer principles a pair has), which
  flatters it; usefulness leaves that vote out.
- *usefulness* (in the sense of Inverse Constitutional AI, Findeis et al. 2024: how well a
  principle alone reconstructs the preferences): on pairs with at least two principles,
  the accuracy of the principle's hard label against the ensemble of the *other* principles
  of the pair, with the mean log-likelihood and Brier score its soft label gives that label.
- *pairwise agreement*: over pairs labelled by both principles, Cohen's κ of their hard
  labels and the Pearson correlation of their soft labels.
- *position bias*: per principle, the mean P(A) the feedback model gave with the first answer
  shown as (A), and with the second shown as (A); an unbiased model's two figures sum to 1
  on average, and ``bias = mean P(A) − 0.5`` over all its scorings (> 0: it favours
  whatever is shown first). Read from ``order_prob_a``; runs made before that column have none.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.analysis_stats import cohen_kappa, correlation, finite

LABEL_COLUMNS = ("principle_ids", "principle_probs", "identical", "scoring_fallbacks", "generated_tokens", "cot")
ORDER_COLUMNS = ("option_orders", "order_prob_a", "order_fallbacks")
HISTOGRAM_BINS = 20


class AnalysisInputError(ValueError):
    """A run folder cannot be analysed (the message names the folder and the problem)."""


class PrincipleCodes:
    """Principle ids to dense integer codes, in order of first appearance."""

    def __init__(self, known: tuple[str, ...] = ()):
        self.ids: list[str] = []
        self._code: dict[str, int] = {}
        for pid in known:
            self.code(pid)

    def code(self, pid: str) -> int:
        if pid not in self._code:
            self._code[pid] = len(self.ids)
            self.ids.append(pid)
        return self._code[pid]

    def encode(self, ids: pa.Array) -> np.ndarray:
        for pid in pc.unique(ids).to_pylist():
            self.code(pid)
        return pc.index_in(ids, value_set=pa.array(self.ids, pa.string())).to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return len(self.ids)


def _lengths(column: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat(column: pa.Array) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def _bincount(codes: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(codes, weights=weights, minlength=size).astype(float)


class LabelAnalysis:
    """Per-principle and pairwise sums over a label run; :meth:`add` a batch, :meth:`result` at the end."""

    PER = ("drawn", "soft_sum", "agree", "loo_n", "loo_hits", "loo_loglik", "loo_brier", "scorings", "fallbacks")
    PAIR = ("n", "n11", "n10", "n01", "sx", "sy", "sxx", "syy", "sxy")

    def __init__(self, known_ids: tuple[str, ...] = ()):
        self.codes = PrincipleCodes(known_ids)
        self.size = 0
        self.per = {name: np.zeros(0) for name in self.PER}
        self.hist = np.zeros((0, HISTOGRAM_BINS))
        self.order_n = np.zeros((0, 2))
        self.order_sum = np.zeros((0, 2))
        self.pair = {name: np.zeros((0, 0)) for name in self.PAIR}
        self.totals = {"rows": 0, "identical": 0, "scoring_fallbacks": 0, "generated_tokens": 0, "cot_rows": 0,
                       "rows_with_orders": 0, "principles_per_row": {}}
        self._grow(len(self.codes))

    def _grow(self, k: int) -> None:
        if k <= self.size:
            return
        extra = k - self.size
        self.per = {name: np.pad(a, (0, extra)) for name, a in self.per.items()}
        self.hist = np.pad(self.hist, ((0, extra), (0, 0)))
        self.order_n, self.order_sum = (np.pad(a, ((0, extra), (0, 0))) for a in (self.order_n, self.order_sum))
        self.pair = {name: np.pad(a, ((0, extra), (0, extra))) for name, a in self.pair.items()}
        self.size = k

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        if n == 0:
            return
        ids = batch.column("principle_ids")
        lengths = _lengths(ids)
        codes = self.codes.encode(pc.list_flatten(ids))
        probs = _flat(batch.column("principle_probs")).astype(float)
        if len(probs) != len(codes) or not np.array_equal(_lengths(batch.column("principle_probs")), lengths):
            raise AnalysisInputError("principle_probs and principle_ids differ in length")
        self._grow(len(self.codes))
        k = self.size
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        row = np.repeat(np.arange(n), lengths)
        row_sum = np.bincount(row, weights=probs, minlength=n)
        count = lengths[row]
        hard = probs >= 0.5
        per = self.per
        per["drawn"] += _bincount(codes, k)
        per["soft_sum"] += _bincount(codes, k, probs)
        bins = np.minimum((probs * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        self.hist += _bincount(codes * HISTOGRAM_BINS + bins, k * HISTOGRAM_BINS).reshape(k, HISTOGRAM_BINS)
        per["agree"] += _bincount(codes, k, (hard == (row_sum[row] / count >= 0.5)).astype(float))
        self._usefulness(codes, probs, hard, row_sum[row], count)
        self._pairs(codes, probs, lengths, offsets)
        if all(name in batch.schema.names for name in ORDER_COLUMNS):
            self._orders(batch, codes, lengths, offsets)
        t = self.totals
        t["rows"] += n
        t["identical"] += int(pc.sum(batch.column("identical")).as_py() or 0)
        t["scoring_fallbacks"] += int(pc.sum(batch.column("scoring_fallbacks")).as_py() or 0)
        t["generated_tokens"] += int(pc.sum(batch.column("generated_tokens")).as_py() or 0)
        t["cot_rows"] += int(pc.sum(batch.column("cot")).as_py() or 0)
        for m, c in zip(*np.unique(lengths, return_counts=True)):
            t["principles_per_row"][int(m)] = t["principles_per_row"].get(int(m), 0) + int(c)

    def _usefulness(self, codes, probs, hard, row_sum, count) -> None:
        """Each principle against the ensemble of the pair's other principles (pairs with two or more)."""
        k, mask = self.size, count >= 2
        codes, probs, hard = codes[mask], probs[mask], hard[mask]
        others = (row_sum[mask] - probs) / (count[mask] - 1)
        target = others >= 0.5
        p_target = np.clip(np.where(target, probs, 1 - probs), 1e-12, 1.0)
        self.per["loo_n"] += _bincount(codes, k)
        self.per["loo_hits"] += _bincount(codes, k, (hard == target).astype(float))
        self.per["loo_loglik"] += _bincount(codes, k, np.log(p_target))
        self.per["loo_brier"] += _bincount(codes, k, (probs - target) ** 2)

    def _pairs(self, codes, probs, lengths, offsets) -> None:
        """Both orientations of every two principles that labelled the same pair."""
        k = self.size
        for m in np.unique(lengths):
            if m < 2:
                continue
            cells = offsets[:-1][lengths == m][:, None] + np.arange(m)
            c, p = codes[cells], probs[cells]
            for a, b in combinations(range(m), 2):
                for i, j in ((a, b), (b, a)):
                    keep = c[:, i] != c[:, j]
                    key = c[keep, i] * k + c[keep, j]
                    x, y = p[keep, i], p[keep, j]
                    hx, hy = x >= 0.5, y >= 0.5
                    for name, weights in (("n", None), ("n11", hx & hy), ("n10", hx & ~hy), ("n01", ~hx & hy),
                                          ("sx", x), ("sy", y), ("sxx", x * x), ("syy", y * y), ("sxy", x * y)):
                        w = None if weights is None else weights.astype(float)
                        self.pair[name] += _bincount(key, k * k, w).reshape(k, k)

    def _orders(self, batch: pa.RecordBatch, codes, lengths, offsets) -> None:
        """P(A) per principle and display order; fallbacks per principle."""
        orders = batch.column("option_orders")
        scorings = _lengths(orders)
        prob_a = _flat(batch.column("order_prob_a")).astype(float)
        if len(prob_a) != scorings.sum():
            return  # not recorded for these rows
        first_shown = pc.list_element(pc.list_flatten(orders), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        fallbacks = _flat(batch.column("order_fallbacks")).astype(float)
        row = np.repeat(np.arange(len(lengths)), scorings)
        start = np.concatenate([[0], np.cumsum(scorings)])[:-1]
        per_principle = np.maximum(scorings // np.maximum(lengths, 1), 1)
        position = (np.arange(len(row)) - start[row]) // per_principle[row]
        principle = codes[offsets[:-1][row] + np.minimum(position, lengths[row] - 1)]
        k = self.size
        self.order_n += _bincount(principle * 2 + first_shown, 2 * k).reshape(k, 2)
        self.order_sum += _bincount(principle * 2 + first_shown, 2 * k, prob_a).reshape(k, 2)
        self.per["scorings"] += _bincount(principle, k)
        if len(fallbacks) == len(principle):
            self.per["fallbacks"] += _bincount(principle, k, fallbacks)
        self.totals["rows_with_orders"] += int(np.count_nonzero(scorings))

    def result(self, texts: dict[str, str] | None = None, constitution_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        """Per principle (constitution order first, then any others), the pairwise matrices
        over the principles that were drawn, and the run's totals."""
        texts = texts or {}
        for pid in constitution_ids:
            self.codes.code(pid)
        self._grow(len(self.codes))
        per, t = self.per, self.totals
        drawn_total = per["drawn"].sum()
        principles = []
        for code, pid in enumerate(self.codes.ids):
            drawn = int(per["drawn"][code])
            entry: dict[str, Any] = {"id": pid, "text": texts.get(pid), "drawn": drawn,
                                     "in_constitution": pid in constitution_ids or not constitution_ids,
                                     "share": finite(drawn / drawn_total) if drawn_total else None}
            if drawn:
                entry.update(mean_soft_label=finite(per["soft_sum"][code] / drawn),
                             histogram=self.hist[code].astype(int).tolist(),
                             agreement_with_ensemble=finite(per["agree"][code] / drawn),
                             usefulness=self._usefulness_entry(code), position=self._position_entry(code),
                             fallback_rate=(finite(per["fallbacks"][code] / per["scorings"][code])
                                            if per["scorings"][code] else None))
            principles.append(entry)
        drawn_codes = [c for c in range(len(self.codes)) if per["drawn"][c]]
        pick = np.ix_(drawn_codes, drawn_codes)
        p = {name: a[pick] for name, a in self.pair.items()}
        n00 = p["n"] - p["n11"] - p["n10"] - p["n01"]
        matrix = {"ids": [self.codes.ids[c] for c in drawn_codes], "n": p["n"].astype(int).tolist(),
                  "kappa": _nullable(cohen_kappa(p["n11"], p["n10"], p["n01"], n00)),
                  "correlation": _nullable(correlation(p["n"], p["sx"], p["sy"], p["sxx"], p["syy"], p["sxy"]))}
        n_all, sum_all = self.order_n.sum(), self.order_sum.sum()
        totals = {**t, "principles_per_row": {str(m): c for m, c in sorted(t["principles_per_row"].items())},
                  "identical_share": finite(t["identical"] / t["rows"]) if t["rows"] else None,
                  "scorings": int(n_all),
                  "position_bias": finite(sum_all / n_all - 0.5) if n_all else None}
        return {"principles": principles, "agreement": matrix, "totals": totals, "histogram_bins": HISTOGRAM_BINS}

    def _usefulness_entry(self, code: int) -> dict[str, Any] | None:
        n = self.per["loo_n"][code]
        if not n:
            return None  # never drawn beside another principle
        return {"n": int(n), "accuracy": finite(self.per["loo_hits"][code] / n),
                "log_likelihood": finite(self.per["loo_loglik"][code] / n),
                "brier": finite(self.per["loo_brier"][code] / n)}

    def _position_entry(self, code: int) -> dict[str, Any] | None:
        n, s = self.order_n[code], self.order_sum[code]
        if not n.sum():
            return None
        return {"n_first_shown_first": int(n[0]), "n_second_shown_first": int(n[1]),
                "p_a_first_shown_first": finite(s[0] / n[0]) if n[0] else None,
                "p_a_second_shown_first": finite(s[1] / n[1]) if n[1] else None,
                "bias": finite(s.sum() / n.sum() - 0.5)}


def _nullable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[finite(v) for v in row] for row in matrix]

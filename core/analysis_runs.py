"""Run folders for `cai analyze`: which kind each is, and what its critique principles and
judged pairs did, streamed batch by batch. The label-run analysis is :mod:`core.analysis`.

A run folder is what a sharded stage writes (``manifest.json``, ``data/*.parquet``,
``rejects/*.jsonl``, see :mod:`core.shards`); its kind is the manifest's stage. An
`eval compare` folder is read through its ``judgements/`` stage.
"""

from __future__ import annotations

import json
import re
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.analysis import LABEL_COLUMNS, AnalysisInputError
from core.analysis_stats import bootstrap_mean_ci, edit_distance, finite
from core.manifest import MANIFEST

KINDS = {"generate": "generate", "label": "label", "eval-feedback": "eval-feedback", "compare-judge": "eval-compare"}
COLUMNS = {
    "generate": ("id", "initial_response", "revisions", "principle_ids", "prompt_tokens", "generated_tokens", "error"),
    "label": LABEL_COLUMNS,
    "eval-feedback": ("probs", "n_correct", "correct", "method", "fallbacks"),
    "eval-compare": ("challenger", "category", "principle_ids", "principle_probs", "prob_a_baseline_first",
                     "prob_a_challenger_first", "identical", "scoring_fallbacks"),
}


def revision_key(row_id: str, round_index: int) -> str:
    """The id of one revision step of a generate row (the judge's row id)."""
    return f"{row_id}#r{round_index}"


@dataclass(frozen=True)
class RunFolder:
    path: Path  # the stage folder read (``judgements/`` for eval compare)
    given: str  # as the user named it
    kind: str
    manifest: dict[str, Any]
    files: tuple[Path, ...]
    rows: int  # output rows, from the Parquet footers

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})


def open_run(given: str) -> RunFolder:
    """Identify a run folder and check that its output has the columns the analysis reads."""
    path = Path(given).expanduser()
    if not path.is_dir():
        raise AnalysisInputError(f"{given}: no such folder")
    if not (path / MANIFEST).exists() and (path / "judgements" / MANIFEST).exists():
        path = path / "judgements"  # an eval compare run
    if not (path / MANIFEST).exists():
        raise AnalysisInputError(f"{given} is not a run folder (no {MANIFEST}); give the --out of cai generate, "
                                 "cai label, cai eval feedback or cai eval compare")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AnalysisInputError(f"{path / MANIFEST} is unreadable: {exc}") from None
    stage = manifest.get("stage")
    if stage not in KINDS:
        raise AnalysisInputError(f"{given} holds a {stage!r} run; cai analyze reads {', '.join(KINDS)} runs")
    files = tuple(sorted((path / "data").glob("*.parquet")))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if files:
        names = set(pq.read_schema(files[0]).names)
        missing = [c for c in COLUMNS[KINDS[stage]] if c not in names]
        if missing:
            raise AnalysisInputError(f"{given}: {files[0].name} has no column {missing[0]!r} "
                                     f"(a {stage} run from an older version?)")
    return RunFolder(path, given, KINDS[stage], manifest, files, rows)


def iter_batches(run: RunFolder, columns: Sequence[str], batch_size: int = 65_536):
    """The run's output rows in record batches of about ``batch_size`` rows, of the given
    columns (those present), file by file. Small shard files (a label shard holds one row per
    pair of ``--shard-size`` prompts) are gathered into one batch, so what a batch costs beyond
    its rows is paid per ``batch_size`` rows, not per file. (A ``pyarrow.dataset`` scan read the
    files on more threads, 40% faster, but held 2 GB for a million rows in 15,625 files.)"""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for path in run.files:
        handle = pq.ParquetFile(path)
        present = [c for c in columns if c in handle.schema_arrow.names]
        for batch in handle.iter_batches(batch_size=batch_size, columns=present):
            if pending and not batch.schema.equals(pending[0].schema):
                yield _combined(pending)
                pending, rows = [], 0
            pending.append(batch)
            rows += batch.num_rows
            if rows >= batch_size:
                yield _combined(pending)
                pending, rows = [], 0
    if pending:
        yield _combined(pending)


def _combined(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


_NUMBER = re.compile(r"\d+")


def reject_reasons(run_dir: Path, limit: int = 12) -> dict[str, Any]:
    """Rejected rows by reason, numbers replaced by N so that "prompt of 3012 tokens" and
    "prompt of 2950 tokens" count as one reason; read line by line."""
    reasons: Counter[str] = Counter()
    for path in sorted((run_dir / "rejects").glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    reason = str(json.loads(line).get("reason", "?"))
                    reasons[_NUMBER.sub("N", reason)[:160]] += 1
    return {"rejected": sum(reasons.values()), "reasons": dict(reasons.most_common(limit))}


class GenerateAnalysis:
    """Per critique principle and round: how much each revision changed the answer before it.

    A revision of round r is compared with the answer before it (the initial answer for round
    1, the revision of round r-1 after): token edit distance, length change in tokens, and
    whether it is the same text. ``judged`` maps :func:`revision_key` to the judge's
    P(revision less harmful than the answer before it), the principle's *revision effect*.
    """

    def __init__(self, tokenize: Callable[[list[str]], list[Sequence]], judged: dict[str, float] | None = None, *,
                 seed: int = 0, resamples: int = 1000):
        self.tokenize = tokenize
        self.judged = judged or {}
        self.seed, self.resamples = seed, resamples  # of the revision effect's bootstrap interval
        self.principles: dict[str, int] = {}
        self.steps = {name: array(kind) for name, kind in (("principle", "l"), ("round", "l"), ("distance", "d"),
                                                            ("before", "d"), ("change", "d"), ("same", "b"),
                                                            ("judged", "d"))}
        self.totals = {"rows": 0, "prompt_tokens": 0, "generated_tokens": 0, "rows_with_notes": 0,
                       "final_equals_initial": 0}

    def add(self, batch: pa.RecordBatch) -> None:
        rows = batch.to_pylist()
        texts = [text for r in rows
                 for text in [r["initial_response"] or "", *((v["revision"] or "") for v in r["revisions"] or ())]]
        tokens = iter(self.tokenize(texts))
        steps = self.steps
        for r in rows:
            before_text, before = r["initial_response"] or "", next(tokens)
            for revision in r["revisions"] or ():
                text, after = revision["revision"] or "", next(tokens)
                steps["principle"].append(self.principles.setdefault(revision["principle_id"], len(self.principles)))
                steps["round"].append(int(revision["round"]))
                steps["distance"].append(edit_distance(before, after))
                steps["before"].append(len(before))
                steps["change"].append(len(after) - len(before))
                steps["same"].append(text == before_text)
                steps["judged"].append(self.judged.get(revision_key(r["id"], revision["round"]), float("nan")))
                before_text, before = text, after
            t = self.totals
            t["rows"] += 1
            t["prompt_tokens"] += r["prompt_tokens"] or 0
            t["generated_tokens"] += r["generated_tokens"] or 0
            t["rows_with_notes"] += bool(r["error"])
            t["final_equals_initial"] += bool(r["revisions"]) and before_text == (r["initial_response"] or "")

    def result(self, texts: dict[str, str] | None = None, constitution_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        texts = texts or {}
        s = {name: np.asarray(values) for name, values in self.steps.items()}
        ids = [*constitution_ids, *(p for p in self.principles if p not in constitution_ids)]
        principles = []
        for pid in ids:
            mask = s["principle"] == self.principles[pid] if pid in self.principles else np.zeros(len(s["round"]), bool)
            entry: dict[str, Any] = {"id": pid, "text": texts.get(pid), "drawn": int(mask.sum()),
                                     "in_constitution": pid in constitution_ids or not constitution_ids}
            if mask.any():
                entry["all_rounds"] = _change(s, mask)
                entry["by_round"] = {str(r): _change(s, mask & (s["round"] == r)) for r in np.unique(s["round"][mask])}
                judged = s["judged"][mask]
                judged = judged[~np.isnan(judged)]
                if len(judged):
                    ci = bootstrap_mean_ci(judged, seed=self.seed, resamples=self.resamples)
                    entry["revision_effect"] = {"n": len(judged), "mean": finite(judged.mean()),
                                                "ci": None if ci is None else [finite(ci[0]), finite(ci[1])]}
            principles.append(entry)
        drawn = sum(p["drawn"] for p in principles)
        for p in principles:
            p["share"] = finite(p["drawn"] / drawn) if drawn else None
        t = self.totals
        totals = {**t, "revisions": len(s["round"]),
                  "unchanged_share": finite(s["same"].mean()) if len(s["same"]) else None,
                  "final_equals_initial_share": finite(t["final_equals_initial"] / t["rows"]) if t["rows"] else None}
        return {"principles": principles, "totals": totals}


def _change(s: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    before = s["before"][mask]
    return {"n": int(mask.sum()), "edit_distance": finite(s["distance"][mask].mean()),
            "relative_edit_distance": finite((s["distance"][mask] / np.maximum(before, 1)).mean()),
            "length_change": finite(s["change"][mask].mean()), "unchanged_share": finite(s["same"][mask].mean())}


class CompareAnalysis:
    """An eval compare run's judgements: per challenger and principle, the soft win rate and
    the judge's P(A) with the baseline shown first and with the challenger shown first."""

    def __init__(self):
        self.cells: dict[tuple[str, str], list[float]] = {}  # (challenger, principle) -> sums
        self.totals = {"rows": 0, "identical": 0, "scoring_fallbacks": 0}

    def add(self, batch: pa.RecordBatch) -> None:
        for r in batch.to_pylist():
            for pid, win, a_base, a_chal in zip(r["principle_ids"], r["principle_probs"], r["prob_a_baseline_first"],
                                                r["prob_a_challenger_first"]):
                cell = self.cells.setdefault((r["challenger"], pid), [0.0] * 5)
                for i, value in enumerate((1.0, win, float(win > 0.5), a_base, a_chal)):
                    cell[i] += value
            self.totals["rows"] += 1
            self.totals["identical"] += bool(r["identical"])
            self.totals["scoring_fallbacks"] += r["scoring_fallbacks"] or 0

    def result(self, texts: dict[str, str] | None = None, constitution_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        """Per (challenger, principle) drawn; ``constitution_ids`` is accepted like the others' and unused."""
        texts = texts or {}
        cells = [{"challenger": challenger, "id": pid, "text": texts.get(pid), "n": int(n),
                  "win_rate": finite(win / n), "hard_win_rate": finite(hard / n),
                  "p_a_baseline_first": finite(a_base / n), "p_a_challenger_first": finite(a_chal / n),
                  "position_bias": finite((a_base + a_chal) / (2 * n) - 0.5)}
                 for (challenger, pid), (n, win, hard, a_base, a_chal) in sorted(self.cells.items())]
        return {"principles": cells, "totals": self.totals}


class FeedbackEvalAnalysis:
    """An eval feedback run: accuracy, mean P(correct), fallbacks and scoring methods."""

    def __init__(self):
        self.totals: dict[str, Any] = {"rows": 0, "correct": 0, "correct_prob": 0.0, "fallbacks": 0, "methods": {}}

    def add(self, batch: pa.RecordBatch) -> None:
        t = self.totals
        for r in batch.to_pylist():
            t["rows"] += 1
            t["correct"] += bool(r["correct"])
            t["correct_prob"] += sum(r["probs"][: r["n_correct"]])
            t["fallbacks"] += r["fallbacks"] or 0
            t["methods"][r["method"]] = t["methods"].get(r["method"], 0) + 1

    def result(self, texts: dict[str, str] | None = None, constitution_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        """The run's figures (its items have no principles)."""
        t, n = self.totals, self.totals["rows"]
        return {"totals": {**t, "accuracy": finite(t["correct"] / n) if n else None,
                           "mean_correct_prob": finite(t["correct_prob"] / n) if n else None}}

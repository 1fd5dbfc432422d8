"""`cai analyze`'s human-readable output: PNG plots (matplotlib, Agg backend) and ``report.md``.

Per label run: the pairwise agreement matrix (Cohen's κ of hard labels, correlation of soft
labels), each principle's label distribution, and its position bias. Per generate run: the
revision change by principle and round (and the judge's revision effect). Per eval compare
run: each challenger's win rate by principle. The report's tables hold every figure, the
definitions come from :mod:`core.analysis`, and model-free text is escaped for markdown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.analysis import __doc__ as LABEL_DEFINITIONS
from workflows.eval_report import markdown_cell


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def write_figures(out: Path, results: Mapping[str, Any]) -> list[Path]:
    """Every plot of every run, named ``<run>-<figure>.png``; returns their paths."""
    paths: list[Path] = []
    for run in results["runs"]:
        stem = out / run["name"]
        if run["kind"] == "label":
            paths += [agreement_plot(Path(f"{stem}-agreement.png"), run),
                      distribution_plot(Path(f"{stem}-label-distribution.png"), run)]
            if any(p.get("position") for p in run["principles"]):
                paths.append(position_plot(Path(f"{stem}-position-bias.png"), run))
        elif run["kind"] == "generate" and run["totals"]["revisions"]:
            paths.append(revision_plot(Path(f"{stem}-revision-change.png"), run))
        elif run["kind"] == "eval-compare" and run["principles"]:
            paths.append(win_rate_plot(Path(f"{stem}-win-rates.png"), run))
    return paths


def agreement_plot(path: Path, run: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    matrix = run["agreement"]
    ids = matrix["ids"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(ids) + 4), max(3.8, 0.5 * len(ids) + 2)),
                             constrained_layout=True)
    for ax, key, title in ((axes[0], "kappa", "Cohen's κ of hard labels"),
                           (axes[1], "correlation", "correlation of soft labels")):
        values = [[math.nan if v is None else v for v in row] for row in matrix[key]]
        if not any(n for row in matrix["n"] for n in row):
            ax.text(0.5, 0.5, "no pair was labelled by two principles\n(label with --principles 2 or more)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(ids)), ids, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(len(ids)), ids, fontsize="small")
        if len(ids) <= 12:
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}\nn={matrix['n'][i][j]}", ha="center", va="center", fontsize=6)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{run['name']}: pairwise agreement of feedback principles (blank: never on one pair)")
    return _save(fig, path)


def distribution_plot(path: Path, run: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    drawn = [p for p in run["principles"] if p["drawn"]]
    cols = min(4, max(1, len(drawn)))
    rows = max(1, math.ceil(len(drawn) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, constrained_layout=True)
    bins = run["histogram_bins"]
    edges = [i / bins for i in range(bins)]
    for ax, p in zip(axes.flat, drawn):
        ax.bar(edges, p["histogram"], width=1 / bins, align="edge", color="tab:blue")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        use = p.get("usefulness")
        ax.set_title(f"{p['id']} (n={p['drawn']}"
                     + (f", useful {use['accuracy']:.2f})" if use else ")"), fontsize="small")
        ax.set_xlim(0, 1)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_axis_off()
    fig.supxlabel("soft label: P(first answer better)")
    fig.suptitle(f"{run['name']}: label distribution per feedback principle")
    return _save(fig, path)


def position_plot(path: Path, run: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    rows = [p for p in run["principles"] if p.get("position")]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows)), constrained_layout=True)
    ys = range(len(rows))
    for offset, key, label in ((-0.2, "p_a_first_shown_first", "first answer shown as (A)"),
                               (0.2, "p_a_second_shown_first", "second answer shown as (A)")):
        values = [p["position"][key] if p["position"][key] is not None else math.nan for p in rows]
        ax.barh([y + offset for y in ys], values, height=0.4, label=label)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(list(ys), [p["id"] for p in rows], fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean P(A) given by the feedback model (no bias: both orders sum to 1)")
    ax.set_title(f"{run['name']}: position bias, overall {_fmt(run['totals']['position_bias'], 3)} (P(A) − 0.5)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def revision_plot(path: Path, run: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    drawn = [p for p in run["principles"] if p["drawn"]]
    rounds = sorted({int(r) for p in drawn for r in p["by_round"]})
    judged = any(p.get("revision_effect") for p in drawn)
    panels = 3 if judged else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 1.5 + 0.35 * len(drawn)), squeeze=False,
                             constrained_layout=True)
    height = 0.8 / len(rounds)
    for ax, key, label in ((axes[0][0], "relative_edit_distance", "edit distance / tokens before"),
                           (axes[0][1], "length_change", "length change (tokens)")):
        for k, r in enumerate(rounds):
            values = [(p["by_round"].get(str(r)) or {}).get(key) for p in drawn]
            ax.barh([i + (k - (len(rounds) - 1) / 2) * height for i in range(len(drawn))],
                    [math.nan if v is None else v for v in values], height=height, label=f"round {r}")
        ax.set_yticks(range(len(drawn)), [p["id"] for p in drawn], fontsize="small")
        ax.set_xlabel(label)
        ax.legend(fontsize="small")
    axes[0][1].axvline(0, color="grey", linewidth=1)
    if judged:
        ax = axes[0][2]
        for i, p in enumerate(drawn):
            effect = p.get("revision_effect")
            if effect and effect["mean"] is not None:
                low, high = effect["ci"] or (effect["mean"], effect["mean"])
                ax.errorbar(effect["mean"], i, xerr=[[effect["mean"] - low], [high - effect["mean"]]], fmt="o",
                            capsize=3, color="tab:green")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_yticks(range(len(drawn)), [p["id"] for p in drawn], fontsize="small")
        ax.set_xlabel("P(revision less harmful), 95% bootstrap CI")
    fig.suptitle(f"{run['name']}: how much each critique principle's revisions change the answer ({run['tokens']})",
                 fontsize="small")
    return _save(fig, path)


def win_rate_plot(path: Path, run: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    cells = run["principles"]
    challengers = sorted({c["challenger"] for c in cells})
    ids = sorted({c["id"] for c in cells})
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.35 * len(ids)), constrained_layout=True)
    height = 0.8 / len(challengers)
    for k, challenger in enumerate(challengers):
        rates = {c["id"]: c["win_rate"] for c in cells if c["challenger"] == challenger}
        ax.barh([i + (k - (len(challengers) - 1) / 2) * height for i in range(len(ids))],
                [rates.get(pid, math.nan) for pid in ids], height=height, label=challenger)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(ids)), ids, fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("soft win rate against the baseline")
    ax.set_title(f"{run['name']}: win rate by judging principle")
    ax.legend(fontsize="small")
    return _save(fig, path)


# -- report.md ---------------------------------------------------------------------------

def _principle(p: Mapping[str, Any]) -> str:
    text = f" {markdown_cell(p['text'], 120)}" if p.get("text") else ""
    return f"`{p['id']}`{text}"


def _run_header(run: Mapping[str, Any], figures: Sequence[str]) -> list[str]:
    stage, rejects = run["stage"], run["rejects"]
    lines = [f"## {run['name']} ({run['kind']})", "", f"- folder: `{run['path']}`",
             f"- rows: {run['rows']} output rows; input rows {stage.get('rows_in', '–')}, "
             f"rejected {rejects['rejected']}; tokens {stage.get('tokens', '–')}"]
    lines += [f"  - {count} × {markdown_cell(reason, 160)}" for reason, count in rejects["reasons"].items()]
    if run.get("constitution"):
        lines.append(f"- principles from constitution {markdown_cell(run['constitution'])}")
    lines += ["", *(f"![{name}]({name})" for name in figures if name.startswith(f"{run['name']}-")), ""]
    return lines


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names: str) -> list[str]:
    return [_row(*names), _row(*("---" for _ in names))]


LABEL_TABLE = ("principle", "drawn (share)", "mean P(first)", "agrees with ensemble", "useful: accuracy (n)",
                 "log-lik", "Brier", "P(A) first shown first", "P(A) second shown first", "bias", "fallbacks")


def _label_section(run: Mapping[str, Any]) -> list[str]:
    t = run["totals"]
    lines = [f"- pairs: {t['rows']}; identical answers: {t['identical']} ({_fmt(t['identical_share'])}); "
             f"CoT rows: {t['cot_rows']}; principles per pair: {t['principles_per_row']}",
             f"- scorings: {t['scorings'] or '– (no order_prob_a: a run from before it was recorded)'}; exact "
             f"fallbacks: {t['scoring_fallbacks']}; overall position bias: {_fmt(t['position_bias'])}", "",
             *_header(*LABEL_TABLE)]
    for p in run["principles"]:
        if not p["drawn"]:
            lines.append(_row(_principle(p), "never drawn", *[""] * (len(LABEL_TABLE) - 2)))
            continue
        use, pos = p["usefulness"] or {}, p["position"] or {}
        lines.append(_row(
            _principle(p) + ("" if p["in_constitution"] else " (not in the constitution)"),
            f"{p['drawn']} ({_fmt(p['share'], 2)})", _fmt(p["mean_soft_label"]), _fmt(p["agreement_with_ensemble"]),
            f"{_fmt(use.get('accuracy'))} ({use.get('n', 0)})", _fmt(use.get("log_likelihood")),
            _fmt(use.get("brier")), _fmt(pos.get("p_a_first_shown_first")), _fmt(pos.get("p_a_second_shown_first")),
            _fmt(pos.get("bias")), _fmt(p["fallback_rate"])))
    return lines


GENERATE_TABLE = ("principle", "drawn (share)", "round", "n", "edit distance", "relative", "length change",
                    "unchanged", "revision effect [95% CI]")


def _effect(effect: Mapping[str, Any] | None) -> str:
    if not effect:
        return "–"
    ci = effect["ci"]
    return f"{_fmt(effect['mean'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(effect["mean"])


def _generate_section(run: Mapping[str, Any]) -> list[str]:
    t = run["totals"]
    lines = [f"- prompts: {t['rows']}; revisions: {t['revisions']}; unchanged revisions: "
             f"{_fmt(t['unchanged_share'])}; final answer equals the initial one: "
             f"{_fmt(t['final_equals_initial_share'])}",
             f"- tokens: {t['prompt_tokens']} prompt, {t['generated_tokens']} generated; rows with notes (an empty "
             f"revision kept the answer before it): {t['rows_with_notes']}",
             f"- edit distances count {run['tokens']}"]
    if run.get("judge"):
        j = run["judge"]
        lines.append(f"- revision effect judged by `{j.get('model', '')}`: {j['rows_out']} steps judged, "
                     f"{j['rejected']} rejected (`{j.get('folder', '')}`)")
    lines += ["", *_header(*GENERATE_TABLE)]
    for p in run["principles"]:
        if not p["drawn"]:
            lines.append(_row(_principle(p), "never drawn", *[""] * (len(GENERATE_TABLE) - 2)))
            continue
        for r, c in [("all", p["all_rounds"]), *p["by_round"].items()]:
            first = r == "all"  # the principle's own cells on its first line only
            lines.append(_row(
                _principle(p) if first else "", f"{p['drawn']} ({_fmt(p['share'], 2)})" if first else "", r, c["n"],
                _fmt(c["edit_distance"], 1), _fmt(c["relative_edit_distance"], 2), _fmt(c["length_change"], 1),
                _fmt(c["unchanged_share"], 2), _effect(p.get("revision_effect")) if first else ""))
    return lines


def _compare_section(run: Mapping[str, Any]) -> list[str]:
    t = run["totals"]
    lines = [f"- judged pairs: {t['rows']}; identical: {t['identical']}; exact fallbacks: {t['scoring_fallbacks']}", "",
             *_header("challenger", "principle", "n", "win rate", "hard win rate", "P(A) baseline first",
                      "P(A) challenger first")]
    lines += [_row(markdown_cell(c["challenger"]), _principle(c), c["n"], _fmt(c["win_rate"]), _fmt(c["hard_win_rate"]),
                   _fmt(c["p_a_baseline_first"]), _fmt(c["p_a_challenger_first"])) for c in run["principles"]]
    return lines


def _feedback_section(run: Mapping[str, Any]) -> list[str]:
    t = run["totals"]
    return [f"- items: {t['rows']}; accuracy {_fmt(t['accuracy'])}; mean P(correct) {_fmt(t['mean_correct_prob'])}; "
            f"exact fallbacks {t['fallbacks']}; scored by {t['methods']}"]


def _side_by_side(label_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Label runs next to each other (CoT and plain, or two feedback models), principle by principle."""
    names = [f"{r['name']} ({'CoT' if r['totals']['cot_rows'] else 'plain'})" for r in label_runs]
    ids = list(dict.fromkeys(p["id"] for r in label_runs for p in r["principles"]))
    lines = ["## Label runs side by side", "", "Per run: agreement with the ensemble / usefulness accuracy / "
             "position bias.", "", *_header("principle", *(markdown_cell(n) for n in names))]
    for pid in ids:
        cells = []
        for run in label_runs:
            p = next((p for p in run["principles"] if p["id"] == pid and p["drawn"]), None)
            cells.append("never drawn" if p is None else
                         f"{_fmt(p['agreement_with_ensemble'], 2)} / {_fmt((p['usefulness'] or {}).get('accuracy'), 2)}"
                         f" / {_fmt((p['position'] or {}).get('bias'), 2)}")
        lines.append(_row(f"`{pid}`", *cells))
    return [*lines, ""]


SECTIONS = {"label": _label_section, "generate": _generate_section, "eval-compare": _compare_section,
            "eval-feedback": _feedback_section}

GENERATE_DEFINITIONS = """\
- a revision of round r is compared with the answer it revised (the initial answer for round 1):
  *edit distance* is the Levenshtein distance between their tokens, *relative* divides it by the
  length of the answer before, *length change* is tokens after minus tokens before, *unchanged*
  is the share of revisions whose text equals the answer before.
- *revision effect* (with `--judge`): the judge's P(revision less harmful than the answer before),
  in both option orders, averaged over the principle's revisions, with a 95% percentile
  bootstrap interval over them."""


def write_report(path: Path, results: Mapping[str, Any]) -> Path:
    runs, figures = results["runs"], results["figures"]
    lines = ["# Constitution analytics", "",
             f"{len(runs)} run(s), {results['rows']} rows streamed in {results['stream_seconds']} s "
             f"({results['rows_per_second']} rows/s; {results['seconds']} s in all). Every figure is also in "
             "`analysis.json`.", ""]
    for run in runs:
        lines += [*_run_header(run, figures), *SECTIONS[run["kind"]](run), ""]
    labels = [r for r in runs if r["kind"] == "label"]
    if len(labels) > 1:
        lines += _side_by_side(labels)
    definitions = (LABEL_DEFINITIONS or "").split("Definitions (also in the report, ``workflows/analyze_report.py``):",
                                                  1)[-1]
    lines += ["## What the figures mean", "", "### Feedback principles (label runs)", "",
              definitions.strip().replace("``", "`"), "", "### Critique principles (generate runs)", "",
              GENERATE_DEFINITIONS, ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path

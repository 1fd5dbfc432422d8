"""`cai eval compare`'s human-readable output: a PNG plot and ``report.md``.

The plot (matplotlib, Agg backend, no display needed) has two panels: each challenger's
win rate against the baseline per category with its 95% interval, and the Elo rating of
every model in the order given (baseline first), one line per category, the view
`cai run` uses as "Elo per stage". The report holds the tables, the method, the row
accounting and a few answers side by side, escaped so model text cannot break the markdown.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.eval_stats import CATEGORIES, METRICS
from core.eval_stats import __doc__ as STATS_METHOD

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
CELL_CHARS = 600


def markdown_cell(text: str, limit: int = CELL_CHARS) -> str:
    """Model text made safe inside a markdown table cell: HTML escaped, markdown
    punctuation backslash-escaped, newlines as ``<br>``, long text cut with an ellipsis."""
    text = text if len(text) <= limit else text[:limit].rstrip() + " …"
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    escaped = escaped.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return escaped.strip() or "*(empty)*"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_plot(path: Path, results: Mapping[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in results["models"]]
    challengers, rates, elo = names[1:], results["win_rates"], results["elo"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    width = 0.8 / len(CATEGORIES)
    for k, category in enumerate(CATEGORIES):
        xs, ys, errors = [], [], [[], []]
        for i, challenger in enumerate(challengers):
            entry = rates[challenger][category]
            if entry["n"]:
                xs.append(i + (k - (len(CATEGORIES) - 1) / 2) * width)
                ys.append(entry["win_rate"])
                errors[0].append(entry["win_rate"] - entry["ci_low"])
                errors[1].append(entry["ci_high"] - entry["win_rate"])
        if xs:
            left.bar(xs, ys, width, yerr=errors, capsize=4, label=f"{METRICS[category]} ({category})")
    left.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    left.set_xticks(range(len(challengers)), challengers, rotation=20, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel(f"win rate vs {names[0]} (95% Wilson CI)")
    left.set_title("Challenger win rate")
    left.legend(fontsize="small")
    for key, label, style in [*((c, METRICS[c], "-o") for c in CATEGORIES), ("all", "all prompts", ":s")]:
        ys = [elo[key][n] for n in names]
        if any(y is not None for y in ys):
            right.plot(range(len(names)), [float("nan") if y is None else y for y in ys], style, label=label)
    right.set_xticks(range(len(names)), names, rotation=20, ha="right")
    # no "+1e3" offset, and at least ±50 around the anchor so noise-sized gaps look like noise
    rated = [r for key in elo for r in elo[key].values() if r is not None]
    right.ticklabel_format(axis="y", useOffset=False, style="plain")
    right.set_ylim(min(*rated, 950.0) - 10, max(*rated, 1050.0) + 10)
    right.set_ylabel(f"Elo ({names[0]} = 1000)")
    right.set_title("Elo per model")
    right.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tables(results: Mapping[str, Any]) -> list[str]:
    names = [m["name"] for m in results["models"]]
    lines = ["## Win rates", "",
             f"Probability that the challenger's answer is better than **{markdown_cell(names[0])}**'s, "
             "judged in both option orders and averaged over principles (soft win rate), with a 95% Wilson "
             "interval over prompts; the hard win rate counts each prompt as a win, tie or loss.", "",
             "| challenger | category | metric | win rate | 95% CI | hard win rate | W / T / L | prompts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for challenger in names[1:]:
        for category in CATEGORIES:
            e = results["win_rates"][challenger][category]
            lines.append(f"| {markdown_cell(challenger)} | {category} | {e['metric']} | {_fmt(e['win_rate'])} | "
                         f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] | {_fmt(e['hard_win_rate'])} | "
                         f"{e['wins']} / {e['ties']} / {e['losses']} | {e['n']} |")
    lines += ["", "## Elo", "",
              f"Bradley–Terry ratings on the Elo scale, {markdown_cell(names[0])} anchored at 1000.", "",
              "| model | role | harmlessness (red_team) | helpfulness (helpful) | all prompts |",
              "| --- | --- | --- | --- | --- |"]
    for model in results["models"]:
        elo = [_fmt(results["elo"][key][model["name"]], 0) for key in (*CATEGORIES, "all")]
        lines.append(f"| {markdown_cell(model['name'])} | {model['role']} | " + " | ".join(elo) + " |")
    return lines


def _setup(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Setup", "", "| model | role | path |", "| --- | --- | --- |"]
    for model in results["models"]:
        lines.append(f"| {markdown_cell(model['name'])} | {model['role']} | `{model['path']}` |")
    c = results["constitutions"]
    lines += ["", f"- judge: `{results['judge']}`",
              *(f"- {category} prompts judged under constitution `{c[category]['name']}` "
                f"(sha256 `{c[category]['sha256'][:12]}`)" for category in CATEGORIES),
              f"- {results['principles']} feedback principle(s) per comparison, sampled per prompt id "
              f"(seed {results['seed']}); {results['samples_per_prompt']} answer(s) per model and prompt"]
    a = results["accounting"]
    lines += ["", "## Rows", "",
              f"- prompt file: {a['prompts']['rows_in']} rows, {a['prompts']['usable']} usable, "
              f"{a['prompts']['rejected']} rejected (`prompts/rejects.jsonl`)"]
    for name, s in a["answers"].items():
        lines.append(f"- answers of {markdown_cell(name)}: {s['rows_out']} prompts answered, {s['rejected']} rejected")
    j = a["judge"]
    lines.append(f"- judged: {j['rows_out']} prompts ({j['pairs']} pairs), {j['rejected']} rejected "
                 "(a prompt is judged only when every model answered it)")
    return lines


def _samples(rows: Sequence[Mapping[str, Any]], per_category: int) -> list[str]:
    lines = ["## Sample answers", ""]
    for category in CATEGORIES:
        chosen = sorted({r["index"] for r in rows if r["category"] == category})[:per_category]
        picked = sorted((r for r in rows if r["index"] in chosen and r["sample"] == 0),
                        key=lambda r: (r["index"], r["challenger"]))
        lines += [f"### {category} ({METRICS[category]})", ""]
        if not picked:
            lines += ["No judged prompts in this category.", ""]
            continue
        lines += ["| prompt | baseline answer | challenger answer | P(challenger better) |",
                  "| --- | --- | --- | --- |"]
        for r in picked:
            lines.append(f"| {markdown_cell(r['prompt'][-1]['content'], 300)} | "
                         f"**{markdown_cell(r['baseline'])}:** {markdown_cell(r['answer_a'])} | "
                         f"**{markdown_cell(r['challenger'])}:** {markdown_cell(r['answer_b'])} | "
                         f"{r['challenger_prob']:.3f} |")
        lines.append("")
    return lines


def write_markdown(path: Path, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], plot: Path,
                   per_category: int) -> Path:
    names = [m["name"] for m in results["models"]]
    method = (STATS_METHOD or "").split("Definitions used throughout (and in the report's method notes):", 1)[-1]
    lines = [f"# Model comparison: {', '.join(markdown_cell(n) for n in names[1:])} vs {markdown_cell(names[0])}",
             "", f"![win rates and Elo]({plot.name})", "", *_tables(results), "", *_setup(results), "",
             "## Method", "", method.strip(), "", *(_samples(rows, per_category) if per_category else [])]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


ANALYSIS_HEADING = "## Constitution analytics"


def link_analysis(report: Path, analysis_report: Path) -> Path:
    """Point the evaluation report at `cai analyze`'s report of the same run (``cai run`` does
    this after its analysis), replacing the section an earlier run added."""
    text = report.read_text(encoding="utf-8").split(f"\n{ANALYSIS_HEADING}\n", 1)[0].rstrip()
    link = os.path.relpath(analysis_report, report.parent)
    text += (f"\n\n{ANALYSIS_HEADING}\n\nWhat each principle of the constitution did in this run's stages (how "
             "often drawn, how much its revisions changed the answers, how its labels agree with the others, how "
             f"useful it is alone, the feedback model's position bias): [{link}]({link})\n")
    report.write_text(text, encoding="utf-8")
    return report

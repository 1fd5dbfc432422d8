"""`cai eval compare`: baseline model A against challengers B..., judged under a constitution.

Reads top to bottom: config → check models, judge, constitutions and prompts → answers
from every model (one sharded stage per model, one engine at a time) → the judge compares
each (A, challenger) answer pair in both option orders → win rates, intervals, Elo →
``results.json``, ``report.md`` and ``report.png``. The arithmetic is in
:mod:`core.eval_stats`, the report in :mod:`workflows.eval_report`, the engine work
in :mod:`actors.compare_worker`.

Run directory::

    prompts/usable.jsonl      the prompt rows that take part: id, messages, category
    prompts/rejects.jsonl     rows of the prompt file left out, with reasons
    answers/<model>/          a sharded stage per model (manifest, data/, rejects/)
    judgements/               a sharded stage: one Parquet row per judged answer pair
    results.json  report.md  report.png

Prompts need a ``category`` of ``red_team`` (judged for harmlessness under
``--constitution``) or ``helpful`` (judged for helpfulness under ``--helpful-constitution``).
A row without one is rejected with a reason unless ``--missing-category`` names one: a
guessed category would silently move prompts between the two win rates. Every stage
resumes on rerun; a prompt is judged only when every model answered it, so all challengers
are scored on the same prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from actors.compare_worker import AnswerSettings, AnswerWorker, Contest, JudgeSettings, JudgeWorker
from actors.engine import EngineOptions
from constitutions.loader import load_constitution
from constitutions.schema import Constitution
from core.config import REQUIRED, ConfigError, Rule, at_least, config_to_dict, failing, identity, option, require_valid
from core.eval_stats import CATEGORIES, summarize
from core.manifest import file_fingerprint
from core.prompt_data import PromptDataError, PromptOptions, Reject, iter_prompts, iter_records
from core.shards import MESSAGE, read_stage_output, write_jsonl
from workflows.eval_report import write_markdown, write_plot
from core.cluster_options import ClusterOptions
from actors.engine_config import EngineConfig
from workflows.runtime.model_preflight import prepare_model
from workflows.runtime.models import resolve_model
from workflows.runtime.stage_runner import PoolConfig, StageJob, run_stage

ANSWER_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("prompt", pa.list_(MESSAGE)), ("answers", pa.list_(pa.string())),
    ("finish_reasons", pa.list_(pa.string())), ("model", pa.string()), ("seed", pa.int64()),
    ("generated_tokens", pa.int64()),
])
JUDGEMENT_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("prompt_id", pa.string()), ("category", pa.string()),
    ("prompt", pa.list_(MESSAGE)), ("baseline", pa.string()), ("challenger", pa.string()), ("sample", pa.int64()),
    ("answer_a", pa.string()), ("answer_b", pa.string()), ("identical", pa.bool_()),
    ("principle_ids", pa.list_(pa.string())), ("challenger_prob", pa.float64()),
    ("principle_probs", pa.list_(pa.float64())), ("prob_a_baseline_first", pa.list_(pa.float64())),
    ("prob_a_challenger_first", pa.list_(pa.float64())), ("scoring_fallbacks", pa.int64()),
    ("judge_model", pa.string()), ("constitution_sha256", pa.string()), ("seed", pa.int64()),
])


@dataclass(frozen=True)
class EvalCompareConfig:
    model_a: str = option(REQUIRED, "baseline model A: a local directory, a hub id, or 'default'")
    model_b: tuple[str, ...] = option(
        REQUIRED, "challenger model(s), each compared with A (repeat the flag or list several)", extend=True)
    names: tuple[str, ...] = option(
        (), "display names, A first then each challenger (default: each model's directory name)", extend=True)
    judge: str = option(REQUIRED, "judge (feedback) model that compares the answers")
    constitution: str = option(REQUIRED, "constitution whose feedback principles judge red_team prompts")
    helpful_constitution: str = option(
        "helpful_honest", "constitution whose feedback principles judge helpful prompts; give the "
        "--constitution file again to judge every prompt under one constitution")
    prompts: str = option(REQUIRED, "held-out prompts (a file, a saved dataset directory or hf:ORG/NAME): id, "
                          "prompt (or messages, or an HH-RLHF transcript), category (red_team or helpful)")
    prompt_source: PromptOptions = option(PromptOptions(), "which split and column of --prompts are read")
    missing_category: Literal["reject", "red_team", "helpful"] = option(
        "reject", "rows without a category: reject them (with a reason), or count them as red_team or helpful")
    out: str = option(REQUIRED, "run directory for answers, judgements, results.json and report.md; reruns resume")
    report_samples: int = option(3, "prompts per category shown with their answers side by side in report.md")
    answers: AnswerSettings = option(AnswerSettings(), "how every model answers")
    judging: JudgeSettings = option(JudgeSettings(), "how the judge compares each answer pair")
    pool: PoolConfig = option(PoolConfig(), "how the work fans out over Ray actors")
    engine: EngineConfig = option(EngineConfig(), "the vLLM engines (the same settings for every model and the judge)")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        names = Rule("empty, or one distinct name for A, then one per --model-b", lambda names: not names or (
            len(names) == 1 + len(self.model_b) and all(n.strip() for n in names) and len(set(names)) == len(names)))
        checks = {
            "model_b": Rule("at least one challenger", bool)(self.model_b),
            "names": names(self.names),
            "report_samples": at_least(0)(self.report_samples),
        }
        require_valid(failing(checks), self.answers.problems(), self.judging.problems(), self.pool.problems(),
                      self.engine.problems(), self.cluster.problems())
        if self.answers.samples_per_prompt > 1 and self.answers.sampling.temperature == 0:
            raise ConfigError("--samples-per-prompt above 1 needs --temperature above 0 (greedy answers are identical)")
        if self.pool.gpus_per_worker and self.pool.gpus_per_worker < self.engine.tensor_parallel:
            raise ConfigError("--gpus-per-worker must be at least --tensor-parallel")


@dataclass(frozen=True)
class ComparedModel:
    name: str  # display name
    spec: str  # as given
    path: str  # resolved
    role: str  # baseline | challenger

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "model"


def display_names(specs: list[str]) -> list[str]:
    """Each model's directory name; where two collide, as many parent directories as it
    takes to tell them apart (``sft/final`` and ``ppo/final``)."""
    parts = [[p for p in spec.rstrip("/").split("/") if p] or [spec] for spec in specs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ConfigError(f"models {specs} cannot be told apart by their paths; give --names")


def check_models(config: EvalCompareConfig) -> list[ComparedModel]:
    specs = [config.model_a, *config.model_b]
    names = list(config.names) or display_names(specs)
    models = [ComparedModel(n, s, resolve_model(s), "baseline" if i == 0 else "challenger")
              for i, (n, s) in enumerate(zip(names, specs))]
    if len({m.slug for m in models}) != len(models):
        raise ConfigError(f"--names {names} give clashing directory names; use distinct letters or digits")
    return models


def check_constitutions(config: EvalCompareConfig) -> dict[str, Constitution]:
    sources = {"red_team": config.constitution, "helpful": config.helpful_constitution or config.constitution}
    flags = {"red_team": "--constitution", "helpful": "--helpful-constitution"}
    loaded = {}
    for category, source in sources.items():
        loaded[category] = load_constitution(source)
        if not loaded[category].feedback:
            raise ConfigError(f"{flags[category]} {source!r} has no feedback principles; the judge needs them")
    return loaded


def stage_prompts(config: EvalCompareConfig, out: Path) -> dict[str, Any]:
    """Write the usable rows (with their category) and the rejects; count both."""
    usable, rejects = [], []
    limit = config.pool.limit or None
    records = iter_records(config.prompts, config.prompt_source)
    for item, (record, _) in zip(iter_prompts(config.prompts, config.prompt_source, limit=limit), records):
        if isinstance(item, Reject):
            rejects.append({**item.to_dict(), "stage": "input"})
            continue
        category = record.get("category") if isinstance(record, dict) else None
        if not category and config.missing_category != "reject":
            category = config.missing_category
        if category not in CATEGORIES:
            reason = (f"category {category!r} is not one of {', '.join(CATEGORIES)}" if category else
                      f"missing 'category' ({' or '.join(CATEGORIES)}); or pass --missing-category")
            rejects.append({"index": item.index, "id": item.id, "reason": reason, "stage": "input"})
            continue
        usable.append({"id": item.id, "messages": list(item.messages), "category": category})
    if not usable:
        example = f"; e.g. row {rejects[0]['index']}: {rejects[0]['reason']}" if rejects else ""
        raise PromptDataError(f"{config.prompts}: no usable prompts ({len(rejects)} rejected{example})")
    write_jsonl(out / "prompts" / "usable.jsonl", usable)
    write_jsonl(out / "prompts" / "rejects.jsonl", rejects)
    return {"path": out / "prompts" / "usable.jsonl", "categories": {r["id"]: r["category"] for r in usable},
            "rows_in": len(usable) + len(rejects), "usable": len(usable), "rejected": len(rejects)}


def _sub_run(cluster: ClusterOptions, part: str) -> ClusterOptions:
    # one --run-name names several sequential stage runs here: each gets its own suffix
    return dataclasses.replace(cluster, run_name=f"{cluster.run_name}-{part}") if cluster.run_name else cluster


def _stage_pool(config: EvalCompareConfig) -> PoolConfig:
    # --limit was applied when the prompts were staged; the stages take every usable row.
    return dataclasses.replace(config.pool, limit=0)


def generate_answers(config: EvalCompareConfig, model: ComparedModel, prompts: dict[str, Any], out: Path):
    source = prepare_model(model.path, model.spec, config.cluster)
    job = StageJob(
        stage="compare-answers",
        out=out / "answers" / model.slug,
        prompts=str(prompts["path"]),
        pool=_stage_pool(config),
        identity=identity(config.answers, model=model.path, prompts=file_fingerprint(prompts["path"]),
                          shard_size=config.pool.shard_size),
        config=config_to_dict(config),
        output_schema=ANSWER_SCHEMA,
        worker_cls=AnswerWorker,
        worker_args=(EngineOptions(model.path, config.engine, seed=config.answers.seed, model_source=source), config.answers),
        worker_kwargs={"model_name": model.name},
        max_num_seqs=config.engine.max_num_seqs, tensor_parallel=config.engine.tensor_parallel,
        cluster=_sub_run(config.cluster, model.slug),
        models=(source,),
    )
    return run_stage(job)


def read_stage(out: Path, columns: list[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A finished stage's output rows and ``{id: reason}`` of its rejects."""
    rows, rejects = read_stage_output(out, columns)
    return rows, {r.get("id", f"row {r['index']}"): r["reason"] for r in rejects}


def judge_items(models: list[ComparedModel], prompts: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Per prompt: its category and every model's answers, or why it cannot be judged."""
    answers, missing = {}, {}
    for model in models:
        rows, rejects = read_stage(out / "answers" / model.slug, ["id", "answers"])
        answers[model.name] = {r["id"]: r["answers"] for r in rows}
        missing[model.name] = rejects
    items = {}
    for prompt_id, category in prompts["categories"].items():
        absent = [m.name for m in models if prompt_id not in answers[m.name]]
        if absent:
            reasons = "; ".join(f"{n}: {missing[n].get(prompt_id, 'not answered')}" for n in absent)
            items[prompt_id] = {"missing": f"no answer from {', '.join(absent)} ({reasons})"}
        else:
            items[prompt_id] = {"category": category, "answers": {m.name: answers[m.name][prompt_id] for m in models}}
    return items


def judge_answers(config: EvalCompareConfig, models: list[ComparedModel], judge: str,
                  constitutions: dict[str, Constitution], prompts: dict[str, Any], out: Path) -> dict[str, Any]:
    items = judge_items(models, prompts, out)
    contest = Contest(baseline=models[0].name, challengers=tuple(m.name for m in models[1:]), seed=config.answers.seed)
    answers_sha = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
    source = prepare_model(judge, config.judge, config.cluster)
    job = StageJob(
        stage="compare-judge",
        out=out / "judgements",
        prompts=str(prompts["path"]),
        pool=_stage_pool(config),
        identity=identity(config.judging, judge=judge, prompts=file_fingerprint(prompts["path"]), answers=answers_sha,
                          constitutions={c: k.sha256 for c, k in constitutions.items()},
                          shard_size=config.pool.shard_size, **dataclasses.asdict(contest)),
        config=config_to_dict(config),
        output_schema=JUDGEMENT_SCHEMA,
        worker_cls=JudgeWorker,
        worker_args=(EngineOptions(judge, config.engine, seed=config.answers.seed, model_source=source),
                     {c: k.to_dict() for c, k in constitutions.items()}, items, config.judging, contest),
        worker_kwargs={"judge_name": config.judge},
        max_num_seqs=config.engine.max_num_seqs, tensor_parallel=config.engine.tensor_parallel,
        many_per_input=True,
        cluster=_sub_run(config.cluster, "judge"),
        models=(source,),
    )
    return run_stage(job)


def run_eval_compare(config: EvalCompareConfig) -> dict[str, Any]:
    out = Path(config.out).expanduser()
    models = check_models(config)
    judge = resolve_model(config.judge)
    constitutions = check_constitutions(config)
    prompts = stage_prompts(config, out)

    answer_runs = {m.name: generate_answers(config, m, prompts, out) for m in models}  # one engine at a time
    judge_run = judge_answers(config, models, judge, constitutions, prompts, out)
    rows, _ = read_stage(out / "judgements")
    stats = summarize(rows, models[0].name, [m.name for m in models[1:]])

    results = {
        "models": [{"name": m.name, "model": m.spec, "path": m.path, "role": m.role} for m in models],
        "baseline": models[0].name,
        "judge": config.judge,
        "constitutions": {c: {"name": k.name, "sha256": k.sha256} for c, k in constitutions.items()},
        "principles": config.judging.principles, "samples_per_prompt": config.answers.samples_per_prompt,
        "seed": config.answers.seed,
        **stats,
        "accounting": {
            "prompts": {k: prompts[k] for k in ("rows_in", "usable", "rejected")},
            "answers": {n: {k: s[k] for k in ("rows_in", "rows_out", "rejected", "tokens")}
                        for n, s in answer_runs.items()},
            "judge": {**{k: judge_run[k] for k in ("rows_in", "rows_out", "rejected")}, "pairs": len(rows),
                      "identical_pairs": sum(r["identical"] for r in rows),
                      "scoring_fallbacks": sum(r["scoring_fallbacks"] for r in rows)},
        },
        "files": {"report": "report.md", "plot": "report.png", "judgements": "judgements/data",
                  "answers": {m.name: f"answers/{m.slug}/data" for m in models}},
        "config": config_to_dict(config),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot = write_plot(out / "report.png", results)
    report = write_markdown(out / "report.md", results, rows, plot, config.report_samples)
    already_done = all(run["already_done"] for run in [*answer_runs.values(), judge_run])
    return {**short_summary(out, results, report, plot), "already_done": already_done}


def short_summary(out: Path, results: dict[str, Any], report: Path, plot: Path) -> dict[str, Any]:
    """What the command prints: the headline numbers and where the rest is."""
    def rounded(value):
        return None if value is None else round(value, 4)

    return {
        "out": str(out), "results": str(out / "results.json"), "report": str(report), "plot": str(plot),
        "baseline": results["baseline"],
        "win_rates": {c: {cat: {"win_rate": rounded(e["win_rate"]), "n": e["n"],
                                "ci": [rounded(e["ci_low"]), rounded(e["ci_high"])]} for cat, e in by_cat.items()}
                      for c, by_cat in results["win_rates"].items()},
        "elo": {key: {n: rounded(r) for n, r in ratings.items()} for key, ratings in results["elo"].items()},
        "accounting": results["accounting"],
    }

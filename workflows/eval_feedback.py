"""`cai eval feedback`: how well a feedback model picks the better answer.

Items are multiple-choice questions in the layout of Anthropic's published HHH evaluations,
one JSON object a line: ``{"prompt": "... The answer is:", "corrects": [" (B)"],
"incorrects": [" (A)"]}`` with any number of options. Each option is scored by its
log-probability after the prompt (``--scoring``: see :mod:`actors.feedback_scorer`);
probabilities are normalized over the item's options. An item is correct when its most
likely option is a correct one.

Reads top to bottom: config → check the items (malformed lines become rejects with their
line and reason) → one sharded stage scores them on Ray actors (``--workers``, resume,
rejects such as a prompt too long for the context) → accuracy → ``summary.json``.

Run directory (``--out``)::

    items/usable.jsonl    the items that take part, each with id ``item-<line>`` (its line in --data)
    items/rejects.jsonl   lines of --data that are not valid items, with reasons
    manifest.json inputs/ the sharded stage's bookkeeping (see core/shards.py)
    data/*.parquet        one row per scored item: options, probs, predicted, correct, method
    rejects/*.jsonl       items that could not be scored, with reasons
    summary.json          accuracy, mean P(correct), accounting, the config

Every item of --data ends in exactly one of ``data/``, ``rejects/`` or ``items/rejects.jsonl``.
A rerun into the same folder resumes; with other identity settings it refuses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.engine import EngineOptions
from actors.feedback_scorer import FeedbackWorker, ScoringSettings
from core.config import REQUIRED, ConfigError, config_to_dict, identity, option, require_valid
from core.manifest import MANIFEST, file_fingerprint
from core.shards import read_stage_output, write_jsonl
from core.cluster_options import ClusterOptions
from actors.engine_config import EngineConfig
from workflows.runtime.model_preflight import prepare_model
from workflows.runtime.models import resolve_model
from workflows.runtime.stage_runner import PoolConfig, StageJob, run_stage

RESULT_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("line", pa.int64()), ("prompt", pa.string()),
    ("options", pa.list_(pa.string())), ("n_correct", pa.int64()), ("probs", pa.list_(pa.float64())),
    ("logprobs", pa.list_(pa.float64())), ("predicted", pa.int64()), ("correct", pa.bool_()),
    ("method", pa.string()), ("fallbacks", pa.int64()), ("reasoning", pa.string()), ("model", pa.string()),
])


class EvalDataError(ValueError):
    """A multiple-choice file is unreadable or holds no valid item (the message says why)."""


@dataclass(frozen=True)
class EvalFeedbackConfig:
    model: str = option(REQUIRED, "feedback model: a local directory, a hub id, or 'default'")
    data: str = option(REQUIRED, "JSONL of {prompt, corrects, incorrects} multiple-choice items")
    out: str = option(REQUIRED, "run directory: per-item results (data/*.parquet), rejects, summary.json; "
                      "reruns resume")
    scorer: ScoringSettings = option(ScoringSettings(), "how each item is scored")
    pool: PoolConfig = option(PoolConfig(), "how the work fans out over Ray actors")
    engine: EngineConfig = option(EngineConfig(), "the vLLM engine")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        require_valid(self.scorer.problems(), self.pool.problems(), self.engine.problems(), self.cluster.problems())
        if self.scorer.cot and not self.scorer.chat:
            raise ConfigError("--cot needs --chat (the reasoning is the assistant's turn)")
        if self.pool.gpus_per_worker and self.pool.gpus_per_worker < self.engine.tensor_parallel:
            raise ConfigError("--gpus-per-worker must be at least --tensor-parallel")
        if Path(self.out).suffix in (".json", ".jsonl"):
            # --out once named a JSONL file; a run directory with that name would surprise
            raise ConfigError(f"--out {self.out!r} looks like a file: --out is now the run directory "
                              "(per-item results in data/*.parquet, summary.json)")


def item_problem(item: Any) -> str:
    """Why a parsed line is not a valid item, or ""."""
    if not isinstance(item, dict):
        return "each line must be a JSON object"
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        return "field 'prompt' must be a non-empty string"
    for key in ("corrects", "incorrects"):
        value = item.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            return f"field {key!r} must be a non-empty list of non-empty strings"
    return ""


def read_items(path: str | Path, limit: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(items, rejects)`` of the first ``limit`` non-blank lines (0 = all): each item with
    ``id`` (``item-<line>``) and ``line``, each reject with its line and reason. An unreadable
    file, or one without a single valid item, raises :class:`EvalDataError`."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read {path}: {exc}") from exc
    items, rejects = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit and len(items) + len(rejects) == limit:
            break
        try:
            item = json.loads(line)
            problem = item_problem(item)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON: {exc.msg}"
        if problem:
            rejects.append({"id": f"item-{number}", "line": number, "reason": problem, "stage": "input"})
        else:
            items.append({"id": f"item-{number}", "line": number, "prompt": item["prompt"],
                          "corrects": item["corrects"], "incorrects": item["incorrects"]})
    if not items:
        example = f"; e.g. line {rejects[0]['line']}: {rejects[0]['reason']}" if rejects else ""
        raise EvalDataError(f"{path} holds no valid items ({len(rejects)} rejected{example})")
    return items, rejects


def accuracy(results: Sequence[tuple[Sequence[float], int]]) -> dict[str, Any]:
    """``results``: per item, option probabilities with the correct options first, and how
    many options are correct. Accuracy counts items whose most likely option is correct."""
    if not results:
        raise ValueError("no results")
    hits = [max(range(len(p)), key=p.__getitem__) < n_correct for p, n_correct in results]
    correct_mass = [sum(p[:n_correct]) for p, n_correct in results]
    return {
        "count": len(results),
        "accuracy": sum(hits) / len(results),
        "mean_correct_prob": sum(correct_mass) / len(results),
    }


def read_results(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A finished run's scored rows (in input order) and every reject, input ones included."""
    rows, rejects = read_stage_output(out)
    malformed = out / "items" / "rejects.jsonl"
    lines = malformed.read_text(encoding="utf-8").splitlines() if malformed.exists() else []
    return sorted(rows, key=lambda r: r["index"]), [*map(json.loads, lines), *rejects]


def run_eval_feedback(config: EvalFeedbackConfig) -> dict[str, Any]:
    out = Path(config.out).expanduser()
    items, malformed = read_items(config.data, config.pool.limit)
    model = resolve_model(config.model)
    if not (out / MANIFEST).exists():  # a rerun keeps them: the stage first checks it is the same run
        write_jsonl(out / "items" / "usable.jsonl", items)
        write_jsonl(out / "items" / "rejects.jsonl", malformed)

    source = prepare_model(model, config.model, config.cluster)
    job = StageJob(
        stage="eval-feedback",
        out=out,
        prompts=str(out / "items" / "usable.jsonl"),
        pool=dataclasses.replace(config.pool, limit=0),  # --limit was applied when the items were read
        identity=identity(config, model=model, data=file_fingerprint(config.data)),
        config=config_to_dict(config),
        output_schema=RESULT_SCHEMA,
        worker_cls=FeedbackWorker,
        worker_args=(EngineOptions(model, config.engine, seed=config.scorer.seed, model_source=source), config.scorer,
                     {i["id"]: i for i in items}),
        worker_kwargs={"model_name": config.model},
        max_num_seqs=config.engine.max_num_seqs, tensor_parallel=config.engine.tensor_parallel,
        cluster=config.cluster,
        models=(source,),
    )
    stage = run_stage(job)

    rows, rejects = read_results(out)
    if not rows:
        raise EvalDataError(f"no item could be scored ({len(rejects)} rejected; e.g. {rejects[0]['id']}: "
                            f"{rejects[0]['reason']}); see {out / 'rejects'}")
    summary = {
        "model": config.model, "data": str(config.data), "scoring": config.scorer.scoring, "cot": config.scorer.cot,
        "chat": config.scorer.chat,
        **accuracy([(r["probs"], r["n_correct"]) for r in rows]),
        "accounting": {"items_in": len(items) + len(malformed), "scored": len(rows), "rejected": len(rejects),
                       "malformed": len(malformed)},
        "scored_by": {m: sum(r["method"] == m for r in rows) for m in sorted({r["method"] for r in rows})},
        "fallbacks": sum(r["fallbacks"] for r in rows),
        "out": str(out), "run_id": stage["run_id"], "wall_seconds": stage["wall_seconds"],
    }
    (out / "summary.json").write_text(json.dumps({**summary, "config": config_to_dict(config)}, indent=2) + "\n",
                                      encoding="utf-8")
    return {**summary, "already_done": stage["already_done"]}

"""`cai status DIR`: where a run stands, read from its files alone (no Ray needed).

DIR is a `cai run` directory (stages from ``pipeline.json``) or one stage's output
directory (a ``manifest.json`` of generate/label, or a trained model's
``training_summary.json``). Sharded stages show shards and rows done; training stages show
their final step or, while they train, their latest step from ``metrics.jsonl`` (PPO: reward,
KL, β and the seconds of each phase; sft/rm/dpo: loss, learning rate, epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actors.run_log import METRICS_FILE, read_rows
from core.shards import completed_shards
from workflows.pipeline import RECORD
from workflows.runtime.training import SUMMARY


def stage_progress(out: Path) -> dict[str, Any]:
    """What one stage directory holds: shard progress, training result, or report."""
    out = Path(out)
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        shards = manifest.get("input", {}).get("shards", 0)
        done = len(completed_shards(out))
        return {"kind": manifest.get("stage"), "shards_done": done, "shards": shards,
                "rows_in": manifest.get("input", {}).get("total_rows"),
                "rows_out": manifest.get("summary", {}).get("rows_out"),
                "rejected": manifest.get("summary", {}).get("rejected")}
    if (out / SUMMARY).exists():
        summary = json.loads((out / SUMMARY).read_text())
        return {"kind": f"train {summary.get('kind')}", "step": summary.get("metrics", {}).get("global_step"),
                "model": str(out)}
    if (out / "report.md").exists():
        return {"kind": "eval", "report": str(out / "report.md")}
    checkpoints = sorted(out.parent.glob(f".{out.name}.ray-train/*/checkpoint_*"))
    rows = read_rows(out / METRICS_FILE)
    if rows:
        return {"kind": "training", **latest_step(rows[-1]), "checkpoints": len(checkpoints)}
    if checkpoints:
        return {"kind": "training", "checkpoints": len(checkpoints), "latest": str(checkpoints[-1])}
    return {"kind": "not started"}


LIVE_FIELDS = ("step", "reward", "reward_std", "kl", "kl_coef", "step_seconds", "rollout_seconds", "scoring_seconds",
               "training_seconds", "sync_seconds", "loss", "learning_rate", "epoch", "tokens_per_second")


def latest_step(row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a training run's last ``metrics.jsonl`` row worth showing, rounded."""
    shown = {key: row[key] for key in LIVE_FIELDS if row.get(key) is not None}
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in shown.items()}


def run_status(directory: str) -> dict[str, Any]:
    root = Path(directory).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such run directory")
    record_path = root / RECORD
    if not record_path.exists():
        return {"dir": str(root), "stage": stage_progress(root)}
    record = json.loads(record_path.read_text())
    stages = {}
    for name, entry in record.get("stages", {}).items():
        stages[name] = {"status": entry.get("status"), "out": entry.get("out"), "seconds": entry.get("seconds"),
                        **({"error": entry["error"]} if entry.get("error") else {}),
                        **stage_progress(Path(entry["out"]))}
    return {"dir": str(root), "stages": stages, "analysis": record.get("analysis"), "report": record.get("report")}


def format_status(status: dict[str, Any]) -> str:
    """A few readable lines: one per stage."""
    if "stages" not in status:
        return f"{status['dir']}: " + ", ".join(f"{k} {v}" for k, v in status["stage"].items() if v is not None)
    lines = [f"run {status['dir']}"]
    for name, stage in status["stages"].items():
        detail = ""
        if "shards" in stage:
            detail = f"shards {stage['shards_done']}/{stage['shards']}"
            if stage.get("rows_out") is not None:
                detail += f", rows {stage['rows_out']} out + {stage['rejected']} rejected of {stage['rows_in']}"
        elif stage.get("step") is not None:
            detail = f"step {stage['step']}" + "".join(
                f", {key} {stage[key]}" for key in LIVE_FIELDS[1:] if key in stage)
        elif stage.get("checkpoints"):
            detail = f"{stage['checkpoints']} checkpoint(s) so far"
        seconds = f" in {stage['seconds']} s" if stage.get("seconds") else ""
        lines.append(f"  {name:<9} {stage['status'] or '-':<8} {detail}{seconds}  {stage['out']}")
        if stage.get("error"):
            lines.append(f"            error: {stage['error']}")
    if status.get("analysis"):
        lines.append(f"analysis: {status['analysis']}")
    if status.get("report"):
        lines.append(f"report: {status['report']}")
    return "\n".join(lines)

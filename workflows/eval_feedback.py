"""`cai eval feedback`: how well a feedback model picks the better answer.

Items are multiple-choice questions in the layout of Anthropic's published HHH evaluations,
one JSON object a line: ``{"prompt": "... The answer is:", "corrects": [" (B)"],
"incorrects": [" (A)"]}`` with any number of options. Each option string is scored by its
log-probability after the prompt; probabilities are normalized over the item's options.
An item is correct when its most likely option is a correct one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import REQUIRED, ConfigError, config_to_dict, failing, option, require_valid
from workflows.runtime.engine_config import EngineConfig
from workflows.runtime.models import resolve_model
from workflows.runtime.ray_session import NAMESPACE, connect_ray


class EvalDataError(ValueError):
    """A multiple-choice file is unreadable or an item is malformed (the message names the line)."""


@dataclass(frozen=True)
class EvalFeedbackConfig:
    model: str = option(REQUIRED, "feedback model: a local directory, a hub id, or 'default'")
    data: str = option(REQUIRED, "JSONL of {prompt, corrects, incorrects} multiple-choice items")
    cot: bool = option(False, "chain-of-thought: the model reasons step by step before the options are scored")
    chat: bool = option(True, "wrap the prompt in the model's chat template (off: score raw text, as for base models)")
    cot_max_new_tokens: int = option(256, "token limit for the chain-of-thought reasoning")
    limit: int = option(0, "score only the first N items; 0 = all")
    out: str = option("", "also write per-item results (JSONL) and the summary (.summary.json) here")
    seed: int = option(0, "engine seed")
    gpus: float = option(0.0, "GPUs for the scoring actor (at least --tensor-parallel on GPU nodes)")
    engine: EngineConfig = option(EngineConfig(), "the vLLM engine")

    def __post_init__(self) -> None:
        require_valid(failing({"limit": self.limit >= 0, "cot_max_new_tokens": self.cot_max_new_tokens >= 1}),
                      self.engine.problems())
        if self.cot and not self.chat:
            raise ConfigError("--cot needs --chat (the reasoning is the assistant's turn)")


def load_items(path: str | Path, limit: int = 0) -> list[dict[str, Any]]:
    """Validated items; every problem names the file and line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read {path}: {exc}") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(item, dict):
            raise EvalDataError(f"{where}: each line must be a JSON object")
        if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise EvalDataError(f"{where}: field 'prompt' must be a non-empty string")
        for key in ("corrects", "incorrects"):
            value = item.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise EvalDataError(f"{where}: field {key!r} must be a non-empty list of non-empty strings")
        items.append(item)
        if limit and len(items) == limit:
            break
    if not items:
        raise EvalDataError(f"{path} holds no items")
    return items


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


def run_eval_feedback(config: EvalFeedbackConfig) -> dict[str, Any]:
    import ray

    from actors.feedback_scorer import ScoringWorker

    items = load_items(config.data, config.limit)
    model = resolve_model(config.model)
    connect_ray()
    worker = (
        ray.remote(ScoringWorker)
        .options(name=f"cai-eval-feedback-{Path(config.data).stem}", namespace=NAMESPACE, num_cpus=1,
                 num_gpus=config.gpus)
        .remote(config.engine.options(model, config.seed), cot_max_new_tokens=config.cot_max_new_tokens)
    )
    try:
        scored = ray.get(worker.score_items.remote(
            [{"prompt": i["prompt"], "options": i["corrects"] + i["incorrects"]} for i in items],
            chat=config.chat, cot=config.cot,
        ))
    finally:
        ray.kill(worker)
    summary = {
        "model": config.model, "data": str(config.data), "cot": config.cot, "chat": config.chat,
        **accuracy([(s["probs"], len(i["corrects"])) for s, i in zip(scored, items)]),
    }
    if config.out:
        out = Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for item, score in zip(items, scored):
                handle.write(json.dumps({**item, **score}, ensure_ascii=False) + "\n")
        out.with_suffix(".summary.json").write_text(json.dumps({**summary, "config": config_to_dict(config)}, indent=2))
    return summary

"""Run ids: what names a run's actors, placement groups, metric tags and Ray Train runs.

A run id is ``--run-name`` or, by default, the output folder's name plus a short random
suffix, chosen at the first start and kept in the run folder (the stage manifest, or
``run.json`` for training jobs), so a rerun resumes under the same id while two runs whose
folders share a name (``a/sl-cai``, ``b/sl-cai``) never share actors, metrics or checkpoints.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
# the Ray namespace every ray-cai actor is named in (cai-<job>-<run>-<role>-<i>), drivers and learners alike
NAMESPACE = "cai"
# Identity keys renamed since runs first recorded them (old -> new): a folder recorded under
# the old name still matches. `cai eval compare`'s answer stage said "samples" until its
# settings became the AnswerSettings group.
RENAMED_KEYS = {"samples": "samples_per_prompt"}
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


class RunMismatchError(ValueError):
    """The output directory holds a run with different settings."""


def same_identity(recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """Whether a run folder's recorded identity is the current one: the rule every stage, training
    job and pipeline rerun applies before resuming or counting the work as done.

    A key the recorded identity lacks was added by a later version (a new setting, at the
    value every earlier run used), so folders recorded before it still match; a key recorded
    under an old name (:data:`RENAMED_KEYS`) is read under its new one. With ``defaults`` (the
    settings' defaults: ``core.config.identity_defaults``), a key the record lacks matches only at
    its default, the value the earlier version used."""
    recorded = {RENAMED_KEYS.get(key, key) if key not in current else key: value for key, value in recorded.items()}
    added = {key for key in current if key not in recorded and defaults is not None and key in defaults}
    return (set(recorded) <= set(current) and all(current[key] == value for key, value in recorded.items())
            and all(current[key] == defaults[key] for key in added))


def new_run_id(out: Path) -> str:
    """``<folder name>-<6 hex>``, safe in actor names and file paths."""
    base = _UNSAFE.sub("-", Path(out).expanduser().resolve().name).strip("-.")[:32] or "run"
    return f"{base}-{secrets.token_hex(3)}"


def settle_run_id(out: Path, recorded: str | None, requested: str) -> str:
    """The id of the run in ``out``: the recorded one, else ``requested`` or a new one.

    A ``--run-name`` that differs from the recorded id refuses: resuming under another name
    would orphan the first name's Ray Train checkpoints and split its metrics."""
    if recorded and requested and recorded != requested:
        raise RunMismatchError(
            f"{out} is run {recorded!r}, not --run-name {requested!r}: drop --run-name (or pass {recorded!r}) "
            "to resume it, or use a new --out directory"
        )
    return recorded or requested or new_run_id(out)


def training_run_id(out: Path, requested: str, *, fresh: bool = False) -> str:
    """The run id of a training job writing to ``out``, kept in ``out/run.json``.

    ``fresh`` starts a new id even when one is recorded: the folder holds a finished job of
    another config, whose checkpoints must not be resumed."""
    path = Path(out) / RUN_FILE
    recorded = None
    if path.exists() and not fresh:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    run_id = requested if fresh and requested else settle_run_id(Path(out), recorded, requested)
    if run_id != recorded:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": run_id, "created": time.time()}) + "\n", encoding="utf-8")
    return run_id

"""Training data: what `cai train` reads, checked on the driver before any worker starts.

A ``--data`` path is a `cai generate`/`cai label` run directory (its Parquet shards), a
Parquet/JSONL/JSON file, or a saved ``datasets`` directory. JSON rows are checked one by one
first, so a broken line or a wrong type is one error naming the file and the line. ``datasets`` is imported
inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.manifest import file_fingerprint


class TrainingDataError(ValueError):
    """Training data is missing, empty, malformed or lacks a column (raised before any worker
    starts). The message is one line naming the file and, for a bad row, its line."""


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


# What each column `cai train` reads must hold, checked row by row in JSON files (Parquet and
# saved datasets carry their types in their schema, checked once per file).
TEXT_OR_CONVERSATION = ("a string or a list of {role, content} strings",
                        lambda value: _is_text(value) or _is_conversation(value))
COLUMN_TYPES: dict[str, tuple[str, Any]] = {  # preference columns: plain text or conversational, as TRL takes them
    "prompt": TEXT_OR_CONVERSATION,
    "chosen": TEXT_OR_CONVERSATION,
    "rejected": TEXT_OR_CONVERSATION,
    "chosen_prob": ("a number", _is_number),
    "messages": ("a list of {role, content} strings", _is_conversation),
    "revisions": ("a list", lambda value: isinstance(value, list)),
}
ARROW_TEXT = ("string", "large_string")


def _check_row(path: Path, where: str, row: Any, required: Sequence[str], keep: Sequence[str]) -> None:
    if not isinstance(row, dict):
        raise TrainingDataError(f"{path}, {where}: expected a JSON object, got {type(row).__name__}")
    for column in (*required, *keep):
        if column not in row or column not in COLUMN_TYPES:
            continue  # a missing column is reported once for the whole file, after loading
        value = row[column]
        if value is None and column in keep:
            continue
        kind, valid = COLUMN_TYPES[column]
        if not valid(value):
            shown = json.dumps(value)[:60] if value is not None else "null"
            raise TrainingDataError(f"{path}, {where}: {column!r} must be {kind}, got {shown}")


def check_json_rows(path: Path, required: Sequence[str], keep: Sequence[str] = ()) -> None:
    """Read a JSONL (or JSON) file row by row and raise :class:`TrainingDataError` naming the
    line of the first row that is not valid JSON, not an object, or has a column of the wrong
    type; before ``datasets`` (pyarrow) would fail on it with a traceback that names neither."""
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            first = handle.read(1)
            while first.isspace():
                first = handle.read(1)
            handle.seek(0)
            if first == "[":  # one JSON document: a list of rows
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as exc:
                    raise TrainingDataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
                for index, row in enumerate(rows if isinstance(rows, list) else [rows]):
                    _check_row(path, f"item {index}", row, required, keep)
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingDataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
                _check_row(path, f"line {number}", row, required, keep)
        except UnicodeDecodeError as exc:
            raise TrainingDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_schema(path: Path, part, required: Sequence[str]) -> None:
    """Columns of a Parquet file or saved dataset that hold text (or conversations) must not
    hold numbers: a plain value column there must be a string one."""
    import datasets

    for column in (c for c in required if COLUMN_TYPES.get(c) is TEXT_OR_CONVERSATION):
        feature = part.features.get(column)
        if isinstance(feature, datasets.Value) and feature.dtype not in ARROW_TEXT:
            raise TrainingDataError(f"{path}: column {column!r} must be {TEXT_OR_CONVERSATION[0]}, "
                                    f"it holds {feature.dtype}")


def _dataset_files(path: Path) -> tuple[str, dict[str, Any]]:
    """How ``datasets`` should read a --data path: a run directory of cai generate/label,
    a saved dataset, a directory of Parquet, or one JSONL/JSON/Parquet file."""
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if not kind:
            raise TrainingDataError(f"{path}: unsupported data file type {path.suffix!r}")
        return kind, {"data_files": str(path)}
    if (path / "data").is_dir():
        path = path / "data"
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise TrainingDataError(f"{path}: no Parquet files (expected the output of cai generate / cai label)")
    return "parquet", {"data_files": [str(f) for f in files]}


@contextlib.contextmanager
def _quiet_progress(datasets):
    """datasets' progress bars off for a while (back as they were after)."""
    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def load_training_data(paths: Sequence[str], required: Sequence[str], *, keep: Sequence[str] = ()):
    """Concatenate the --data sources, checking each has the required columns and rows.
    Keeps only ``required`` and ``keep`` columns, so mixed sources line up."""
    import datasets

    parts = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise TrainingDataError(f"training data {str(path)!r} does not exist")
        if (path / "dataset_info.json").exists():
            part = datasets.load_from_disk(str(path))
        else:
            kind, files = _dataset_files(path)
            if kind == "json":
                check_json_rows(path, required, keep)
            try:
                with _quiet_progress(datasets):  # "Generating train split" is no news to the user
                    part = datasets.load_dataset(kind, split="train", **files)
            except Exception as exc:  # noqa: BLE001 - pyarrow/datasets errors span many types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise TrainingDataError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {first[:200]})") \
                    from None
        missing = [c for c in required if c not in part.column_names]
        if missing:
            raise TrainingDataError(f"{path}: missing column(s) {missing} (columns: {part.column_names})")
        if len(part) == 0:
            raise TrainingDataError(f"{path}: no rows")
        _check_schema(path, part, required)
        part = part.select_columns([c for c in part.column_names if c in (*required, *keep)])
        parts.append(part)
    if not parts:
        raise TrainingDataError("no --data given")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def split(dataset, eval_split: float, seed: int):
    """(train, eval or None): a seeded split, identical on every worker and every rerun."""
    if not eval_split or len(dataset) < 4:
        return dataset, None
    parts = dataset.train_test_split(test_size=eval_split, seed=seed)
    return parts["train"], parts["test"]


def data_lineage(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Where the data came from: each source and, for cai run directories, its identity."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        entry: dict[str, Any] = {"path": str(path.resolve())}
        manifest = path / "manifest.json"
        if manifest.exists():
            data = json.loads(manifest.read_text())
            entry.update(stage=data.get("stage"), identity=data.get("identity"), summary=data.get("summary"))
        elif path.is_file():
            entry["sha256"] = file_fingerprint(path)
        out.append(entry)
    return out

"""Training data: what `cai train` reads, checked on the driver before any worker starts.

A ``--data`` path is a `cai generate`/`cai label` run directory (its Parquet shards), a
Parquet/JSONL/JSON/CSV file, or a saved ``datasets`` directory. ``datasets`` is imported
inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.manifest import file_fingerprint


class TrainingDataError(ValueError):
    """Training data is missing, empty, or lacks a column (raised before any worker starts)."""


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
            part = datasets.load_dataset(kind, split="train", **files)
        missing = [c for c in required if c not in part.column_names]
        if missing:
            raise TrainingDataError(f"{path}: missing column(s) {missing} (columns: {part.column_names})")
        if len(part) == 0:
            raise TrainingDataError(f"{path}: no rows")
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

"""Load prompt sets from JSONL, JSON, Parquet, CSV or a saved Hugging Face dataset.

Each row needs a ``prompt`` (string) or ``messages`` (chat list ending with a user turn)
column; an optional ``id`` column names rows (else the row number does). Rows that cannot be
used are returned as :class:`Reject` with their row number and a reason, never dropped:
``len(rows) + len(rejects)`` always equals the number of rows in the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory saved with datasets' save_to_disk / holding *.parquet"
ROLES = ("system", "user", "assistant")


class PromptDataError(ValueError):
    """The prompt file as a whole cannot be used (unreadable, unknown format, no prompt column)."""


@dataclass(frozen=True)
class PromptRow:
    """One usable prompt. ``index`` is the 0-based row number in the source."""

    index: int
    id: str
    messages: tuple[dict[str, str], ...]

    @property
    def prompt(self) -> str:
        """The last user turn: the question the model answers."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Reject:
    index: int
    reason: str
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason, "raw": self.raw}


@dataclass
class PromptSet:
    source: str
    rows: list[PromptRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.rejects)


_INVALID = object()  # placeholder for a JSONL line that does not parse


def iter_records(path: Path) -> Iterator[tuple[Any, str]]:
    """Raw records in file order, streamed: ``(record, "")``, or ``(_INVALID, reason)`` for a
    JSONL line that does not parse. Only .json files are read whole."""
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from ((r, "") for r in _iter_directory(path))
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue  # blank lines are layout, not rows
                try:
                    yield json.loads(line), ""
                except json.JSONDecodeError as exc:
                    yield _INVALID, f"invalid JSON: {exc.msg}: {line[:200]}"
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise PromptDataError(f"{path}: a .json prompt file must hold a list of objects")
        yield from ((r, "") for r in data)
    elif suffix == ".parquet":
        yield from ((r, "") for r in _iter_parquet([path]))
    elif suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as handle:
            yield from ((r, "") for r in csv.DictReader(handle))
    else:
        raise PromptDataError(f"{path}: unsupported prompt file type {suffix!r}; use {SUPPORTED}")


def _iter_parquet(files: list[Path]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def _iter_directory(path: Path) -> Iterator[dict]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if any((path / m).exists() for m in markers):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise PromptDataError(f"{path}: a dataset with splits {list(loaded)}; point at one split's directory")
            loaded = next(iter(loaded.values()))
        yield from loaded  # memory-mapped Arrow, row by row
        return
    parquet_files = sorted(path.rglob("*.parquet"))
    if not parquet_files:
        raise PromptDataError(f"{path}: directory holds neither a saved dataset nor *.parquet files")
    yield from _iter_parquet(parquet_files)


def _messages(value: Any) -> tuple[tuple[dict[str, str], ...] | None, str]:
    """Validated chat messages, or (None, reason)."""
    if not isinstance(value, (list, tuple)) or not value:
        return None, "'messages' must be a non-empty list of {role, content}"
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            return None, f"messages[{i}] must have 'role' and 'content'"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return None, f"messages[{i}] has role {role!r}; expected one of {ROLES}"
        if not isinstance(content, str):
            return None, f"messages[{i}] content must be a string, got {type(content).__name__}"
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        return None, "the last message must be from the user"
    if not out[-1]["content"].strip():
        return None, "empty prompt"
    return tuple(out), ""


def _raw(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:2000]


def _row(index: int, record: Any) -> PromptRow | Reject:
    # the raw record is serialized only for rejects: it is a third of staging time otherwise
    if not isinstance(record, dict):
        return Reject(index, f"row is a {type(record).__name__}, not an object", _raw(record))
    row_id = str(record["id"]) if record.get("id") not in (None, "") else f"row-{index:08d}"
    if "prompt" in record and record["prompt"] is not None:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            return Reject(index, f"'prompt' must be a string, got {type(prompt).__name__}", _raw(record))
        if not prompt.strip():
            return Reject(index, "empty prompt", _raw(record))
        return PromptRow(index, row_id, ({"role": "user", "content": prompt},))
    if "messages" in record and record["messages"] is not None:
        messages, reason = _messages(record["messages"])
        return PromptRow(index, row_id, messages) if messages else Reject(index, reason, _raw(record))
    return Reject(index, "missing column 'prompt' (string) or 'messages' (chat list)", _raw(record))


COLUMN_PROBE_ROWS = 1000


def iter_prompts(path: str | Path, *, limit: int | None = None) -> Iterator[PromptRow | Reject]:
    """Validated rows in file order, streamed, each a :class:`PromptRow` or a :class:`Reject`.

    Raises :class:`PromptDataError` for a missing or unreadable file, an unknown format, no
    rows, or when none of the first rows has a ``prompt``/``messages`` column (a wrong file,
    not bad rows).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PromptDataError(f"prompt file {str(path)!r} does not exist")
    seen_ids: dict[str, int] = {}
    probe: list[tuple[int, Any, str]] = []
    column_found = False
    count = 0
    try:
        for index, (record, problem) in enumerate(iter_records(path)):
            if limit is not None and index >= limit:
                break
            count += 1
            if not column_found:
                column_found = isinstance(record, dict) and ("prompt" in record or "messages" in record)
                probe.append((index, record, problem))
                if not column_found and len(probe) < COLUMN_PROBE_ROWS:
                    continue
                if not column_found:
                    _raise_no_column(path, probe)
                for item in probe:
                    yield _validated(*item, seen_ids)
                probe = []
                continue
            yield _validated(index, record, problem, seen_ids)
    except PromptDataError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise PromptDataError(f"cannot read prompt file {path}: {exc}") from exc
    if count == 0:
        raise PromptDataError(f"prompt file {path} has no rows")
    if probe:
        _raise_no_column(path, probe)


def _raise_no_column(path: Path, probe: list[tuple[int, Any, str]]) -> None:
    columns = sorted({k for _, r, _ in probe if isinstance(r, dict) for k in r})
    raise PromptDataError(f"prompt file {path} has no 'prompt' or 'messages' column (columns found: {columns})")


def _validated(index: int, record: Any, problem: str, seen_ids: dict[str, int]) -> PromptRow | Reject:
    if problem:
        return Reject(index, problem)
    result = _row(index, record)
    explicit_id = isinstance(record, dict) and record.get("id") not in (None, "")
    if isinstance(result, PromptRow) and explicit_id:  # row-number ids cannot collide
        if result.id in seen_ids:
            return Reject(index, f"duplicate id {result.id!r} (first at row {seen_ids[result.id]})")
        seen_ids[result.id] = index
    return result


def load_prompts(path: str | Path, *, limit: int | None = None) -> PromptSet:
    """Read a whole prompt file into memory; see :func:`iter_prompts`."""
    prompt_set = PromptSet(source=str(Path(path).expanduser()))
    for item in iter_prompts(path, limit=limit):
        (prompt_set.rows if isinstance(item, PromptRow) else prompt_set.rejects).append(item)
    return prompt_set

"""Load prompt sets from JSONL, JSON, Parquet, CSV or a saved Hugging Face dataset.

Each row needs a ``prompt`` (string) or ``messages`` (chat list ending with a user turn)
column; an optional ``id`` column names rows (else the row number does). Rows that cannot be
used are returned as :class:`Reject` with their row number and a reason, never dropped:
``len(rows) + len(rejects)`` always equals the number of rows in the file.
"""

from __future__ import annotations

import json
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


def _read_records(path: Path) -> tuple[list[Any], list[Reject]]:
    """Raw records in file order; lines of JSONL that don't parse become rejects."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_directory(path), []
    if suffix == ".jsonl":
        records: list[Any] = []
        rejects: list[Reject] = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue  # blank lines are layout, not rows
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rejects.append(Reject(len(records), f"invalid JSON: {exc.msg}", line[:500]))
                    records.append(None)  # keeps row numbers aligned with the file
        return records, rejects
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise PromptDataError(f"{path}: a .json prompt file must hold a list of objects")
        return data, []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), []
    if suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle)), []
    raise PromptDataError(f"{path}: unsupported prompt file type {suffix!r}; use {SUPPORTED}")


def _read_directory(path: Path) -> list[Any]:
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise PromptDataError(f"{path}: a dataset with splits {list(loaded)}; point at one split's directory")
            loaded = next(iter(loaded.values()))
        return loaded.to_list()
    parquet_files = sorted(path.rglob("*.parquet"))
    if not parquet_files:
        raise PromptDataError(f"{path}: directory holds neither a saved dataset nor *.parquet files")
    import pyarrow.parquet as pq

    return [record for file in parquet_files for record in pq.read_table(file).to_pylist()]


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


def _row(index: int, record: Any) -> PromptRow | Reject:
    raw = json.dumps(record, ensure_ascii=False, default=str)[:2000]
    if not isinstance(record, dict):
        return Reject(index, f"row is a {type(record).__name__}, not an object", raw)
    row_id = str(record["id"]) if record.get("id") not in (None, "") else f"row-{index:08d}"
    if "prompt" in record and record["prompt"] is not None:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            return Reject(index, f"'prompt' must be a string, got {type(prompt).__name__}", raw)
        if not prompt.strip():
            return Reject(index, "empty prompt", raw)
        return PromptRow(index, row_id, ({"role": "user", "content": prompt},))
    if "messages" in record and record["messages"] is not None:
        messages, reason = _messages(record["messages"])
        return PromptRow(index, row_id, messages) if messages else Reject(index, reason, raw)
    return Reject(index, "missing column 'prompt' (string) or 'messages' (chat list)", raw)


def load_prompts(path: str | Path, *, limit: int | None = None) -> PromptSet:
    """Read a prompt file; see the module docstring for formats and the reject rules."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PromptDataError(f"prompt file {str(path)!r} does not exist")
    try:
        records, rejects = _read_records(path)
    except PromptDataError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise PromptDataError(f"cannot read prompt file {path}: {exc}") from exc
    if limit is not None:
        records = records[:limit]
        rejects = [r for r in rejects if r.index < limit]
    if not records:
        raise PromptDataError(f"prompt file {path} has no rows")
    has_column = any(isinstance(r, dict) and ("prompt" in r or "messages" in r) for r in records)
    if not has_column:
        columns = sorted({k for r in records if isinstance(r, dict) for k in r})
        raise PromptDataError(
            f"prompt file {path} has no 'prompt' or 'messages' column (columns found: {columns})"
        )
    prompt_set = PromptSet(source=str(path), rejects=list(rejects))
    rejected = {r.index for r in rejects}
    seen_ids: dict[str, int] = {}
    for index, record in enumerate(records):
        if index in rejected:
            continue
        result = _row(index, record)
        if isinstance(result, PromptRow) and result.id in seen_ids:
            result = Reject(index, f"duplicate id {result.id!r} (first at row {seen_ids[result.id]})")
        if isinstance(result, PromptRow):
            seen_ids[result.id] = index
            prompt_set.rows.append(result)
        else:
            prompt_set.rejects.append(result)
    prompt_set.rejects.sort(key=lambda r: r.index)
    return prompt_set

"""Load prompt sets from files or the Hugging Face Hub.

A source is a file (JSONL, JSON, Parquet, CSV), a directory (saved with ``datasets``, or
holding ``*.parquet``), or a Hub dataset ``hf:ORG/NAME`` (``hf:ORG/NAME/DIR`` reads one data
directory, e.g. ``hf:Anthropic/hh-rlhf/harmless-base``) read through ``datasets`` with
:class:`PromptOptions` (its split and column).

Which column holds the prompt (:class:`PromptOptions`, ``--prompt-column``; found by itself
when not given):

- ``prompt``: a string, the user's one turn;
- ``messages``: a chat list of ``{role, content}`` ending with a user turn;
- ``chosen``, ``rejected``, ``transcript``: a whole conversation, cut before its last assistant
  turn. Anthropic's HH-RLHF strings ("\\n\\nHuman: … \\n\\nAssistant: …", :mod:`core.hh_transcript`)
  and TRL's conversational chat lists both work.

Found by itself: ``prompt`` or ``messages`` row by row, as before any other column was read;
when neither is in the first rows, the first of ``chosen``, ``transcript``, ``rejected``.
An optional ``id`` column names rows (else the row number does). Rows that cannot be used are
returned as :class:`Reject` with their row number and a reason naming the field, never
dropped: ``len(rows) + len(rejects)`` always equals the number of rows read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import option
from core.hh_transcript import looks_like_transcript, messages_prompt, transcript_prompt
from core.hub_datasets import HubSourceError, hub_dataset, is_hub_source
from core.manifest import file_fingerprint

SUPPORTED = ".jsonl, .json, .parquet, .csv, a directory saved with datasets' save_to_disk / holding *.parquet, " \
            "or hf:ORG/NAME"
ROLES = ("system", "user", "assistant")
TEXT, MESSAGES, TRANSCRIPT = "text", "messages", "transcript"
FORMATS = {"prompt": TEXT, "messages": MESSAGES, "chosen": TRANSCRIPT, "transcript": TRANSCRIPT,
           "rejected": TRANSCRIPT}
"""The format of each column a prompt is looked for in; any other column named by
``--prompt-column`` gets the format of its first value."""
TRANSCRIPT_COLUMNS = ("chosen", "transcript", "rejected")  # looked for in this order
PROMPTS_HELP = "prompts: a JSONL, JSON, Parquet or CSV file, a saved dataset directory, or a Hub dataset hf:ORG/NAME"
"""The help of every job's ``--prompts`` (each job declares the field, with its own identity flag)."""


class PromptDataError(ValueError):
    """The prompt source as a whole cannot be used (unreadable, unknown format, no prompt column)."""


@dataclass(frozen=True)
class PromptOptions:
    """Which rows and column of ``--prompts`` are read; every job that takes prompts nests it."""

    prompt_split: str = option("train", "the split to read from a Hub dataset (hf:ORG/NAME)", identity=True)
    prompt_column: str = option(
        "", "column holding the prompts: prompt (text), messages (chat list ending with the user), or a "
        "conversation cut before its last assistant turn: chosen, rejected, transcript (HH-RLHF "
        "'\\n\\nHuman: … \\n\\nAssistant: …' strings or chat lists) (default empty: prompt or messages, else "
        "chosen, transcript, rejected, whichever the first rows have)", identity=True)


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


@dataclass(frozen=True)
class Layout:
    """Where the prompts were found: ``column`` (None: ``prompt`` or ``messages``, row by row)
    and its ``format`` (text, messages, transcript)."""

    column: str | None
    format: str

    def describe(self) -> dict[str, str]:
        if self.column is None:
            return {"column": "prompt or messages", "format": "text or messages"}
        return {"column": self.column, "format": self.format}


@dataclass
class PromptSet:
    source: str
    rows: list[PromptRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    layout: Layout | None = None

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.rejects)


def prompt_fingerprint(source: str | Path) -> str:
    """What a run records of its prompts (beside the split and column, identity settings of
    :class:`PromptOptions`): a file's content hash, or for ``hf:`` the source itself, since a run
    stages its prompts once and a resume reads them from its own folder."""
    return source if is_hub_source(source) else file_fingerprint(source)


# -- reading records -----------------------------------------------------------------------

_INVALID = object()  # placeholder for a JSONL line that does not parse


def iter_records(source: str | Path, options: PromptOptions | None = None) -> Iterator[tuple[Any, str]]:
    """Raw records in source order, streamed: ``(record, "")``, or ``(_INVALID, reason)`` for a
    JSONL line that does not parse. Only .json files are read whole."""
    if is_hub_source(source):
        yield from ((r, "") for r in hub_dataset(source, (options or PromptOptions()).prompt_split))
        return
    path = Path(source).expanduser()
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


# -- one row --------------------------------------------------------------------------------


def _chat(value: Any, column: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    """Validated ``{role, content}`` messages, or (None, reason)."""
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"'{column}' must be a non-empty list of {{role, content}}"
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            return None, f"{column}[{i}] must have 'role' and 'content'"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return None, f"{column}[{i}] has role {role!r}; expected one of {ROLES}"
        if not isinstance(content, str):
            return None, f"{column}[{i}] content must be a string, got {type(content).__name__}"
        out.append({"role": role, "content": content})
    return tuple(out), ""


def _messages(value: Any, column: str = "messages") -> tuple[tuple[dict[str, str], ...] | None, str]:
    """A chat list ending with a non-empty user turn, or (None, reason)."""
    out, reason = _chat(value, column)
    if out is None:
        return None, reason
    if out[-1]["role"] != "user":
        return None, "the last message must be from the user"
    if not out[-1]["content"].strip():
        return None, "empty prompt"
    return out, ""


def _text(value: Any, column: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    if not isinstance(value, str):
        return None, f"'{column}' must be a string, got {type(value).__name__}"
    if not value.strip():
        return None, "empty prompt"
    return ({"role": "user", "content": value},), ""


def _conversation(value: Any, column: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    """A transcript string or a chat list, cut before its last assistant turn."""
    if isinstance(value, str):
        return transcript_prompt(value, column) if value.strip() else (None, f"'{column}' is empty")
    if not isinstance(value, (list, tuple)):
        return None, f"'{column}' must be a transcript string or a chat list, got {type(value).__name__}"
    messages, reason = _chat(value, column)
    return messages_prompt(messages, column) if messages else (None, reason)


READERS = {TEXT: _text, MESSAGES: _messages, TRANSCRIPT: _conversation}


def _raw(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:2000]


def _row(index: int, record: Any, layout: Layout) -> PromptRow | Reject:
    # the raw record is serialized only for rejects: it is a third of staging time otherwise
    if not isinstance(record, dict):
        return Reject(index, f"row is a {type(record).__name__}, not an object", _raw(record))
    row_id = str(record["id"]) if record.get("id") not in (None, "") else f"row-{index:08d}"
    column = layout.column
    if column is None:  # prompt or messages, row by row
        column = next((c for c in ("prompt", "messages") if record.get(c) is not None), "")
        if not column:
            return Reject(index, "missing column 'prompt' (string) or 'messages' (chat list)", _raw(record))
    elif record.get(column) is None:
        return Reject(index, f"missing column {column!r}", _raw(record))
    messages, reason = READERS[FORMATS.get(column, layout.format)](record[column], column)
    return PromptRow(index, row_id, messages) if messages else Reject(index, reason, _raw(record))


# -- a whole source --------------------------------------------------------------------------

COLUMN_PROBE_ROWS = 1000


def find_layout(records: list[Any], options: PromptOptions) -> Layout | None:
    """Where the prompts are in these (the first) records, or None when nowhere."""
    rows = [r for r in records if isinstance(r, dict)]
    wanted = options.prompt_column
    if wanted:
        values = [r[wanted] for r in rows if r.get(wanted) is not None]
        if not values:
            return None
        first = values[0]
        detected = MESSAGES if isinstance(first, (list, tuple)) else TRANSCRIPT if (
            isinstance(first, str) and looks_like_transcript(first)) else TEXT
        return Layout(wanted, FORMATS.get(wanted, detected))
    if any("prompt" in r or "messages" in r for r in rows):
        return Layout(None, TEXT)
    for column in TRANSCRIPT_COLUMNS:
        if any(column in r for r in rows):
            return Layout(column, TRANSCRIPT)
    return None


class PromptReader:
    """Validated rows in source order, streamed, each a :class:`PromptRow` or a :class:`Reject`;
    ``layout`` says where the prompts were found once the first rows are read.

    Raises :class:`PromptDataError` for a missing or unreadable source, an unknown format, no
    rows, or when none of the first rows has a prompt column (a wrong source, not bad rows).
    """

    def __init__(self, source: str | Path, options: PromptOptions | None = None, *, limit: int | None = None):
        self.source = source if is_hub_source(source) else Path(source).expanduser()
        self.options = options or PromptOptions()
        self.limit = limit
        self.layout: Layout | None = None

    def __iter__(self) -> Iterator[PromptRow | Reject]:
        if isinstance(self.source, Path) and not self.source.exists():
            raise PromptDataError(f"prompt file {str(self.source)!r} does not exist")
        seen_ids: dict[str, int] = {}
        probe: list[tuple[int, Any, str]] = []
        count = 0
        try:
            for index, (record, problem) in enumerate(iter_records(self.source, self.options)):
                if self.limit is not None and index >= self.limit:
                    break
                count += 1
                if self.layout is None:
                    probe.append((index, record, problem))
                    self.layout = find_layout([r for _, r, _ in probe[-1:]], self.options)
                    if self.layout is None and len(probe) < COLUMN_PROBE_ROWS:
                        continue
                    if self.layout is None:
                        self._raise_no_column(probe)
                    for item in probe:
                        yield self._validated(*item, seen_ids)
                    probe = []
                    continue
                yield self._validated(index, record, problem, seen_ids)
        except PromptDataError:
            raise
        except HubSourceError as exc:
            raise PromptDataError(str(exc)) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise PromptDataError(f"cannot read prompt source {self.source}: {exc}") from exc
        if count == 0:
            raise PromptDataError(f"prompt source {self.source} has no rows")
        if probe:
            self._raise_no_column(probe)

    def _raise_no_column(self, probe: list[tuple[int, Any, str]]) -> None:
        columns = sorted({k for _, r, _ in probe if isinstance(r, dict) for k in r})
        if self.options.prompt_column:
            raise PromptDataError(f"prompt source {self.source} has no column {self.options.prompt_column!r} "
                                  f"(--prompt-column; columns found: {columns})")
        looked = ", ".join(map(repr, ("prompt", "messages", *TRANSCRIPT_COLUMNS)))
        raise PromptDataError(f"prompt source {self.source} has no prompt column: none of {looked} (columns found: "
                              f"{columns}); name one with --prompt-column")

    def _validated(self, index: int, record: Any, problem: str, seen_ids: dict[str, int]) -> PromptRow | Reject:
        if problem:
            return Reject(index, problem)
        result = _row(index, record, self.layout)
        explicit_id = isinstance(record, dict) and record.get("id") not in (None, "")
        if isinstance(result, PromptRow) and explicit_id:  # row-number ids cannot collide
            if result.id in seen_ids:
                return Reject(index, f"duplicate id {result.id!r} (first at row {seen_ids[result.id]})")
            seen_ids[result.id] = index
        return result


def iter_prompts(source: str | Path, options: PromptOptions | None = None, *,
                 limit: int | None = None) -> Iterator[PromptRow | Reject]:
    """The rows of ``source``, streamed; see :class:`PromptReader`."""
    return iter(PromptReader(source, options, limit=limit))


def load_prompts(source: str | Path, options: PromptOptions | None = None, *, limit: int | None = None) -> PromptSet:
    """Read a whole prompt source into memory; see :class:`PromptReader`."""
    reader = PromptReader(source, options, limit=limit)
    prompt_set = PromptSet(source=str(reader.source))
    for item in reader:
        (prompt_set.rows if isinstance(item, PromptRow) else prompt_set.rejects).append(item)
    prompt_set.layout = reader.layout
    return prompt_set

"""Load, validate and save constitution YAML files.

Every problem is reported with the file, the entry and the field, and all problems in a
file are reported together, so a user fixes a hand-written constitution in one pass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from constitutions.schema import (
    Constitution,
    CritiquePrinciple,
    FeedbackExample,
    FeedbackPrinciple,
    Message,
)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
TOP_LEVEL_REQUIRED = ("name", "version", "description", "critiques", "feedback")
TOP_LEVEL_OPTIONAL = ("few_shot", "feedback_few_shot")
CRITIQUE_KEYS = ("id", "critique", "revision")
FEEDBACK_KEYS = ("id", "text")
MESSAGE_KEYS = ("role", "content")
FEEDBACK_EXAMPLE_REQUIRED = ("conversation", "principle", "options", "answer")
FEEDBACK_EXAMPLE_OPTIONAL = ("reasoning",)
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ConstitutionError(ValueError):
    """A constitution file is malformed. ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        listing = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid constitution {source}: {len(errors)} problem(s):\n{listing}")


class _Checker:
    """Collects problems while walking the raw YAML data."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def keys(self, where: str, entry: Any, required: tuple, optional: tuple = ()) -> bool:
        if not isinstance(entry, dict):
            self.errors.append(f"{where}: must be a mapping, got {type(entry).__name__}")
            return False
        for key in required:
            if key not in entry:
                self.errors.append(f"{where}: missing key {key!r}")
        for key in entry:
            if key not in required and key not in optional:
                allowed = ", ".join(required + optional)
                self.errors.append(f"{where}: unknown key {key!r} (allowed: {allowed})")
        return True

    def text(self, where: str, entry: dict, key: str, *, allow_empty: bool = False) -> str:
        value = entry.get(key)
        if key not in entry:
            return ""  # already reported as missing
        if not isinstance(value, str):
            hint = " (quote it in YAML)" if isinstance(value, (int, float)) else ""
            self.errors.append(f"{where}: field {key!r} must be a string, got {type(value).__name__}{hint}")
            return ""
        if not allow_empty and not value.strip():
            self.errors.append(f"{where}: field {key!r} is empty")
        return value

    def unique_id(self, where: str, entry: dict, seen: dict[str, str]) -> str:
        value = self.text(where, entry, "id")
        if value and not ID_PATTERN.match(value):
            self.errors.append(
                f"{where}: field 'id' {value!r} must be letters, digits, '_', '.' or '-'"
            )
        if value in seen:
            self.errors.append(f"{where}: duplicate id {value!r} (first used at {seen[value]})")
        elif value:
            seen[value] = where
        return value

    def entries(self, where: str, value: Any) -> list:
        if not isinstance(value, list):
            self.errors.append(f"{where}: must be a list, got {type(value).__name__}")
            return []
        return value


def _entry_name(section: str, index: int, entry: Any) -> str:
    """``critiques[3] (id 'harm')``: the position and, when readable, the id."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), str):
        return f"{section}[{index}] (id {entry['id']!r})"
    return f"{section}[{index}]"


def _critiques(check: _Checker, raw: Any) -> tuple[CritiquePrinciple, ...]:
    seen: dict[str, str] = {}
    out = []
    for i, entry in enumerate(check.entries("critiques", raw)):
        where = _entry_name("critiques", i, entry)
        if not check.keys(where, entry, CRITIQUE_KEYS):
            continue
        principle_id = check.unique_id(where, entry, seen)
        critique = check.text(where, entry, "critique")
        revision = check.text(where, entry, "revision")
        out.append(CritiquePrinciple(principle_id, critique, revision))
    return tuple(out)


def _feedback(check: _Checker, raw: Any) -> tuple[FeedbackPrinciple, ...]:
    seen: dict[str, str] = {}
    out = []
    for i, entry in enumerate(check.entries("feedback", raw)):
        where = _entry_name("feedback", i, entry)
        if not check.keys(where, entry, FEEDBACK_KEYS):
            continue
        out.append(FeedbackPrinciple(check.unique_id(where, entry, seen), check.text(where, entry, "text")))
    return tuple(out)


def _few_shot(check: _Checker, raw: Any) -> tuple[tuple[Message, ...], ...]:
    out = []
    for i, example in enumerate(check.entries("few_shot", raw)):
        where = f"few_shot[{i}]"
        if not isinstance(example, list):
            check.errors.append(f"{where}: must be a list of chat messages, got {type(example).__name__}")
            continue
        messages = []
        for j, entry in enumerate(example):
            mwhere = f"{where}[{j}]"
            if not check.keys(mwhere, entry, MESSAGE_KEYS):
                continue
            role = check.text(mwhere, entry, "role")
            if role and role not in ("system", "user", "assistant"):
                check.errors.append(f"{mwhere}: field 'role' {role!r} must be system, user or assistant")
            messages.append(Message(role, check.text(mwhere, entry, "content")))
        roles = [m.role for m in messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        alternating = body == ["user", "assistant"] * (len(body) // 2)
        if len(messages) == len(example) and (not alternating or len(body) < 6):
            check.errors.append(
                f"{where}: field 'role': wrong role order {roles}; expected alternating user/assistant "
                "turns (an optional system message first): the conversation, then one or more rounds of "
                "user (critique request), assistant (critique), user (revision request), assistant (revision)"
            )
        out.append(tuple(messages))
    return tuple(out)


def _feedback_few_shot(check: _Checker, raw: Any) -> tuple[FeedbackExample, ...]:
    out = []
    for i, entry in enumerate(check.entries("feedback_few_shot", raw)):
        where = f"feedback_few_shot[{i}]"
        if not check.keys(where, entry, FEEDBACK_EXAMPLE_REQUIRED, FEEDBACK_EXAMPLE_OPTIONAL):
            continue
        options = entry.get("options")
        if not isinstance(options, list) or len(options) < 2 or not all(
            isinstance(o, str) and o.strip() for o in options
        ):
            check.errors.append(f"{where}: field 'options' must be a list of at least 2 non-empty strings")
            options = []
        answer = check.text(where, entry, "answer")
        if answer and options and answer not in OPTION_LETTERS[: len(options)]:
            check.errors.append(
                f"{where}: field 'answer' {answer!r} must be one of {list(OPTION_LETTERS[: len(options)])}"
            )
        out.append(
            FeedbackExample(
                conversation=check.text(where, entry, "conversation"),
                principle=check.text(where, entry, "principle"),
                options=tuple(options),
                answer=answer,
                reasoning=check.text(where, entry, "reasoning", allow_empty=True) if "reasoning" in entry else "",
            )
        )
    return tuple(out)


def parse_constitution(data: Any, source: str = "<data>") -> Constitution:
    """Validate raw data (as read from YAML) and build a :class:`Constitution`."""
    check = _Checker()
    if not check.keys("top level", data, TOP_LEVEL_REQUIRED, TOP_LEVEL_OPTIONAL):
        raise ConstitutionError(source, check.errors)
    name = check.text("top level", data, "name")
    version = check.text("top level", data, "version")
    description = check.text("top level", data, "description", allow_empty=True)
    constitution = Constitution(
        name=name,
        version=version,
        description=description,
        critiques=_critiques(check, data.get("critiques", [])),
        feedback=_feedback(check, data.get("feedback", [])),
        few_shot=_few_shot(check, data.get("few_shot", [])),
        feedback_few_shot=_feedback_few_shot(check, data.get("feedback_few_shot", [])),
    )
    if not constitution.critiques and not constitution.feedback and not check.errors:
        check.errors.append("top level: 'critiques' and 'feedback' are both empty; a constitution needs principles")
    if check.errors:
        raise ConstitutionError(source, check.errors)
    return constitution


BUNDLED_DIR = Path(__file__).resolve().parent


def resolve_constitution_path(path_or_name: str | Path) -> Path:
    """A file path, or the name of a bundled constitution (``harmless``)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    bundled = BUNDLED_DIR / f"{path_or_name}.yaml"
    if bundled.exists() and not path.suffix:
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"constitution file {str(path)!r} not found (bundled constitutions: {names})")


def load_constitution(path_or_name: str | Path) -> Constitution:
    """Read and validate a constitution YAML file, or a bundled one by name."""
    path = resolve_constitution_path(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstitutionError(str(path), [f"cannot read file: {exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConstitutionError(str(path), [f"not valid YAML: {exc}"]) from exc
    return parse_constitution(data, source=str(path))


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as YAML block literals so saved files stay readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and value == value.rstrip(" ") and "\t" not in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def dump_constitution(constitution: Constitution) -> str:
    return yaml.dump(
        constitution.to_dict(), Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True, width=100
    )


def save_constitution(constitution: Constitution, path: str | Path) -> Path:
    """Write the constitution as YAML; loading it back gives the same sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_constitution(constitution), encoding="utf-8")
    tmp.replace(path)
    return path

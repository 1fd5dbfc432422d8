"""Import constitutions published in other projects' JSON layouts.

Two layouts are understood:

* Anthropic's, released with the Constitutional AI paper (Bai et al. 2022) in
  ``anthropics/ConstitutionalHarmlessnessPaper``: a critique/revision file mapping names to
  ``{"prompt": [...], "edit_request": ...}``, a list of multiple-choice principles
  (``RLMadisonInstructions.json``, each ending in "Options:"), and few-shot examples written
  as raw ``Human: / Assistant: / CritiqueRequest: / ...`` transcripts;
* Hugging Face's ``llm-swarm``, in both of its layouts: ``examples/constitutional-ai``'s
  ``{"constitutions": [{"critic", "revision"}], "system_chat": [[{"role", "content"}, ...]]}``,
  and ``examples/hh``'s bare list ``[{"critic", "revision"}, ...]`` (no few-shot examples).

Both importers only translate: they build the raw dict in the YAML file's layout and hand it
to :func:`constitutions.loader.parse_constitution`, so every check a hand-written YAML file
gets applies here too. Problems with the source files themselves (unreadable, not JSON, an
entry missing a field, a transcript that does not parse) raise
:class:`ConstitutionImportError` naming the file and the entry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from constitutions.loader import parse_constitution
from constitutions.schema import Constitution

# Speaker markers of Anthropic's raw transcripts, mapped to chat roles. A marker counts only
# at the start of the string or of a paragraph, so "Critique:" inside a sentence is text.
TRANSCRIPT_ROLES = {
    "Human": "user",
    "Assistant": "assistant",
    "CritiqueRequest": "user",
    "Critique": "assistant",
    "RevisionRequest": "user",
    "Revision": "assistant",
}
_MARKER = re.compile(r"(?:\A|\n\n)(CritiqueRequest|RevisionRequest|Critique|Revision|Human|Assistant):")
CRITIQUE_ROUND = ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]

# Placeholders such as "[HH CONVERSATION]" or "[[CONVERSATION]]" that templates leave for the
# conversation; the principle is the text around them.
_PLACEHOLDER = re.compile(r"[ \t]*\[\[?[A-Z][A-Z0-9 _\-]*\]\]?[ \t]*")
_CONVERSATION_INTRO = re.compile(
    r"^Consider the following conversation between a human and an assistant:\s*", re.IGNORECASE
)


class ConstitutionImportError(ValueError):
    """A source file cannot be imported; the message names the file and the entry at fault."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"cannot import {self.source}: {problem}")


def _read_json(path: str | Path, expected: type | tuple[type, ...]) -> Any:
    """Parse a JSON file (never pickle) whose top level must be ``expected`` (dict and/or list)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstitutionImportError(path, f"cannot read file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstitutionImportError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, expected):
        names = {dict: "a JSON object", list: "a JSON list"}
        wanted = " or ".join(names[t] for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ConstitutionImportError(path, f"top level must be {wanted}, got {type(data).__name__}")
    return data


def _strip_framing(text: str, prefix: str, suffix: str) -> str:
    """Remove a leading ``prefix`` and trailing ``suffix`` word (e.g. "CritiqueRequest:")."""
    text = text.strip()
    if text.startswith(prefix):
        text = text[len(prefix):].strip()
    if text.endswith(suffix):
        text = text[: -len(suffix)].strip()
    return text


def _require_text(path: Path, where: str, entry: dict, key: str) -> str:
    value = entry.get(key)
    if key not in entry:
        raise ConstitutionImportError(path, f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise ConstitutionImportError(path, f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- Anthropic


def _anthropic_critiques(path: Path) -> list[dict[str, str]]:
    """One principle per critique prompt; extra prompts of an entry get ids ``name.1``, ..."""
    out = []
    for name, entry in _read_json(path, dict).items():
        where = f"entry {name!r}"
        if not isinstance(entry, dict):
            raise ConstitutionImportError(path, f"{where}: must be an object, got {type(entry).__name__}")
        if "prompt" not in entry:
            raise ConstitutionImportError(path, f"{where}: missing field 'prompt'")
        prompts = [entry["prompt"]] if isinstance(entry["prompt"], str) else entry["prompt"]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConstitutionImportError(path, f"{where}: field 'prompt' must be a non-empty list of strings")
        revision = _strip_framing(_require_text(path, where, entry, "edit_request"), "RevisionRequest:", "Revision:")
        if not revision:
            raise ConstitutionImportError(path, f"{where}: field 'edit_request' is empty")
        for k, prompt in enumerate(prompts):
            critique = _strip_framing(prompt, "CritiqueRequest:", "Critique:")
            if not critique:
                raise ConstitutionImportError(path, f"{where}: field 'prompt'[{k}] is empty")
            principle_id = name if k == 0 else f"{name}.{k}"
            out.append({"id": principle_id, "critique": critique, "revision": revision})
    return out


def clean_feedback_principle(text: str) -> str:
    """The principle question alone: no conversation placeholder, intro or trailing "Options:"."""
    text = _PLACEHOLDER.sub(" ", text)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    text = "\n\n".join(p for p in paragraphs if p)
    text = _CONVERSATION_INTRO.sub("", text)
    return _strip_framing(text, "", "Options:")


def _anthropic_feedback(path: Path) -> list[dict[str, str]]:
    """Cleaned principles, ids ``feedback-00``...; repeats after cleaning are dropped."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, raw in enumerate(_read_json(path, list)):
        if not isinstance(raw, str):
            raise ConstitutionImportError(path, f"entry {i}: must be a string, got {type(raw).__name__}")
        text = clean_feedback_principle(raw)
        if not text:
            raise ConstitutionImportError(path, f"entry {i}: no principle text left after removing framing")
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": f"feedback-{len(out):02d}", "text": text})
    return out


def parse_transcript(transcript: str) -> tuple[list[str], list[str]]:
    """Split a raw transcript into (markers, contents); raises ValueError on text before the first."""
    pieces = _MARKER.split(transcript)
    if pieces[0].strip():
        raise ValueError(f"text before the first speaker marker: {pieces[0].strip()[:60]!r}")
    markers, contents = pieces[1::2], [c.strip() for c in pieces[2::2]]
    # The published transcripts end with an empty "Human:", the cue for the next turn.
    if len(markers) > 1 and markers[-1] == "Human" and not contents[-1]:
        markers, contents = markers[:-1], contents[:-1]
    return markers, contents


def _transcript_problem(markers: list[str], contents: list[str]) -> str | None:
    """Why the markers are not (Human, Assistant)+ then critique/revision rounds; None if fine.

    The published few-shot transcripts often hold a multi-turn conversation before the first
    critique request, so any number of Human/Assistant exchanges is accepted."""
    start = markers.index("CritiqueRequest") if "CritiqueRequest" in markers else len(markers)
    conversation, rounds = markers[:start], markers[start:]
    well_formed = (
        len(conversation) >= 2
        and conversation == ["Human", "Assistant"] * (len(conversation) // 2)
        and bool(rounds)
        and len(rounds) % 4 == 0
        and all(rounds[k : k + 4] == CRITIQUE_ROUND for k in range(0, len(rounds), 4))
    )
    if not well_formed:
        found = ", ".join(markers) or "no speaker markers"
        return (
            f"found {found}; expected one or more Human/Assistant exchanges, then one or more rounds of "
            f"CritiqueRequest, Critique, RevisionRequest, Revision"
        )
    for marker, content in zip(markers, contents):
        if not content:
            return f"the {marker!r} turn is empty"
    return None


def _anthropic_few_shot(path: Path) -> list[list[dict[str, str]]]:
    out = []
    for i, transcript in enumerate(_read_json(path, list)):
        where = f"few-shot example {i}"
        if not isinstance(transcript, str):
            raise ConstitutionImportError(path, f"{where}: must be a string, got {type(transcript).__name__}")
        try:
            markers, contents = parse_transcript(transcript)
        except ValueError as exc:
            raise ConstitutionImportError(path, f"{where}: {exc}") from exc
        problem = _transcript_problem(markers, contents)
        if problem:
            raise ConstitutionImportError(path, f"{where}: {problem}")
        out.append([{"role": TRANSCRIPT_ROLES[m], "content": c} for m, c in zip(markers, contents)])
    return out


def import_anthropic(
    critiques: str | Path,
    feedback: str | Path | None = None,
    few_shot: str | Path | None = None,
    *,
    name: str = "imported-anthropic",
    version: str = "1.0",
    description: str = "",
) -> Constitution:
    """Build a constitution from Anthropic's published Constitutional AI prompt files.

    ``critiques`` is the critique/revision instruction file, ``feedback`` the RL
    multiple-choice principles, ``few_shot`` the critique/revision transcripts.
    """
    paths = [Path(p) for p in (critiques, feedback, few_shot) if p is not None]
    data = {
        "name": name,
        "version": version,
        "description": description
        or f"Imported from Anthropic's published Constitutional AI prompts ({', '.join(p.name for p in paths)})",
        "critiques": _anthropic_critiques(Path(critiques)),
        "feedback": _anthropic_feedback(Path(feedback)) if feedback is not None else [],
        "few_shot": _anthropic_few_shot(Path(few_shot)) if few_shot is not None else [],
    }
    return parse_constitution(data, source=", ".join(str(p) for p in paths))


# --------------------------------------------------------------------------- llm-swarm


def _llm_swarm_chat(path: Path, system_chat: Any) -> list[list[dict[str, str]]]:
    """The ``system_chat`` examples as they are, each message cut down to role and content."""
    if not isinstance(system_chat, list):
        raise ConstitutionImportError(path, f"field 'system_chat' must be a list, got {type(system_chat).__name__}")
    out = []
    for i, example in enumerate(system_chat):
        if not isinstance(example, list):
            raise ConstitutionImportError(
                path, f"system_chat[{i}]: must be a list of messages, got {type(example).__name__}"
            )
        messages = []
        for j, message in enumerate(example):
            where = f"system_chat[{i}][{j}]"
            if not isinstance(message, dict):
                raise ConstitutionImportError(path, f"{where}: must be an object, got {type(message).__name__}")
            role = _require_text(path, where, message, "role")
            messages.append({"role": role, "content": _require_text(path, where, message, "content")})
        out.append(messages)
    return out


LLM_SWARM_LAYOUTS = {
    list: "a bare list of critic/revision pairs (llm-swarm examples/hh)",
    dict: "an object with 'constitutions' and 'system_chat' (llm-swarm examples/constitutional-ai)",
}


def import_llm_swarm(
    path: str | Path,
    *,
    name: str = "imported-llm-swarm",
    version: str = "1.0",
    description: str = "",
) -> Constitution:
    """Build a constitution from an llm-swarm ``constitution.json`` in either of its layouts
    (:data:`LLM_SWARM_LAYOUTS`; critiques, and few-shot examples where the file has them).
    The layout read is named in the description."""
    path = Path(path)
    raw = _read_json(path, (dict, list))
    if isinstance(raw, list):
        entries, field, system_chat = raw, "", []
    else:
        if "constitutions" not in raw:
            raise ConstitutionImportError(
                path, f"missing field 'constitutions' (llm-swarm files are {' or '.join(LLM_SWARM_LAYOUTS.values())})")
        entries, field, system_chat = raw["constitutions"], "constitutions", raw.get("system_chat", [])
        if not isinstance(entries, list):
            raise ConstitutionImportError(path, f"field 'constitutions' must be a list, got {type(entries).__name__}")
    critiques = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise ConstitutionImportError(path, f"{where}: must be an object, got {type(entry).__name__}")
        critique = _require_text(path, where, entry, "critic").strip()
        revision = _require_text(path, where, entry, "revision").strip()
        critiques.append({"id": f"critique-{i:02d}", "critique": critique, "revision": revision})
    data = {
        "name": name,
        "version": version,
        "description": description or f"Imported from llm-swarm's {path.name}: {LLM_SWARM_LAYOUTS[type(raw)]}",
        "critiques": critiques,
        "feedback": [],  # neither layout has multiple-choice principles
        "few_shot": _llm_swarm_chat(path, system_chat),
    }
    return parse_constitution(data, source=str(path))

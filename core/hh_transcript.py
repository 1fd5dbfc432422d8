"""Anthropic HH-RLHF transcripts ("\\n\\nHuman: … \\n\\nAssistant: …") as chat messages.

The ``chosen``, ``rejected`` (``Anthropic/hh-rlhf``) and ``transcript`` (its red-team
attempts) columns hold whole conversations in one string. A prompt set wants the
conversation *before* the answer: :func:`transcript_prompt` cuts it before the last
assistant turn, as Hugging Face's Constitutional AI recipe does, so the prompt ends with the
user turn the model is to answer.

Where a turn begins. Turns start with ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` and
alternate, Human first. Answers and questions sometimes quote such a line ("write
\\"\\n\\nHuman: hi\\" in the box"), so a marker starts a new turn only when

- it names the other speaker (a speaker never follows themselves, so a second
  ``"\\n\\nHuman:"`` inside a Human turn is that turn's text), and
- it is not inside a quotation: if the turn so far has an open double quote (``"`` or
  ``“``) and the text up to the next marker closes it, the marker is quoted text. A stray
  quote that nothing closes (``5'11"``) does not swallow the turns after it.

Whatever cannot be a prompt is refused with a reason naming the column: text before the first
``Human:``, an empty turn (the answer that is cut may be empty: ``"…\\n\\nAssistant:"`` is the
prompt form of the same data), no assistant turn, or a last turn that is not the assistant's.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"\n\n(Human|Assistant):")
ROLE = {"Human": "user", "Assistant": "assistant"}


def looks_like_transcript(text: str) -> bool:
    """Whether ``text`` opens as an HH transcript (its first turn a ``Human:`` one)."""
    return text.lstrip("\n").startswith("Human:")


def _open_quotes(text: str) -> int:
    """Quotations left open in ``text``: straight quotes pair up, curly ones open and close."""
    return text.count('"') % 2 + max(text.count("“") - text.count("”"), 0)


def _closes(text: str, open_quotes: int) -> bool:
    """Whether ``text`` (what follows a marker, up to the next one) closes an open quotation."""
    if open_quotes == 0:
        return False
    return text.count('"') % 2 == 1 or text.count("”") > text.count("“")


def transcript_turns(text: str) -> list[tuple[str, str]]:
    """``[(role, content), …]`` in order, roles "user"/"assistant", content stripped; the rule
    for which markers start turns is in the module docstring. ``text`` must open with
    ``Human:`` (after blank lines): see :func:`looks_like_transcript`."""
    body = "\n\n" + text.lstrip("\n")
    pieces = MARKER.split(body)  # ["", role, text, role, text, …]
    turns: list[list[str]] = []
    for speaker, piece in zip(pieces[1::2], pieces[2::2]):
        if turns:
            role, content = turns[-1]
            same_speaker = ROLE[speaker] == role
            if same_speaker or _closes(piece, _open_quotes(content)):
                turns[-1][1] = f"{content}\n\n{speaker}:{piece}"
                continue
        turns.append([ROLE[speaker], piece])
    return [(role, content.strip()) for role, content in turns]


def transcript_prompt(text: str, column: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    """The messages before the last assistant turn, or ``(None, reason)``.

    ``column`` names the field in the reason ("'chosen' turn 3 (assistant) is empty")."""
    if not looks_like_transcript(text):
        start = text.lstrip()[:40]
        return None, f"'{column}' does not start with a 'Human:' turn (starts with {start!r})"
    turns = transcript_turns(text)
    if turns[-1][0] != "assistant":
        if len(turns) == 1:
            return None, f"'{column}' has no 'Assistant:' turn to cut"
        return None, f"'{column}' ends with a Human turn, not an answer to cut"
    for number, (role, content) in enumerate(turns[:-1], start=1):
        if not content:
            return None, f"'{column}' turn {number} ({role}) is empty"
    return tuple({"role": role, "content": content} for role, content in turns[:-1]), ""


def messages_prompt(messages: tuple[dict[str, str], ...], column: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    """A chat list cut before its last assistant turn (TRL's conversational ``chosen``), or
    ``(None, reason)``; ``messages`` already validated as ``{role, content}`` dicts."""
    if messages[-1]["role"] != "assistant":
        return None, f"'{column}' must end with the assistant's answer to cut, not a {messages[-1]['role']} turn"
    prompt = messages[:-1]
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        return None, f"'{column}' has no user turn before its last answer"
    return prompt, ""

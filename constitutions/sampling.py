"""Seeded principle sampling.

Each row's draw depends only on ``(seed, row key, purpose)``, never on the order rows are
processed or which actor handles them, so a resumed or re-sharded run samples the same
principles, and the chosen ids are recorded in the output.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from constitutions.schema import Constitution


def principle_rng(seed: int, key: str | int, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"{seed}:{purpose}:{key}")


def sample_ids(ids: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` ids, without repeats while the pool lasts (a chain of revisions sees as
    many different principles as possible), then cycling through fresh shuffles."""
    if not ids:
        raise ValueError("cannot sample from an empty list of principles")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    drawn: list[str] = []
    while len(drawn) < count:
        drawn.extend(rng.sample(list(ids), min(len(ids), count - len(drawn))))
    return drawn


PrincipleDraw = Literal["independent", "without-replacement"]


def sample_critique_ids(constitution: Constitution, rounds: int, *, seed: int, key: str | int,
                        draw: PrincipleDraw = "independent") -> list[str]:
    """Critique/revision principle ids for the ``rounds`` revision rounds of one row.

    ``independent``: each round draws uniformly from all principles, as §3.1 of the paper
    does ("randomly sampled" per step; a principle may repeat). ``without-replacement``: no
    repeats while the principles last (:func:`sample_ids`)."""
    if not constitution.critiques:
        raise ValueError(f"constitution {constitution.name!r} has no critique principles")
    ids = [p.id for p in constitution.critiques]
    rng = principle_rng(seed, key, "critique")
    if draw == "independent":
        return [rng.choice(ids) for _ in range(rounds)]
    if draw == "without-replacement":
        return sample_ids(ids, rounds, rng)
    raise ValueError(f"draw must be 'independent' or 'without-replacement', got {draw!r}")


def sample_feedback_ids(constitution: Constitution, count: int, *, seed: int, key: str | int) -> list[str]:
    """Feedback principle ids to ensemble for one comparison."""
    if not constitution.feedback:
        raise ValueError(f"constitution {constitution.name!r} has no feedback principles")
    ids = [p.id for p in constitution.feedback]
    return sample_ids(ids, count, principle_rng(seed, key, "feedback"))

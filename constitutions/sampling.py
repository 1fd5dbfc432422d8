"""Seeded principle sampling.

Each row's draw depends only on ``(seed, row key, purpose)``, never on the order rows are
processed or which actor handles them, so a resumed or re-sharded run samples the same
principles, and the chosen ids are recorded in the output.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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


def sample_critique_ids(constitution: Constitution, rounds: int, *, seed: int, key: str | int) -> list[str]:
    """Critique/revision principle ids for the ``rounds`` revision rounds of one row."""
    if not constitution.critiques:
        raise ValueError(f"constitution {constitution.name!r} has no critique principles")
    ids = [p.id for p in constitution.critiques]
    return sample_ids(ids, rounds, principle_rng(seed, key, "critique"))


def sample_feedback_ids(constitution: Constitution, count: int, *, seed: int, key: str | int) -> list[str]:
    """Feedback principle ids to ensemble for one comparison."""
    if not constitution.feedback:
        raise ValueError(f"constitution {constitution.name!r} has no feedback principles")
    ids = [p.id for p in constitution.feedback]
    return sample_ids(ids, count, principle_rng(seed, key, "feedback"))

"""``manifest.json``: what a run is (config, lineage, fingerprint) and how far it got.

The fingerprint covers every setting that changes the output (model, constitution, seed,
sampling, shard size, input file). Rerunning into the same directory with the same
fingerprint resumes; with a different one it refuses, naming the settings that differ.
Per-shard status, rows, attempts, seconds and tokens are recorded for people and
dashboards; whether a shard is done is decided by its data file (see ``shards.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.run_identity import RunMismatchError, same_identity, settle_run_id

MANIFEST = "manifest.json"


def file_fingerprint(path: str | Path) -> str:
    """Content hash of a file, or of a directory's file names, sizes and mtimes."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = child.stat()
            digest.update(f"{child.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    else:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardState:
    status: str = "pending"  # pending | done | failed
    rows: int = 0
    rows_out: int = 0
    rejected: int = 0
    attempts: int = 0
    seconds: float = 0.0
    started_at: float = 0.0  # wall clock (time.time) of the last attempt's start and end
    finished_at: float = 0.0
    tokens: int = 0
    worker: str = ""
    last_error: str = ""


@dataclass
class RunManifest:
    path: Path
    stage: str
    identity: dict[str, Any]
    config: dict[str, Any]
    created: float = field(default_factory=time.time)
    input: dict[str, Any] = field(default_factory=dict)
    shards: dict[int, ShardState] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    save_interval_s: float = 2.0
    _last_save: float = 0.0
    _interval: float = 2.0

    @classmethod
    def open(cls, run_dir: Path, stage: str, identity: dict[str, Any], config: dict[str, Any],
             *, run_name: str = "") -> RunManifest:
        """Load the run's manifest if present (checking it is the same run) or start one.

        The run id is kept here from the first start (see ``core.run_identity``)."""

        path = Path(run_dir) / MANIFEST
        if not path.exists():
            return cls(path=path, stage=stage, identity=identity, config=config,
                       run_id=settle_run_id(Path(run_dir), None, run_name))
        data = json.loads(path.read_text(encoding="utf-8"))
        previous = data.get("identity", {})
        if data.get("stage") != stage or not same_identity(previous, identity):
            differing = sorted(k for k in previous if previous.get(k) != identity.get(k))
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {identity.get(k)!r}" for k in differing[:8])
            raise RunMismatchError(
                f"{run_dir} holds a different {data.get('stage')!r} run ({detail or 'stage differs'}); "
                "use a new --out directory, or delete this one to start over"
            )
        manifest = cls(
            path=path,
            stage=stage,
            identity=identity,
            config=config,
            created=data.get("created", time.time()),
            input=data.get("input", {}),
            shards={int(k): ShardState(**v) for k, v in data.get("shards", {}).items()},
            summary=data.get("summary", {}),
            # manifests written before run ids existed get one now, kept from here on
            run_id=settle_run_id(Path(run_dir), data.get("run_id"), run_name),
        )
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "run_id": self.run_id,
            "identity": self.identity,
            "config": self.config,
            "created": self.created,
            "updated": time.time(),
            "input": self.input,
            "shards": {str(k): vars(v).copy() for k, v in sorted(self.shards.items())},
            "summary": self.summary,
        }

    def save(self, *, force: bool = True) -> None:
        """Write atomically. With ``force=False`` skip if the last write was recent: with
        thousands of shards, rewriting after every shard would dominate the driver's time.
        The interval stretches to ten times the last write's duration, so a huge manifest
        never takes more than a tenth of the driver's time."""
        if not force and time.monotonic() - self._last_save < self._interval:
            return
        started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, self.path)
        self._last_save = time.monotonic()
        self._interval = max(self.save_interval_s, 10 * (self._last_save - started))

"""Where a worker finds its model on whatever node it runs on.

A ``--model`` value is resolved on the driver, but engines and Train workers may run on other
nodes, where a driver-side folder can be missing or hold something else. A :class:`ModelSource`
carries enough to check or rebuild the model on the node that uses it:

* ``"path"``: the same folder must exist on every node (a shared volume). :meth:`local_path`
  checks it exists here and that its fingerprint matches the driver's, and otherwise raises
  :class:`ModelNotOnNodeError` naming this node, the path and the remedies.
* ``"hub"``: a hub id; every node downloads it itself.
* ``"staged"``: the driver put the files into Ray's object store in chunks; the first caller on
  each node writes them to ``cache_dir()/staged/<name>-<fingerprint[:12]>`` under a file lock,
  so concurrent workers on one node copy the model once.

This module is a low layer: it imports neither vLLM nor ``workflows``, and ``ray`` only inside
the functions that need it, so it also works (for ``"path"`` and ``"hub"``) outside Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "RAY_CAI_CACHE"
STAGED_MARKER = ".ray-cai-staged"
REMEDY = (
    f"put the model on a volume every node mounts (e.g. under {CACHE_ENV}), "
    "pass a hub id such as 'org/name', or pass --stage-model to copy it to each node "
    "through Ray's object store"
)

# (kind, path, fingerprint) -> the verified or staged path on this node, per process.
_RESOLVED: dict[tuple[str, str, str], str] = {}


class ModelNotOnNodeError(FileNotFoundError):
    """The model a worker was given is not usable on the node it runs on."""

    def __init__(self, spec: str, where: str, reason: str):
        self.spec, self.where, self.reason = spec, where, reason
        super().__init__(f"model {spec!r} is not usable on {where}: {reason}; {REMEDY}")


def cache_dir() -> Path:
    """Where materialized models live on this node: ``$RAY_CAI_CACHE`` or ``~/.cache/ray-cai/models``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ray-cai" / "models"


def model_files(root: str | Path) -> list[tuple[str, Path]]:
    """Every file of a model folder as ``(relative posix name, path)``, sorted, recursively.

    Names starting with a dot at any level (markers, locks, ``.cache`` of hub downloads) are
    skipped: they are bookkeeping, not the model, and differ between copies.
    """
    root = Path(root)
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def model_fingerprint(path: str | Path) -> str:
    """sha256 of ``config.json``, of every file's relative name and size, and of the
    ``*.index.json`` weight maps. Cheap for a 70B model: weight bytes are not read."""
    root = Path(path)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for name, file in model_files(root):
        digest.update(f"\n{name}\0{file.stat().st_size}".encode())
        if name.endswith(".index.json"):
            digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """Where a worker finds its model on whatever node it runs on."""

    spec: str  # what the user gave (--model value), for messages
    path: str  # the resolved path on the driver (or the hub id)
    kind: str  # "path" (same path on every node), "hub" (each node loads it), "staged" (object store)
    fingerprint: str  # hash of config.json + the file list (names and sizes), "" for hub
    blobs: tuple = field(default=(), repr=False)  # staged: ((relative_path, (ObjectRef, ...)), ...)

    def __post_init__(self):
        if self.kind not in ("path", "hub", "staged"):
            raise ValueError(f"ModelSource.kind must be 'path', 'hub' or 'staged', not {self.kind!r}")

    def local_path(self) -> str:
        """The path (or hub id) to load on this node; copies a staged model here first."""
        return resolve_on_node(self)[0]


def resolve_on_node(source: ModelSource) -> tuple[str, int]:
    """``(path on this node, bytes copied here by this call)``; the count is 0 unless this
    call staged the model. Results are cached per process, so repeated calls are cheap."""
    key = (source.kind, source.path, source.fingerprint)
    if source.kind == "hub":
        return source.path, 0
    if key in _RESOLVED:
        return _RESOLVED[key], 0
    if source.kind == "path":
        _check_folder(source, Path(source.path))
        _RESOLVED[key] = source.path
        return source.path, 0
    target, copied = _stage_here(source)
    _RESOLVED[key] = str(target)
    return str(target), copied


def node_description() -> str:
    """``node <id prefix> (<ip>, <hostname>)`` inside Ray, ``host <hostname>`` outside it."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # every Ray worker has imported it; elsewhere don't pay for it
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        return f"node {node_id[:12]} ({ray.util.get_node_ip_address()}, {host})"
    return f"host {host}"


def _check_folder(source: ModelSource, folder: Path) -> None:
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise ModelNotOnNodeError(source.spec, node_description(), f"{folder} {what} here")
    found = model_fingerprint(folder)
    if found != source.fingerprint:
        raise ModelNotOnNodeError(
            source.spec,
            node_description(),
            f"{folder} holds different files here than on the driver "
            f"(fingerprint {found[:12]}, driver {source.fingerprint[:12]})",
        )


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """An inter-process lock (also between threads: each ``open`` is its own flock)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage_here(source: ModelSource) -> tuple[Path, int]:
    """Write a staged model into this node's cache once; ``(folder, bytes written)``.

    The chunks go into a temporary sibling folder that is renamed into place after its
    fingerprint is checked and its marker written, so a crash never leaves a folder that looks
    complete. Partial folders left by killed copiers are removed under the lock.
    """
    import ray

    target = cache_dir() / "staged" / f"{Path(source.path).name}-{source.fingerprint[:12]}"
    if (target / STAGED_MARKER).is_file():
        return target, 0
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if (target / STAGED_MARKER).is_file():
            return target, 0
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = target.parent / f".{target.name}.partial-{os.getpid()}"
        started, written = time.monotonic(), 0
        for name, refs in source.blobs:
            destination = partial / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(destination, "wb") as handle:
                for ref in refs:  # one chunk in memory at a time
                    written += handle.write(ray.get(ref))
        if not partial.is_dir() or model_fingerprint(partial) != source.fingerprint:
            shutil.rmtree(partial, ignore_errors=True)
            reason = "the staged copy does not match the driver's files"
            raise ModelNotOnNodeError(source.spec, node_description(), reason)
        seconds = time.monotonic() - started
        note = f"staged from {source.path} by pid {os.getpid()}: {written} bytes in {seconds:.1f} s\n"
        (partial / STAGED_MARKER).write_text(note)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target, written

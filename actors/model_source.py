"""Where a worker finds its model on whatever node it runs on.

A ``--model`` value is resolved on the driver, but engines and Train workers may run on other
nodes, where a driver-side folder can be missing or hold something else. A :class:`ModelSource`
carries enough to check or rebuild the model on the node that uses it:

* ``"path"``: the same folder must exist on every node (a shared volume). :meth:`local_path`
  checks it exists here and that its fingerprint matches the driver's, and otherwise raises
  :class:`ModelNotOnNodeError` naming this node, the path and the remedies.
* ``"hub"``: a hub id; :func:`download_hub_model` puts it into the node's Hugging Face cache
  under a lock file that lives in that cache. With the cache on the shared volume (``HF_HOME``
  in ``cluster/``) the model is downloaded once per cluster and every node waits for it, instead
  of every node writing the same files into one cache at once; a node-local cache gets its own
  download, as it must.
* ``"staged"``: the driver put the files into Ray's object store in chunks; the first caller on
  each node writes them to ``staging_root(stage_dir)/<name>-<fingerprint[:12]>`` on that node's
  own disk, never on the shared volume: a copy per node is the point of staging, and local disk
  is what a node reads fastest and what no other node can clobber. Concurrent workers on one
  node copy the model once (:mod:`actors.atomic_files`).

This module is a low layer: it imports neither vLLM nor ``workflows``, and ``ray`` only inside
the functions that need it, so it also works (for ``"path"`` and ``"hub"``) outside Ray.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors.atomic_files import exclusive_lock, partial_folder, publish, remove_stale_partials

CACHE_ENV = "RAY_CAI_CACHE"
STAGED_MARKER = ".ray-cai-staged"
STAGING_FOLDER = "ray-cai-staged"  # under the node's temp folder, when no stage_dir is set
# Files of hub repos that neither vLLM nor transformers (PyTorch) read: other frameworks' weights
# and the original checkpoints some repos carry beside the converted ones.
UNLOADED_HUB_FILES = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot",
                      "*.tflite", "*.mlmodel"]
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


def staging_root(stage_dir: str = "") -> Path:
    """The node-local folder staged models are copied into: ``stage_dir`` (``--stage-dir``) or
    ``<this node's temp folder>/ray-cai-staged``, evaluated on the node that stages."""
    return Path(stage_dir).expanduser() if stage_dir else Path(tempfile.gettempdir()) / STAGING_FOLDER


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
    kind: str  # "path" (same path on every node), "hub" (downloaded under a lock), "staged" (object store)
    fingerprint: str  # hash of config.json + the file list (names and sizes), "" for hub
    blobs: tuple = field(default=(), repr=False)  # staged: ((relative_path, (ObjectRef, ...)), ...)
    stage_dir: str = ""  # staged: ClusterOptions.stage_dir, the node-local folder ("": see staging_root)

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
    if key in _RESOLVED:
        return _RESOLVED[key], 0
    if source.kind == "hub":
        _RESOLVED[key] = download_hub_model(source.path)
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


def download_hub_model(repo_id: str) -> str:
    """The folder of ``repo_id`` in this node's Hugging Face cache, downloaded there if needed.

    One node at a time per model and cache: the lock file sits in the cache itself, so it is
    exactly as shared as the cache. ``huggingface_hub`` locks its own files with ``flock``,
    which NFS clients do not reliably share, so nodes downloading into one shared cache at once
    could write the same blob together; under this lock the first node downloads and the others
    find the files there (``snapshot_download`` still asks the hub for the newest revision, and
    fetches only what changed). ``HF_HUB_OFFLINE=1`` with a pre-filled cache works as before.

    Only what vLLM and transformers load is fetched, as their own downloads would: safetensors
    weights, or ``*.bin`` ones when a repo has no safetensors (many repos carry both, and some
    a second copy in ``original/``, GGUF or ONNX files).
    """
    from huggingface_hub import constants, snapshot_download

    cache = Path(constants.HF_HUB_CACHE)
    # beside huggingface_hub's own locks: `hf cache scan` skips that folder, not other strangers
    with exclusive_lock(cache / ".locks" / f"ray-cai-{repo_id.replace('/', '--')}.lock"):
        folder = snapshot_download(repo_id, cache_dir=cache, ignore_patterns=["*.bin", *UNLOADED_HUB_FILES])
        if not any(Path(folder).rglob("*.safetensors")):
            folder = snapshot_download(repo_id, cache_dir=cache, ignore_patterns=UNLOADED_HUB_FILES)
        return folder


def _stage_here(source: ModelSource) -> tuple[Path, int]:
    """Write a staged model into this node's staging folder once; ``(folder, bytes written)``.

    The chunks go into a temporary sibling folder with a unique name (:func:`partial_folder`:
    host, PID and a random token, as PIDs collide between pods), which is renamed into place
    after its fingerprint is checked and its marker written, so a crash never leaves a folder
    that looks complete. The lock makes concurrent workers on this node copy once; should two
    copy anyway (a lock taken over from a stalled holder), the first rename wins and the other
    copy is discarded. Partial folders of writers that are gone are removed under the lock.
    """
    import ray

    root = staging_root(source.stage_dir)
    shared = cache_dir().resolve()
    if root.resolve() == shared or shared in root.resolve().parents:
        raise ModelNotOnNodeError(source.spec, node_description(), f"the staging folder {root} is inside the "
                                  f"shared model cache {shared}; staging writes node-local disk only")
    target = root / f"{Path(source.path).name}-{source.fingerprint[:12]}"
    if (target / STAGED_MARKER).is_file():
        return target, 0
    with exclusive_lock(root / f".{target.name}.lock"):
        if (target / STAGED_MARKER).is_file():
            return target, 0
        remove_stale_partials(target)
        partial = partial_folder(target)
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
        note = f"staged from {source.path} into {partial.name}: {written} bytes in {seconds:.1f} s\n"
        (partial / STAGED_MARKER).write_text(note)
        published = publish(partial, target, STAGED_MARKER)
    return target, written if published else 0

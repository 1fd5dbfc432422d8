"""Writing a folder that other processes, on this host or on others, may be writing at once.

Used for staged models (node-local disk), hub downloads and the default model (both possibly on
a shared NFS volume). Three pieces:

* :func:`partial_folder` names a temporary sibling ``.<name>.partial-<writer tag>`` of a target
  folder; the :func:`writer_tag` is unique: hostname, a key of this kernel boot and PID
  namespace, the PID and a random token. A PID alone collides: the processes of every pod
  (every container) get the same small PIDs, and a shared volume sees them all.
  :func:`remove_stale_partials` removes those whose writers are gone.
* :func:`publish` moves a finished temporary folder into place with one ``os.rename``. Renaming
  a folder onto a non-empty one fails, so of two writers the first wins and the other discards
  its copy; a reader never sees a half-written folder.
* :func:`exclusive_lock` keeps a second writer from doing the same work at the same time. It is
  a lock *file* created with ``O_CREAT | O_EXCL``, which is atomic on local disks and on NFSv3+,
  where ``fcntl.flock`` is emulated or not shared between clients at all. A heartbeat refreshes
  it while held; a waiter takes it over when its holder is provably dead on this host, or when
  its heartbeat has not moved for ``stale_after_s`` of the waiter's own clock (clocks of
  different hosts are never compared). The lock only saves work: correctness comes from the
  unique names and the atomic rename, so a takeover of a holder that was merely slow costs a
  second copy, not a corrupt one.

No ``ray`` here: this is plain file handling, tested without a cluster.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

# Longer than NFS attribute caching (acregmax, 60 s by default) plus a few heartbeats, so a
# waiter on another client sees at least one heartbeat of a live holder before giving up on it.
LOCK_STALE_AFTER_S = 300.0
LOCK_HEARTBEAT_S = 30.0
# A partial folder nobody wrote into for this long belongs to a writer that died elsewhere (a
# live one writes chunk after chunk; even a 256 MB chunk at 1 MB/s lands within minutes).
PARTIAL_STALE_AFTER_S = 3600.0
UNKNOWN_NAMESPACE = "unknown"


@functools.cache
def _namespace_key() -> str:
    """8 hex digits naming this kernel boot and PID namespace: a PID names one process only
    within both (containers with the host's hostname still have PID namespaces of their own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: PIDs cannot be placed, so no writer is ever called dead
        return UNKNOWN_NAMESPACE
    return hashlib.sha256(f"{boot} {pid_namespace}".encode()).hexdigest()[:8]


def writer_tag() -> str:
    """``<hostname>.<namespace key>.<pid>.<uuid4 hex>``: unique across hosts, pods and processes."""
    return f"{socket.gethostname()}.{_namespace_key()}.{os.getpid()}.{uuid.uuid4().hex}"


def writer_gone(tag: str) -> bool:
    """Whether the writer that made ``tag`` is provably dead: it ran on this host, in this PID
    namespace, and its PID no longer exists. A writer anywhere else is never provably gone (its
    PID means nothing here); a reused PID makes a dead writer look alive, the safe mistake."""
    try:
        host, key, pid, _ = tag.rsplit(".", 3)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or key != _namespace_key() or key == UNKNOWN_NAMESPACE or pid <= 0:
        return False  # pid 0 or below would name a process group to os.kill
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def partial_folder(target: Path) -> Path:
    """A new temporary sibling of ``target`` to write into before :func:`publish`."""
    return target.with_name(f"{_partial_prefix(target)}{writer_tag()}")


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def publish(partial: Path, target: Path, marker: str) -> bool:
    """Rename the finished folder ``partial`` (holding the file ``marker``) to ``target``.

    Returns False, with ``partial`` removed, when another writer's complete folder is there
    already. A ``target`` without ``marker`` (left by hand or by an older version) is moved
    aside as a partial folder and removed first, so it is replaced, never merged into.
    """
    for _ in range(2):
        try:
            os.rename(partial, target)
            return True
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if (target / marker).is_file():
            shutil.rmtree(partial, ignore_errors=True)
            return False
        broken = partial_folder(target)  # should the removal be cut short, the next writer's cleanup ends it
        with contextlib.suppress(FileNotFoundError):  # another writer moved it first
            os.rename(target, broken)
        shutil.rmtree(broken, ignore_errors=True)
    raise FileExistsError(f"could not publish {partial} as {target}: other writers keep replacing it")


def remove_stale_partials(target: Path, *, older_than_s: float = PARTIAL_STALE_AFTER_S) -> list[Path]:
    """Remove the partial folders of ``target`` whose writer is gone: provably (see
    :func:`writer_gone`) or presumably (nothing in them changed for ``older_than_s``). A live
    writer's folder is kept, wherever that writer runs."""
    removed, prefix = [], _partial_prefix(target)
    if not target.parent.is_dir():
        return removed
    now = time.time()
    for folder in target.parent.iterdir():
        if not folder.name.startswith(prefix):
            continue
        if writer_gone(folder.name[len(prefix):]) or now - _newest_mtime(folder) > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of ``folder`` or anything in it (a file being written
    changes its own mtime, not its folder's)."""
    newest = 0.0
    for root, _, names in os.walk(folder):
        for path in [root, *(os.path.join(root, name) for name in names)]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(path).st_mtime)
    return newest


@contextlib.contextmanager
def exclusive_lock(path: Path, *, stale_after_s: float = LOCK_STALE_AFTER_S,
                   heartbeat_s: float = LOCK_HEARTBEAT_S, poll_s: float = 0.2):
    """Hold the lock file ``path`` (see the module docstring) for the ``with`` block.

    Exclusive between processes on any hosts that share ``path``'s filesystem, and between
    threads (each acquisition has its own tag). Waits as long as the holder's heartbeat moves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = writer_tag()
    _acquire(path, tag, stale_after_s, poll_s)
    stop = threading.Event()
    heartbeat = threading.Thread(target=_beat, args=(path, stop, heartbeat_s), name="lock-heartbeat", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        if _owner(path)[0] == tag:  # a holder taken over as stale must not remove its successor's lock
            os.unlink(path)


def _acquire(path: Path, tag: str, stale_after_s: float, poll_s: float) -> None:
    seen, seen_since = None, time.monotonic()
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(handle, "w") as lock:
                lock.write(f"{tag} {time.time():.0f}\n")  # who and when, also for a human
            return
        owner = _owner(path)
        if owner[0] is None:  # released just now: try again at once
            continue
        if owner != seen:  # a new holder, or a heartbeat: wait a full period again
            seen, seen_since = owner, time.monotonic()
        if writer_gone(owner[0]) or time.monotonic() - seen_since > stale_after_s:
            _break(path, owner[0])
            seen = None
            continue
        time.sleep(poll_s)


def _owner(path: Path) -> tuple[str | None, int]:
    """``(holder's tag, mtime in ns)`` of a lock file; ``(None, 0)`` when there is none. Read
    through ``open``: an NFS client revalidates a file's attributes on open (close-to-open
    consistency), where a bare ``stat`` may answer from its attribute cache."""
    try:
        with open(path) as lock:
            words = lock.read().split()
            return (words[0] if words else ""), os.fstat(lock.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None, 0


def _break(path: Path, stale_tag: str) -> None:
    """Remove a stale lock by renaming it aside first: of two waiters breaking it at once, one
    rename succeeds. If what was renamed is no longer the stale lock (a new holder took it in
    between), it is linked back (``link`` fails if yet another lock exists)."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # released, or broken by another waiter
    if _owner(aside)[0] != stale_tag:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)


def _beat(path: Path, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            os.utime(path)
        except FileNotFoundError:  # taken over as stale: nothing of ours left to refresh
            return

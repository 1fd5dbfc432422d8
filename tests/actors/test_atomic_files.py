"""Unique temporary names, the atomic rename race and the lock file, with real processes racing
(forked, no Ray). Each test takes well under a few seconds."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

from actors.atomic_files import (
    _break,
    _namespace_key,
    exclusive_lock,
    partial_folder,
    publish,
    remove_stale_partials,
    writer_gone,
    writer_tag,
)

FORK = multiprocessing.get_context("fork")
MARKER = ".done"


def dead_pid() -> int:
    """The PID of a process of this host that has exited (and been reaped)."""
    child = FORK.Process(target=int)
    child.start()
    child.join()
    return child.pid


def tag_of(pid: int, host: str | None = None, key: str | None = None) -> str:
    return f"{host or socket.gethostname()}.{key or _namespace_key()}.{pid}.{'0' * 32}"


# --- names ---------------------------------------------------------------------------------


def test_writer_tags_name_host_namespace_and_pid_and_never_repeat():
    first, second = writer_tag(), writer_tag()
    assert first != second, "two writers of one process still get different names"
    host, key, pid, token = first.rsplit(".", 3)
    assert (host, key, int(pid)) == (socket.gethostname(), _namespace_key(), os.getpid())
    assert len(token) == 32


def test_only_a_dead_pid_of_this_host_and_pid_namespace_counts_as_gone():
    gone = dead_pid()
    assert writer_gone(tag_of(gone))
    assert not writer_gone(writer_tag()), "this process is alive"
    assert not writer_gone(tag_of(gone, host="another-pod")), "a PID of another host means nothing here"
    assert not writer_gone(tag_of(gone, key="0badcafe")), "nor one of another PID namespace or boot"
    assert not writer_gone("garbage") and not writer_gone("") and not writer_gone(tag_of(0))


# --- the atomic rename race ----------------------------------------------------------------


def _publish_after(barrier, parent: str, results) -> None:
    partial = partial_folder(Path(parent, "model"))
    partial.mkdir()
    (partial / "who").write_text(str(os.getpid()))
    (partial / MARKER).write_text("")
    barrier.wait()
    results.put((os.getpid(), publish(partial, Path(parent, "model"), MARKER)))


def test_of_writers_publishing_at_once_one_wins_and_the_others_discard_their_copies(tmp_path):
    barrier, results = FORK.Barrier(4), FORK.Queue()
    writers = [FORK.Process(target=_publish_after, args=(barrier, str(tmp_path), results)) for _ in range(4)]
    for writer in writers:
        writer.start()
    outcomes = dict(results.get(timeout=20) for _ in writers)
    for writer in writers:
        writer.join()
    winners = [pid for pid, won in outcomes.items() if won]
    assert len(winners) == 1
    assert (tmp_path / "model" / "who").read_text() == str(winners[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the losers' partial copies are gone"


def test_publish_replaces_a_target_without_its_marker(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "half-written").write_text("x")
    partial = partial_folder(tmp_path / "model")
    partial.mkdir()
    (partial / MARKER).write_text("")
    assert publish(partial, tmp_path / "model", MARKER)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the incomplete folder was removed"


def test_only_partials_of_gone_writers_are_removed(tmp_path):
    prefix = ".model.partial-"
    dead = tmp_path / f"{prefix}{tag_of(dead_pid())}"
    live = tmp_path / f"{prefix}{writer_tag()}"
    elsewhere_fresh = tmp_path / f"{prefix}{tag_of(123, host='another-pod')}"
    elsewhere_old = tmp_path / f"{prefix}{tag_of(124, host='another-pod')}"
    unrelated = tmp_path / "model"
    for folder in (dead, live, elsewhere_fresh, elsewhere_old, unrelated):
        folder.mkdir()
        (folder / "weights").write_text("w")
    two_hours_ago = time.time() - 7200
    for path in (elsewhere_old / "weights", elsewhere_old):
        os.utime(path, (two_hours_ago, two_hours_ago))
    removed = remove_stale_partials(tmp_path / "model")
    assert sorted(removed) == sorted([dead, elsewhere_old])
    assert live.is_dir() and elsewhere_fresh.is_dir() and unrelated.is_dir()


# --- the lock file -------------------------------------------------------------------------


def _count_under_lock(lock: str, counter: str, log: str, times: int) -> None:
    for _ in range(times):
        with exclusive_lock(Path(lock), poll_s=0.005):
            with open(log, "a") as out:
                out.write(f"in {os.getpid()}\n")
            value = int(Path(counter).read_text())
            time.sleep(0.002)  # a lost update shows unless the lock excludes the others
            Path(counter).write_text(str(value + 1))
            with open(log, "a") as out:
                out.write(f"out {os.getpid()}\n")


def test_the_lock_excludes_racing_processes(tmp_path):
    lock, counter, log = tmp_path / "locks" / "model.lock", tmp_path / "counter", tmp_path / "log"
    counter.write_text("0")
    racers = [FORK.Process(target=_count_under_lock, args=(str(lock), str(counter), str(log), 15)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=60)
    assert [racer.exitcode for racer in racers] == [0, 0, 0]
    assert counter.read_text() == "45"
    lines = log.read_text().split("\n")[:-1]
    assert all(a.startswith("in ") and b == "out " + a[3:] for a, b in zip(lines[::2], lines[1::2])), "never two inside"
    assert len({line.split()[1] for line in lines}) == 3
    assert not lock.exists()


def test_a_lock_whose_holder_died_on_this_host_is_taken_over_at_once(tmp_path):
    lock = tmp_path / "model.lock"
    lock.write_text(f"{tag_of(dead_pid())} 0\n")
    started = time.monotonic()
    with exclusive_lock(lock, stale_after_s=60):
        waited = time.monotonic() - started
        assert int(lock.read_text().split()[0].rsplit(".", 3)[2]) == os.getpid(), "the lock is ours now"
    assert waited < 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the stale lock was not left aside"


def test_a_lock_of_another_host_is_taken_over_once_its_heartbeat_stopped(tmp_path):
    lock = tmp_path / "model.lock"
    lock.write_text(f"{tag_of(1, host='another-pod')} 0\n")  # PID 1 elsewhere: never provably gone
    started = time.monotonic()
    with exclusive_lock(lock, stale_after_s=0.5, poll_s=0.02):
        waited = time.monotonic() - started
    assert 0.5 <= waited < 3


def _hold(lock: str, held, seconds: float) -> None:
    with exclusive_lock(Path(lock), heartbeat_s=0.05):
        held.set()
        time.sleep(seconds)


def test_a_live_holder_keeps_the_lock_while_its_heartbeat_moves(tmp_path):
    lock, held = tmp_path / "model.lock", FORK.Event()
    holder = FORK.Process(target=_hold, args=(str(lock), held, 3.0))
    holder.start()
    assert held.wait(10)
    started = time.monotonic()
    with exclusive_lock(lock, stale_after_s=1.0, poll_s=0.02):
        waited = time.monotonic() - started
    holder.join()
    assert waited > 2.0, "not taken over after 1 s: the heartbeat (every 0.05 s) kept it fresh"
    assert holder.exitcode == 0


def test_breaking_a_lock_that_changed_hands_puts_the_new_holders_lock_back(tmp_path):
    lock = tmp_path / "model.lock"
    lock.write_text("new-holder 0\n")
    _break(lock, stale_tag="old-holder")
    assert lock.read_text() == "new-holder 0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]
    _break(lock, stale_tag="new-holder")
    assert not lock.exists()


def test_threads_of_one_process_exclude_each_other(tmp_path):
    lock, inside, overlaps = tmp_path / "model.lock", [0], []

    def work():
        for _ in range(10):
            with exclusive_lock(lock, poll_s=0.002):
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    workers = [threading.Thread(target=work) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert overlaps == [1] * 20

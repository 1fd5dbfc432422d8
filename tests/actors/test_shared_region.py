"""The shm transport's shared region (#16) between two real processes: what the learner packs,
another process reads in place, bucket by bucket; it refuses a region that is not the
learner's, and a path it cannot open names the way out. The whole transport runs with real
engines in tests/learners/test_weight_sync.py."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from actors.shared_region import ALIGN, HEADER, SharedRegion, offsets
from core.weight_plan import pack, plan_buckets, unpack

SPECS = [("embed", torch.float32, (100, 8)), ("norm", torch.bfloat16, (8,)), ("head", torch.float32, (3, 7))]


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, dtype, shape in SPECS}


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()  # bytes cross the queue as they are


def read_in_child(address: dict, result, again) -> None:
    """An engine's side: attach, map the plan, read every bucket and the stamp; then, once the
    learner has written again, the first value and the stamp anew (the same memory)."""
    region = SharedRegion.attach(address)
    buckets = plan_buckets(SPECS, 1 << 20)
    region.use_plan(buckets)
    got = {name: raw(view) for k, bucket in enumerate(buckets) for name, view in unpack(bucket, region.view(k))}
    result.put((got, region.stamped()))
    again.wait(60)
    result.put((float(region.view(0)[0]), region.stamped()))


def write_in_child(address: dict) -> None:
    """An engine that writes into the region: the mapping is read-only, so the process dies."""
    region = SharedRegion.attach(address)
    region.use_plan(plan_buckets(SPECS, 1 << 20))
    region.view(0)[0] = 7.0


def test_offsets_are_aligned_after_the_header():
    buckets = plan_buckets(SPECS, 1 << 20)
    starts, size = offsets(buckets)
    assert starts[0] == HEADER and all(start % ALIGN == 0 for start in starts)
    assert all(b.nbytes <= nxt - start for b, start, nxt in zip(buckets, starts, [*starts[1:], size]))


@pytest.fixture(autouse=True)
def importable_by_spawned_children(monkeypatch):
    """Spawned children unpickle their target by this module's name (tests.actors...): pytest
    (--import-mode=importlib) imports it without the repository root on sys.path, and spawn
    hands the children the parent's sys.path."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))


def test_another_process_reads_what_the_learner_packed():
    buckets = plan_buckets(SPECS, 1 << 20)
    region = SharedRegion.create(0x1234abcd)
    try:
        region.use_plan(buckets)
        sent = tensors()
        for k, bucket in enumerate(buckets):
            pack(bucket, sent, out=region.view(k))
        region.stamp(987654321, 5)
        context = multiprocessing.get_context("spawn")
        result, again = context.Queue(), context.Event()
        child = context.Process(target=read_in_child, args=(region.address, result, again))
        child.start()
        got, stamp = result.get(timeout=60)
        assert stamp == [987654321, 5]
        assert set(got) == set(sent)
        for name in sent:
            assert got[name] == raw(sent[name]), name
        region.view(0)[0] = 7.0
        region.stamp(987654322, 6)
        again.set()
        assert result.get(timeout=60) == (7.0, [987654322, 6]), "the engine reads the learner's memory, not a copy"
        child.join(60)
        assert child.exitcode == 0
    finally:
        region.close()


def test_the_engine_maps_the_region_read_only():
    region = SharedRegion.create(0x1234abcd)
    try:
        region.use_plan(plan_buckets(SPECS, 1 << 20))
        child = multiprocessing.get_context("spawn").Process(target=write_in_child, args=(region.address,))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGSEGV, "a write from the engine side must fault"
        assert float(region.view(0)[0]) == 0.0
    finally:
        region.close()


def test_a_region_that_is_not_the_learners_is_refused():
    region = SharedRegion.create(0x1234abcd)
    try:
        with pytest.raises(RuntimeError, match="not this learner's weight region"):
            SharedRegion.attach({**region.address, "token": 0x5555})
    finally:
        region.close()


def test_a_path_the_engine_cannot_open_says_to_use_gloo(tmp_path):
    with pytest.raises(RuntimeError, match="--sync-transport gloo"):
        SharedRegion.attach({"path": f"/proc/{os.getpid()}/fd/987654", "token": 1, "device": 0, "inode": 0})
    missing = tmp_path / "absent"
    with pytest.raises(RuntimeError, match="--sync-transport gloo"):
        SharedRegion.attach({"path": str(missing), "token": 1, "device": 0, "inode": 0})
    assert not missing.exists(), "nothing is created"


@pytest.mark.parametrize("content", [b"", b"x" * 10, bytes(range(256)) * 4])
def test_a_file_that_is_not_the_learners_region_is_refused_without_a_byte_written(tmp_path, content):
    """Another process's file at the path (another pid namespace): empty, shorter than the
    header, or longer. The engine refuses it by its inode, before mapping it; the file is
    unchanged (before, an empty or short file was grown to the header's size)."""
    other = tmp_path / "other-file"
    other.write_bytes(content)
    os.utime(other, ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(other)
    region = SharedRegion.create(0x1234abcd)
    try:
        with pytest.raises(RuntimeError, match="is not this learner's weight region.*--sync-transport gloo"):
            SharedRegion.attach({**region.address, "path": str(other)})
    finally:
        region.close()
    after = os.stat(other)
    assert other.read_bytes() == content and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

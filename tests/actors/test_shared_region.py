"""The shm transport's shared region (#16) between two real processes: what the learner packs,
another process reads in place, bucket by bucket; it refuses a region that is not the
learner's, and a path it cannot open names the way out. The whole transport runs with real
engines in tests/workflows/runtime/test_weight_sync.py."""

from __future__ import annotations

import multiprocessing
import os

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


def read_in_child(address: dict, result) -> None:
    """An engine's side: attach, map the plan, read every bucket and the stamp."""
    region = SharedRegion.attach(address)
    buckets = plan_buckets(SPECS, 1 << 20)
    region.use_plan(buckets)
    got = {name: raw(view) for k, bucket in enumerate(buckets) for name, view in unpack(bucket, region.view(k))}
    region.view(0)[0] = 7.0  # writes land in the learner's memory
    result.put((got, region.stamped()))


def test_offsets_are_aligned_after_the_header():
    buckets = plan_buckets(SPECS, 1 << 20)
    starts, size = offsets(buckets)
    assert starts[0] == HEADER and all(start % ALIGN == 0 for start in starts)
    assert all(b.nbytes <= nxt - start for b, start, nxt in zip(buckets, starts, [*starts[1:], size]))


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
        result = context.Queue()
        child = context.Process(target=read_in_child, args=(region.address, result))
        child.start()
        got, stamp = result.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert stamp == [987654321, 5]
        assert set(got) == set(sent)
        for name in sent:
            assert got[name] == raw(sent[name]), name
        assert float(region.view(0)[0]) == 7.0  # the same memory, not a copy
    finally:
        region.close()


def test_a_region_that_is_not_the_learners_is_refused():
    region = SharedRegion.create(0x1234abcd)
    try:
        with pytest.raises(RuntimeError, match="not this learner's weight region"):
            SharedRegion.attach({**region.address, "token": 0x5555})
    finally:
        region.close()


def test_a_path_the_engine_cannot_open_says_to_use_gloo():
    with pytest.raises(RuntimeError, match="--sync-transport gloo"):
        SharedRegion.attach({"path": f"/proc/{os.getpid()}/fd/987654", "token": 1})

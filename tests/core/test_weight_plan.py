"""The weight-sync bucket plan: grouping, caps, packing and the wire form."""

from __future__ import annotations

import pytest
import torch

from core.weight_plan import from_wire, pack, plan_buckets, to_wire, unpack


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"embed": torch.randn(10, 4, generator=generator), "norm": torch.randn(4, generator=generator).half(),
            "q": torch.randn(4, 4, generator=generator), "big": torch.randn(40, 4, generator=generator),
            "bias": torch.randn(4, generator=generator).half()}


def specs(state):
    return [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]


def test_buckets_group_by_dtype_keep_order_and_respect_the_cap():
    state = tensors()
    buckets = plan_buckets(specs(state), cap_bytes=64 * 4)  # 64 float32 elements
    names = [[e.name for e in b.entries] for b in buckets]
    assert names == [["embed", "q"], ["big"], ["norm", "bias"]], names
    assert all(b.nbytes <= 64 * 4 or len(b.entries) == 1 for b in buckets), "only a lone tensor passes the cap"
    assert {b.dtype for b in buckets} == {torch.float32, torch.float16}
    assert sum(len(b.entries) for b in buckets) == len(state)


def test_pack_and_unpack_give_back_every_tensor_exactly_through_the_wire_form():
    state = tensors()
    buckets = from_wire(to_wire(plan_buckets(specs(state), cap_bytes=1 << 20)))
    received = {name: view for b in buckets for name, view in unpack(b, pack(b, state))}
    assert set(received) == set(state)
    assert all(torch.equal(received[n], state[n]) for n in state)
    wire = to_wire(buckets)
    assert all(isinstance(b["dtype"], str) and isinstance(b["entries"][0][1], list) for b in wire)


def test_a_mismatch_is_an_error_naming_it():
    state = tensors()
    (bucket, *_) = plan_buckets(specs(state), cap_bytes=1 << 20)
    with pytest.raises(ValueError, match="embed: shape"):
        pack(bucket, {**state, "embed": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="the bucket holds"):
        unpack(bucket, torch.zeros(5))
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(specs(state), cap_bytes=0)


def test_buffers_take_turns_so_the_bucket_in_flight_is_never_overwritten():
    from core.weight_plan import Buffers

    state = tensors()
    buckets = plan_buckets(specs(state), cap_bytes=64 * 4)
    buffers = Buffers(buckets)
    assert buffers.sizes == {torch.float32: max(b.numel for b in buckets if b.dtype == torch.float32),
                             torch.float16: max(b.numel for b in buckets if b.dtype == torch.float16)}
    handed = [buffers.next(b) for b in buckets + buckets]
    # consecutive buckets of one dtype get different storage; every other one the same
    same_dtype = [(b, h) for b, h in zip(buckets + buckets, handed) if b.dtype == torch.float32]
    for (_, first), (_, second) in zip(same_dtype, same_dtype[1:]):
        assert first.data_ptr() != second.data_ptr()
    assert same_dtype[0][1].data_ptr() == same_dtype[2][1].data_ptr()
    for bucket, buffer in zip(buckets, handed):
        packed = pack(bucket, state, out=buffer)
        assert packed.data_ptr() == buffer.data_ptr() and packed.numel() == bucket.numel
        assert all(torch.equal(t, state[name].reshape(t.shape)) for name, t in unpack(bucket, packed))

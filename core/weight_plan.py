"""The bucket plan of a weight sync (#16): a policy's tensors in dtype-grouped, size-capped
buckets, each sent as one flat 1-D tensor, with the names, shapes and offsets sent once per
sync as plain lists (tensors do not survive ``collective_rpc``; docs/vllm-cpu-facts.md).

Pure torch: the learner packs with :func:`pack`, each engine rebuilds views with :func:`unpack`
and hands them to vLLM's ``load_weights``. Tensors go in model order (layers stay together),
one open bucket per dtype; a tensor larger than the cap travels alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the bucket's dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    entries: tuple[Entry, ...]

    @property
    def numel(self) -> int:
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def plan_buckets(specs: Iterable[tuple[str, torch.dtype, Sequence[int]]], cap_bytes: int) -> list[Bucket]:
    """Buckets for ``(name, dtype, shape)`` specs in the given order; closed when the next
    tensor would pass ``cap_bytes`` (a bucket never stays empty: a larger tensor goes alone)."""
    if cap_bytes <= 0:
        raise ValueError(f"bucket size must be positive, not {cap_bytes}")
    closed: list[Bucket] = []
    open_entries: dict[torch.dtype, list[Entry]] = {}
    for name, dtype, shape in specs:
        entries = open_entries.setdefault(dtype, [])
        size = torch.empty((), dtype=dtype).element_size()
        used = entries[-1].offset + entries[-1].numel if entries else 0
        entry = Entry(name, tuple(int(s) for s in shape), used)
        if entries and (used + entry.numel) * size > cap_bytes:
            closed.append(Bucket(dtype, tuple(entries)))
            entries = open_entries[dtype] = []
            entry = Entry(entry.name, entry.shape, 0)
        entries.append(entry)
    closed += [Bucket(dtype, tuple(entries)) for dtype, entries in open_entries.items() if entries]
    return closed


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
         out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat tensor of the bucket's dtype (on ``device``) holding its tensors, cast to it, at
    their offsets: the front of ``out`` when given (a reused buffer of that dtype)."""
    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device) if out is None else out[:bucket.numel]
    for entry in bucket.entries:
        tensor = tensors[entry.name]
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{entry.name}: shape {tuple(tensor.shape)}, the plan says {entry.shape}")
        flat[entry.offset:entry.offset + entry.numel].copy_(tensor.detach().reshape(-1))
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` pairs over ``flat`` (no copies), in the plan's order."""
    if flat.numel() != bucket.numel or flat.dtype != bucket.dtype:
        raise ValueError(f"received {flat.numel()} x {flat.dtype}, the bucket holds {bucket.numel} x {bucket.dtype}")
    return [(e.name, flat[e.offset:e.offset + e.numel].view(e.shape)) for e in bucket.entries]


def to_wire(buckets: Sequence[Bucket]) -> list[dict]:
    """The plan as plain lists and strings (what ``collective_rpc`` carries intact)."""
    return [{"dtype": str(b.dtype).removeprefix("torch."),
             "entries": [[e.name, list(e.shape), e.offset] for e in b.entries]} for b in buckets]


def from_wire(wire: Sequence[dict]) -> list[Bucket]:
    """The plan back from :func:`to_wire`."""
    return [Bucket(getattr(torch, b["dtype"]), tuple(Entry(name, tuple(shape), offset)
                                                     for name, shape, offset in b["entries"])) for b in wire]


class Buffers:
    """Two reusable flat buffers per dtype, as large as the plan's largest bucket of it, handed
    out in turn: bucket k's buffer is free again once bucket k - 1 is done with, so a sender
    or receiver that keeps at most one bucket in flight never overwrites one in use. Reuse
    spares the page faults of a fresh allocation per bucket (a fresh 64 MiB tensor is new
    memory from the kernel, zeroed page by page)."""

    def __init__(self, buckets: Sequence[Bucket], device: torch.device | str = "cpu"):
        self.device = device
        self.sizes: dict[torch.dtype, int] = {}
        for bucket in buckets:
            self.sizes[bucket.dtype] = max(self.sizes.get(bucket.dtype, 0), bucket.numel)
        self.pool: dict[torch.dtype, list[torch.Tensor]] = {}
        self.turn: dict[torch.dtype, int] = {}

    def next(self, bucket: Bucket) -> torch.Tensor:
        pair = self.pool.setdefault(bucket.dtype, [])
        turn = self.turn.get(bucket.dtype, 0)
        self.turn[bucket.dtype] = turn + 1
        if len(pair) < 2:
            pair.append(torch.empty(self.sizes[bucket.dtype], dtype=bucket.dtype, device=self.device))
        return pair[turn % 2][:bucket.numel]

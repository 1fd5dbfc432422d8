"""The ``shm`` weight-sync transport's shared memory (#16): one region in which learner rank 0
writes the packed policy once per sync, and from which every rollout engine on its node loads.

Over gloo, every engine is a separate stream of the same bytes through loopback sockets, so on
one machine a second engine costs another copy through the kernel (measured 1.4-1.5x the time
of one engine). Here the learner packs each bucket straight into the region, and the engines'
broadcast groups carry only a small "bucket k is ready" message per bucket, the canary, and
their failures; the bytes are read in place. The same idea as verl's CUDA-IPC path for
colocated engines, on host memory.

The region is an anonymous ``memfd`` of the learner process: it is freed when the learner
and every engine have let go of it, so a killed learner leaves nothing behind in ``/dev/shm``,
and it is not bounded by the size of a container's ``/dev/shm`` mount. Engines open it as
``/proc/<learner pid>/fd/<fd>`` (same machine and pid namespace; Linux). A 64-byte header
says whose region it is (a token the engine is given when it joins) and which sync wrote it
last (the canary's nonce), so an engine that mapped someone else's memory, or a stale
copy, fails the sync instead of loading it.

Layout: the header, then every bucket of the plan at a 64-byte aligned offset
(:func:`offsets`); the region holds the whole policy in the engines' dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from core.weight_plan import Bucket

HEADER = 64  # bytes: int64 [magic, token, nonce, version, 0, 0, 0, 0]
MAGIC = 0x6361692D73686D  # "cai-shm"
ALIGN = 64


def offsets(buckets: Sequence[Bucket]) -> tuple[list[int], int]:
    """Each bucket's byte offset in the region, and the region's size (header included)."""
    starts, end = [], HEADER
    for bucket in buckets:
        starts.append(end)
        end += -(-bucket.nbytes // ALIGN) * ALIGN
    return starts, end


class SharedRegion:
    """One side's mapping of the region. The learner :meth:`create`\\ s it; engines
    :meth:`attach` with the address the learner gives them when they join."""

    def __init__(self, path: str, token: int, fd: int | None = None):
        self.path, self.token, self.fd = path, token, fd
        self.size = 0
        self.memory: torch.Tensor | None = None  # uint8 over the whole mapping
        self.buckets: list[Bucket] = []
        self.starts: list[int] = []

    @classmethod
    def create(cls, token: int) -> SharedRegion:
        fd = os.memfd_create(f"cai-weight-sync-{token:x}")
        os.ftruncate(fd, HEADER)
        region = cls(f"/proc/{os.getpid()}/fd/{fd}", token, fd)
        region._map(HEADER)
        region._header()[:2] = torch.tensor([MAGIC, token])
        return region

    @classmethod
    def attach(cls, address: dict) -> SharedRegion:
        """The learner's region from an engine process; refuses what is not that region."""
        region = cls(address["path"], int(address["token"]))
        try:
            region._map(HEADER)
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"cannot open the learner's shared memory {region.path} ({exc}): the engine must run on the "
                "learner's machine, in its pid namespace; use --sync-transport gloo otherwise") from exc
        region._verify()
        return region

    @property
    def address(self) -> dict:
        return {"path": self.path, "token": self.token}

    def use_plan(self, buckets: Sequence[Bucket]) -> None:
        """Size the mapping for ``buckets`` (the learner grows the memfd first)."""
        starts, size = offsets(buckets)
        if self.fd is not None and size > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, size)
        if size != self.size:
            self._map(size)
            self._verify()
        self.buckets, self.starts = list(buckets), starts

    def view(self, index: int) -> torch.Tensor:
        """Bucket ``index`` of the plan as a flat tensor of its dtype over the shared bytes."""
        bucket, start = self.buckets[index], self.starts[index]
        return self.memory[start:start + bucket.nbytes].view(bucket.dtype)

    def stamp(self, nonce: int, version: int) -> None:
        """The learner marks the sync whose bytes the region now holds."""
        self._header()[2:4] = torch.tensor([nonce, version])

    def stamped(self) -> list[int]:
        """``[nonce, version]`` of the last sync written."""
        self._verify()
        return self._header()[2:4].tolist()

    def close(self) -> None:
        self.memory = None
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _map(self, size: int) -> None:
        self.memory = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        self.size = size

    def _header(self) -> torch.Tensor:
        return self.memory[:HEADER].view(torch.int64)

    def _verify(self) -> None:
        magic, token = self._header()[:2].tolist()
        if magic != MAGIC or token != self.token:
            raise RuntimeError(f"{self.path} is not this learner's weight region (token {token:x}, "
                               f"expected {self.token:x})")

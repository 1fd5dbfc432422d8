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
``/proc/<learner pid>/fd/<fd>`` (same machine and pid namespace; Linux), read-only
(``O_RDONLY``, never created or grown), and check with ``fstat`` that it is the very file the
learner made (its device and inode, given with the path) before mapping a byte of it, also
read-only: in another pid namespace (a Ray worker in its own container) the same path may
name another process's file, which the engine then neither changes nor reads. A 64-byte
header says whose region it is (a token the engine is given when it joins) and which sync
wrote it last (the canary's nonce), so an engine that mapped someone else's memory, or a
stale copy, fails the sync instead of loading it.

Layout: the header, then every bucket of the plan at a 64-byte aligned offset
(:func:`offsets`); the region holds the whole policy in the engines' dtype.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Sequence
from stat import S_ISREG

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
    """One side's mapping of the region. The learner :meth:`create`\\ s it (read-write, its
    own memfd); engines :meth:`attach` (read-only) with the address the learner gives them when
    they join."""

    def __init__(self, path: str, token: int, fd: int | None = None, *, writable: bool = False,
                 identity: tuple[int, int] = (0, 0)):
        self.path, self.token, self.fd, self.writable, self.identity = path, token, fd, writable, identity
        self.size = 0
        self.memory: torch.Tensor | None = None  # uint8 over the whole mapping
        self.buckets: list[Bucket] = []
        self.starts: list[int] = []

    @classmethod
    def create(cls, token: int) -> SharedRegion:
        fd = os.memfd_create(f"cai-weight-sync-{token:x}")
        os.ftruncate(fd, HEADER)
        stat = os.fstat(fd)
        region = cls(f"/proc/{os.getpid()}/fd/{fd}", token, fd, writable=True, identity=(stat.st_dev, stat.st_ino))
        region._map(HEADER)
        region._header()[:2] = torch.tensor([MAGIC, token])
        return region

    @classmethod
    def attach(cls, address: dict) -> SharedRegion:
        """The learner's region from an engine process, read-only; refuses, without writing a
        byte, what is not that region."""
        region = cls(address["path"], int(address["token"]), identity=(int(address["device"]), int(address["inode"])))
        try:
            fd = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeError(
                f"cannot open the learner's shared memory {region.path} ({exc}): the engine must run on the "
                "learner's machine, in its pid namespace; use --sync-transport gloo otherwise") from exc
        region.fd = fd
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != region.identity or not S_ISREG(stat.st_mode) or stat.st_size < HEADER:
                raise RuntimeError(
                    f"{region.path} is not this learner's weight region (device {stat.st_dev}, inode {stat.st_ino}, "
                    f"{stat.st_size} bytes; expected device {region.identity[0]}, inode {region.identity[1]}): the "
                    "engine is not in the learner's pid namespace; use --sync-transport gloo")
            region._map(HEADER)
            region._verify()
        except BaseException:
            region.close()
            raise
        return region

    @property
    def address(self) -> dict:
        return {"path": self.path, "token": self.token, "device": self.identity[0], "inode": self.identity[1]}

    def use_plan(self, buckets: Sequence[Bucket]) -> None:
        """Size the mapping for ``buckets``: the learner grows its memfd first; an engine only
        checks the region is that large."""
        starts, size = offsets(buckets)
        held = os.fstat(self.fd).st_size
        if size > held:
            if not self.writable:
                raise RuntimeError(f"the learner's weight region holds {held} bytes, the plan needs {size}")
            os.ftruncate(self.fd, size)
        if size != self.size:
            self._map(size)
            self._verify()
        self.buckets, self.starts = list(buckets), starts

    def view(self, index: int) -> torch.Tensor:
        """Bucket ``index`` of the plan as a flat tensor of its dtype over the shared bytes
        (read-only memory on an engine: a write there is a segmentation fault)."""
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
        self.memory = None  # the mapping goes with the last view of it
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _map(self, size: int) -> None:
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=protection)
        with warnings.catch_warnings():  # read-only on an engine, by design: nothing there writes to it
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self.memory = torch.frombuffer(mapping, dtype=torch.uint8)
        self.size = size

    def _header(self) -> torch.Tensor:
        return self.memory[:HEADER].view(torch.int64)

    def _verify(self) -> None:
        magic, token = self._header()[:2].tolist()
        if magic != MAGIC or token != self.token:
            raise RuntimeError(f"{self.path} is not this learner's weight region (token {token:x}, "
                               f"expected {self.token:x})")

"""One broadcast channel between a PPO learner (rank 0) and one rollout engine's workers
(ranks 1..tp), for weight syncs (#16). Both sides build it from the same :class:`GroupSpec`.

* ``gloo`` (CPU): vLLM's ``stateless_init_torch_distributed_process_group``, a torch
  ProcessGroup outside ``torch.distributed``'s global state, so it lives beside the learners'
  own default group (and vLLM's inside the engine). Every operation is bounded by
  ``timeout_s``: a peer that is gone makes ``wait()`` raise, it never returns quietly.
* ``nccl`` (GPU): vLLM's ``StatelessProcessGroup`` plus ``PyNcclCommunicator``, as vLLM's RLHF
  example does. That communicator *disables itself* (``disabled=True``) when NCCL cannot load
  or ``VLLM_DISABLE_PYNCCL`` is set, and its ``broadcast`` then returns without doing anything
  (vllm 0.32, ``device_communicators/pynccl.py``): an update would "succeed" and the engine
  keep its old weights. Opening the channel refuses that with :class:`TransportUnavailable`.
  NCCL calls have no timeout of their own, and ``stream.synchronize()`` waits forever for a
  peer that died mid-broadcast. So ``wait()`` polls a CUDA event recorded after the broadcast
  against the same ``timeout_s`` as gloo; past it, the communicator is aborted
  (``PyNcclCommunicator.destroy``: ``ncclCommAbort``, which also ends the kernel still waiting
  for the peer) and :class:`TransportError` is raised. ``close()`` destroys the communicator a
  join made, so a rejoin does not leak one.

The transport is chosen explicitly (``--sync-transport``); nothing falls back to another.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

BACKENDS = ("gloo", "nccl")


class TransportUnavailable(RuntimeError):
    """The chosen transport cannot move tensors here (e.g. NCCL without a GPU): never a quiet no-op."""


class TransportError(RuntimeError):
    """A transfer did not complete (a peer gone quiet, past the timeout, a failed load or check)."""


@dataclass(frozen=True)
class GroupSpec:
    """What the learner and one engine's workers need to form their group."""

    backend: str
    host: str
    port: int
    world_size: int  # 1 learner + the engine's tensor-parallel workers
    timeout_s: float
    generation: str  # a fresh token per (re)join: a late call from an older group is refused

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise TransportUnavailable(f"unknown broadcast backend {self.backend!r}; one of {', '.join(BACKENDS)}")
        if self.world_size < 2:
            raise ValueError(f"a broadcast group needs the learner and at least one engine worker, not {self.world_size}")


def listening_socket(host: str) -> socket.socket:
    """A socket bound to a free port on ``host`` for rank 0's store (no race for the port)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen()
    return listener


class Channel:
    """This process's end of a group: rank 0 (the learner) sends, the others receive, one
    flat tensor per :meth:`broadcast`."""

    def __init__(self, spec: GroupSpec, rank: int, *, device: torch.device | str = "cpu",
                 listen_socket: socket.socket | None = None):
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        self.group: Any = None
        self.comm: Any = None
        if spec.backend == "gloo":
            self.group = gloo_group(spec, rank, listen_socket)
        else:
            self.group = stateless_group(spec, rank, listen_socket)
            self.comm = nccl_communicator(self.group, self.device)
            if not getattr(self.comm, "available", False) or getattr(self.comm, "disabled", True):
                self.group = self.comm = None
                raise TransportUnavailable(
                    f"NCCL is not usable in this process (rank {rank}, {self.device}): vLLM's PyNcclCommunicator "
                    "disabled itself (no NCCL library, VLLM_DISABLE_PYNCCL, or a one-rank group), so a weight "
                    "broadcast would silently move nothing. Use --sync-transport gloo on CPU")

    def broadcast(self, tensor: torch.Tensor):
        """Start sending (rank 0) or receiving (others) ``tensor``; returns something to ``wait()`` on."""
        if self.spec.backend == "gloo":
            return self.group.broadcast(tensor, root=0)
        stream = torch.cuda.current_stream(self.device)
        self.comm.broadcast(tensor, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return EventDone(done, self.spec.timeout_s, self.abort, what=f"NCCL broadcast (rank {self.rank})")

    def abort(self) -> None:
        """End the group now, even mid-transfer (NCCL: ``ncclCommAbort``); the channel is closed."""
        self.close()

    def close(self) -> None:
        group, comm, self.group, self.comm = self.group, self.comm, None, None
        if comm is not None:
            comm.destroy()  # ncclCommAbort, in a thread it waits 5 s for (vllm 0.32 pynccl.py)
        if group is not None and self.spec.backend == "gloo":
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(group)


class EventDone:
    """Waits for a CUDA event against a deadline: polls ``query()`` (it never blocks), and past
    ``timeout_s`` calls ``on_timeout`` (abort the communicator) and raises
    :class:`TransportError`. The deadline counts from the broadcast, as gloo's does."""

    POLL_S = (0.0005, 0.01)  # first and longest sleep between polls

    def __init__(self, event, timeout_s: float, on_timeout: Callable[[], None], what: str = "transfer"):
        self.event, self.timeout_s, self.on_timeout, self.what = event, timeout_s, on_timeout, what
        self.deadline = time.monotonic() + timeout_s

    def wait(self) -> bool:
        pause = self.POLL_S[0]
        while not self.event.query():
            if time.monotonic() >= self.deadline:
                aborted = "the communicator was aborted"
                try:
                    self.on_timeout()
                except Exception as exc:  # noqa: BLE001 - the transfer has failed either way; say both
                    aborted = f"aborting the communicator failed too ({type(exc).__name__}: {exc})"
                raise TransportError(f"{self.what} did not finish within --sync-timeout {self.timeout_s:g} s "
                                     f"(a peer gone or stalled); {aborted}")
            time.sleep(pause)
            pause = min(pause * 2, self.POLL_S[1])
        return True


# -- the vLLM calls, one place each (tests replace the NCCL ones to check their arguments) -----


def gloo_group(spec: GroupSpec, rank: int, listen_socket: socket.socket | None):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        spec.host, spec.port, rank, spec.world_size, backend="gloo", group_name=f"cai-sync-{spec.generation}",
        listen_socket=listen_socket, timeout=timedelta(seconds=spec.timeout_s))


def stateless_group(spec: GroupSpec, rank: int, listen_socket: socket.socket | None):
    from vllm.distributed.utils import StatelessProcessGroup

    return StatelessProcessGroup.create(spec.host, spec.port, rank, spec.world_size,
                                        store_timeout=int(spec.timeout_s), listen_socket=listen_socket)


def nccl_communicator(group, device: torch.device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

    return PyNcclCommunicator(group, device=device)

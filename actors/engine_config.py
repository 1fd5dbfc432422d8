"""The user's vLLM engine settings, shared by every stage that hosts engines.

Each job config nests one ``engine: EngineConfig`` (the ``--tensor-parallel``,
``--max-model-len``, ... flags and the ``engine:`` YAML keys). Each engine is started with an
:class:`actors.engine.EngineOptions` that holds this config beside what is particular to that
engine (its model, seed, role); ``actors.engine.engine_args`` turns both into vLLM's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

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

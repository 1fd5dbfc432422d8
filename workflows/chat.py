"""`cai models chat`: answer a few prompts with one vLLM engine on Ray.

The smallest end-to-end check of a machine or cluster: model resolution, Ray bootstrap,
a named engine actor and generation, read top to bottom.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from actors.engine import EngineOptions, VLLMEngineHost
from actors.engine_config import EngineConfig
from core.config import REQUIRED, Rule, at_least, failing, option, require_valid
from core.sampling import SamplingConfig, greedy
from workflows.runtime.engine_stop import stop_engine_actors
from workflows.runtime.models import resolve_model
from core.run_identity import NAMESPACE
from workflows.runtime.ray_session import connect_ray


@dataclass(frozen=True)
class ChatConfig:
    prompts: tuple[str, ...] = option(REQUIRED, "user messages to answer, one answer each", positional=True)
    model: str = option(REQUIRED, "local model directory, hub id, or 'default'")
    sampling: SamplingConfig = option(greedy(128), "how the answers are sampled (greedy by default)")
    gpus: float = option(0.0, "GPUs for the engine actor")
    enforce_eager: bool = option(False, "skip CUDA graph capture (faster start, slower decoding)")

    def __post_init__(self) -> None:
        require_valid(failing({"prompts": Rule("at least one prompt", bool)(self.prompts),
                               "gpus": at_least(0)(self.gpus)}), self.sampling.problems())


def run_chat(config: ChatConfig) -> dict[str, Any]:
    """Each prompt's answer and its token count."""
    model_path = resolve_model(config.model)
    connect_ray()
    import ray  # after joining: ray reads RAY_AUTH_MODE once, when it is imported (connect_ray sets it)
    host = (
        ray.remote(VLLMEngineHost)
        .options(name=f"cai-chat-{int(time.time())}", namespace=NAMESPACE, num_cpus=1, num_gpus=config.gpus)
        .remote(EngineOptions(model_path, EngineConfig(enforce_eager=config.enforce_eager)))
    )
    try:
        refs = [host.complete.remote([{"role": "user", "content": p}], config.sampling) for p in config.prompts]
        answers = [
            {"prompt": prompt, "response": completion.text.strip(), "tokens": len(completion.token_ids)}
            for prompt, (completion,) in zip(config.prompts, ray.get(refs))
        ]
    finally:
        stop_engine_actors([host])
    return {"model": model_path, "answers": answers}

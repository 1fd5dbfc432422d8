"""`cai models chat`: answer a few prompts with one vLLM engine on Ray.

The smallest end-to-end check of a machine or cluster: model resolution, Ray bootstrap,
a named engine actor and generation, read top to bottom.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from actors.engine import EngineOptions, VLLMEngineHost
from core.sampling import SamplingConfig, greedy
from workflows.runtime.models import resolve_model
from workflows.runtime.ray_session import NAMESPACE, connect_ray


@dataclass(frozen=True)
class ChatResult:
    prompt: str
    response: str
    tokens: int


def chat(
    model: str,
    prompts: list[str],
    *,
    sampling: SamplingConfig = greedy(128),
    num_gpus: float = 0,
    enforce_eager: bool = False,
) -> list[ChatResult]:
    import ray

    model_path = resolve_model(model)
    connect_ray()
    host = (
        ray.remote(VLLMEngineHost)
        .options(name=f"cai-chat-{int(time.time())}", namespace=NAMESPACE, num_cpus=1, num_gpus=num_gpus)
        .remote(EngineOptions(model=model_path, enforce_eager=enforce_eager))
    )
    try:
        refs = [
            host.complete.remote([{"role": "user", "content": p}], sampling)
            for p in prompts
        ]
        return [
            ChatResult(prompt, completion.text, len(completion.token_ids))
            for prompt, (completion,) in zip(prompts, ray.get(refs))
        ]
    finally:
        ray.kill(host)

"""PPO's frozen reference and reward models in their own Ray actor (``--frozen-on actors``).

Each learner sends its rollouts here (token ids, not tensors: the actor packs them itself,
exactly as the learner does) and gets the reference log-probs and the reward scores back; the
learners then hold only the policy and the value model. Both calls are pure functions of
their arguments, so Ray may run one again on a restarted actor.

Plain class: ``ray.remote(...)(FrozenWorker)`` where the actor is created
(``workflows.runtime.frozen_group.start_frozen_actors``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from actors.model_source import ModelSource, node_description
from actors.process_output import divert_output
from core.frozen_models import FrozenModels, resolve_frozen_dtype
from core.ppo_policy import pack_rollouts


def _local(model: ModelSource | str) -> str:
    """The folder on this node (a hub model's in its Hugging Face cache); ``""`` stays ``""`` (no reward model)."""
    return model.local_path() if isinstance(model, ModelSource) else model


class FrozenWorker:
    """Hosts one ``core.frozen_models.FrozenModels``.

    ``cpu_share``: how many frozen actors share this node's cores. On CPU, Ray limits an
    actor to one thread (its 1 CPU); but the learners and engines wait while the frozen
    models score, so the actor uses its share of the node's cores instead (as the learners
    do in ``learners.ppo_loop``)."""

    def __init__(self, ref_model: ModelSource | str, reward_model: ModelSource | str = "", reward_fn: str = "", *,
                 dtype: str = "auto", use_gpu: bool = False, trust_remote_code: bool = False, cpu_share: int = 1):
        self.output_log = divert_output("frozen")  # transformers' load warnings: Ray logs, not the terminal
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"frozen models asked for a GPU, but {node_description()} gives this actor none")
        if not use_gpu:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cpu_share)))
        self.models = FrozenModels(_local(ref_model), _local(reward_model), reward_fn,
                                   device="cuda" if use_gpu else "cpu", dtype=resolve_frozen_dtype(dtype, use_gpu),
                                   trust_remote_code=trust_remote_code)

    def ready(self) -> dict[str, Any]:
        """``pid``, ``node``, ``device``, ``dtype``, ``parameter_bytes`` and torch ``threads``."""
        return {"pid": os.getpid(), "node": node_description(), "threads": torch.get_num_threads(),
                **self.models.info()}

    def ref_logprobs(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     temperature: float) -> torch.Tensor:
        """The reference's log-probs of each response token: (B, T) float32 on the CPU, T the
        longest response (``core.ppo_policy.pack_rollouts`` layout)."""
        return self.models.ref_logprobs(pack_rollouts(prompts, responses, pad_id), temperature).cpu()

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return self.models.score(prompts, completions)

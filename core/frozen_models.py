"""PPO's frozen models, the reference (for the KL penalty) and the reward, for one process
(torch + transformers, no Ray).

They only run forward passes, so each holds no gradients and no optimizer state, and
``--frozen-dtype bfloat16`` halves their weights. They sit in one of two places
(``PPOConfig.frozen_on``), behind one interface, :class:`FrozenScorer`:

* ``learners``: each learner holds a :class:`FrozenModels` beside its policy and value model;
* ``actors``: a learner holds a ``learners.frozen_client.FrozenClient``, which sends
  the same calls to its own ``actors.frozen_worker.FrozenWorker`` actor (itself a host for a
  :class:`FrozenModels`), as OpenRLHF keeps its reference and reward models in their own Ray
  actor groups. The learners then hold only the models they train.

Log-probs are float32 in either dtype: ``response_logprobs`` casts the logits to float32 before
the temperature and the log-softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from core.ppo_policy import RolloutBatch, disable_dropout, sequence_logprobs
from core.rewards import RewardModelScorer, checked_scores, load_reward_function

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FrozenScorer(Protocol):
    """What a PPO learner asks of its frozen models, wherever they run."""

    def ref_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
        """The reference's log-probs of the response tokens at the sampling temperature: (B, T)
        float32 on the batch's device (zeros past each response's end do not matter: masked)."""
        ...

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        """One checked score per (prompt, completion) pair (see ``core.rewards``)."""
        ...


def resolve_frozen_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """``--frozen-dtype``: ``auto`` is bfloat16 on GPU and float32 on CPU (where bf16 matmuls
    are slow on most cores and the tiny test models lose too many digits)."""
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    if name not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be 'auto', 'float32' or 'bfloat16', not {name!r}")
    return FROZEN_DTYPES[name]


def freeze(model: nn.Module) -> nn.Module:
    """No parameter requires a gradient (so no optimizer steps it and backward never reaches
    it), eval mode, every dropout off (``disable_dropout``): the model as a fixed function."""
    model.requires_grad_(False)
    disable_dropout(model)
    return model.eval()


def frozen_parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters (tied ones once), after checking that it is frozen:
    raises if any parameter requires a gradient or holds one, the two things that would
    cost gradient and optimizer memory."""
    for name, parameter in module.named_parameters():
        if parameter.requires_grad or parameter.grad is not None:
            state = "requires a gradient" if parameter.requires_grad else "holds a gradient"
            raise RuntimeError(f"frozen model parameter {name} {state}")
    return sum(p.numel() * p.element_size() for p in module.parameters())


def unpack_rollouts(batch: RolloutBatch) -> tuple[list[list[int]], list[list[int]], int]:
    """``(prompts, responses, pad_id)`` such that ``pack_rollouts`` of them rebuilds ``batch``:
    what a remote frozen model needs to pack the same batch on its side. ``pad_id`` is the
    token in the padded places (0 when nothing is padded: then it is never used)."""
    width = batch.prompt_width
    keep = batch.attention_mask[:, :width].bool().cpu()
    prompt_ids, response_ids = batch.input_ids[:, :width].cpu(), batch.response.cpu()
    lengths = batch.mask.sum(-1).long().tolist()
    prompts = [row[kept].tolist() for row, kept in zip(prompt_ids, keep)]
    responses = [row[:length].tolist() for row, length in zip(response_ids, lengths)]
    padded = batch.input_ids[batch.attention_mask == 0]
    return prompts, responses, int(padded[0]) if padded.numel() else 0


class FrozenModels:
    """The reference model and the reward of one process, frozen, in ``dtype`` on ``device``.

    The reward is a reward model directory (``RewardModelScorer``) or a reward function spec
    (``core.rewards.load_reward_function``): exactly one of the two."""

    def __init__(self, ref_path: str, reward_model_path: str = "", reward_fn: str = "", *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        if bool(reward_model_path) == bool(reward_fn):
            raise ValueError("FrozenModels: give exactly one of reward_model_path and reward_fn")
        self.device, self.dtype = torch.device(device), dtype
        self.ref = freeze(AutoModelForCausalLM.from_pretrained(
            ref_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device))
        self.reward_source = reward_model_path or reward_fn
        self.reward_model: nn.Module | None = None
        if reward_model_path:
            scorer = RewardModelScorer(reward_model_path, device=str(self.device), dtype=dtype,
                                       trust_remote_code=trust_remote_code)
            self.reward_model = freeze(scorer.model)
            self.reward = scorer
        else:
            self.reward = load_reward_function(reward_fn)

    def modules(self) -> list[nn.Module]:
        """The models held (the reference, and the reward model when there is one)."""
        return [self.ref] + ([self.reward_model] if self.reward_model is not None else [])

    def ref_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, T) float32 on the batch's device; see :class:`FrozenScorer`."""
        return sequence_logprobs(self.ref, batch.to(self.device), temperature).to(batch.input_ids.device)

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return checked_scores(self.reward(prompts, completions), len(completions), self.reward_source)

    def info(self) -> dict[str, Any]:
        """Where and how the models are held, and their parameter bytes (checked frozen)."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "parameter_bytes": sum(frozen_parameter_bytes(m) for m in self.modules())}

"""The models a PPO learner trains and how batches reach them (torch + transformers, no Ray).

* :class:`ActorCritic`: the policy (a causal LM) and the value model (a backbone with a fresh
  scalar head) in one module, so one DDP wrapper and one optimizer cover both.
* :func:`pack_rollouts`: prompts and sampled responses as one left-padded batch in which
  every response starts at the same column, so per-token tensors over the response are
  plain ``(batch, T)`` slices.
* :func:`weights_blob`: the policy's weights as a safetensors blob for the vLLM engines.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.ppo_math import entropy_from_logits, logprobs_from_logits
from core.precision import cast_forward


@dataclass
class RolloutBatch:
    """``input_ids``/``attention_mask``/``position_ids``: (B, P+T); ``response``: (B, T)
    response token ids (pad after the end); ``mask``: (B, T), 1 on real response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    prompt_width: int

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        rows = rows.to(self.input_ids.device)
        return RolloutBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                            self.response[rows], self.mask[rows], self.prompt_width)

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                            self.response.to(device), self.mask.to(device), self.prompt_width)


def pack_rollouts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> RolloutBatch:
    """Left-pad prompts to width P and right-pad responses to width T (at least 1)."""
    width = max(len(p) for p in prompts)
    length = max(1, max(len(r) for r in responses))
    rows, masks, response_rows, response_masks = [], [], [], []
    for prompt, response in zip(prompts, responses):
        left, right = width - len(prompt), length - len(response)
        rows.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        response_rows.append(list(response) + [pad_id] * right)
        response_masks.append([1] * len(response) + [0] * right)
    attention = torch.tensor(masks)
    # positions count real tokens only, so left padding does not shift them
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(torch.tensor(rows), attention, positions, torch.tensor(response_rows),
                        torch.tensor(response_masks, dtype=torch.float32), width)


class ActorCritic(nn.Module):
    """Policy and value model. ``forward`` returns, over the response columns only,
    log-probs of the sampled tokens (B, T), per-token entropy (B, T) and values (B, T).
    The value at column t estimates the return from the state before response token t.

    Log-probs and entropy are those of the distribution the engines sample from at
    ``temperature``: log softmax(logits / T) over the whole vocabulary (as TRL and OpenRLHF
    compute them), so the ratio and the KL describe the policy that produced the rollouts."""

    def __init__(self, policy: nn.Module, value_backbone: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_backbone = value_backbone
        self.value_head = nn.Linear(value_backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # the forward's dtype when the parameters are not sharded (FSDP casts them itself):
        # every parameter is cast for the forward (core.precision); None: as they are
        self.compute_dtype: torch.dtype | None = None

    def forward(self, batch: RolloutBatch, temperature: float = 1.0,
                cast: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``cast=False``: in the master weights' own dtype (the weight-sync check's reference)."""
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "position_ids": batch.position_ids, "use_cache": False}
        dtype = self.compute_dtype if cast else None
        logits = cast_forward(self.policy, dtype, **inputs, **response_logits_kwargs(self.policy, batch)).logits
        logprobs, entropy = response_logprobs(logits, batch, temperature, with_entropy=True)
        hidden = cast_forward(self.value_backbone, dtype, **inputs).last_hidden_state
        columns = slice(batch.prompt_width - 1, batch.prompt_width - 1 + batch.response.shape[1])
        values = cast_forward(self.value_head, dtype, hidden[:, columns]).squeeze(-1)
        outputs = logprobs, entropy, values
        # copies, not views (squeeze, gather): FSDP2 warns about views among a sharded root's
        # outputs; (B, T) each, so the copies cost nothing next to the logits
        return tuple(t.clone() for t in outputs)


# Response tokens whose (tokens, vocabulary) logits are in float32 at once: 1024 x 152k
# (Qwen2.5's vocabulary) is 0.6 GB, where a (64, 1024, 152k) batch whole would be 40 GB.
LOGITS_CHUNK_TOKENS = 1024


def _chunk_logprobs(chunk: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = chunk.float() / temperature
    logprobs = logprobs_from_logits(scaled, tokens)
    return logprobs, entropy_from_logits(scaled) if with_entropy else logprobs.new_zeros(())


def response_logprobs(logits: torch.Tensor, batch: RolloutBatch, temperature: float = 1.0, *,
                      with_entropy: bool = False,
                      chunk_tokens: int = LOGITS_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens (B, T) and, ``with_entropy``, the entropy of each
    next-token distribution (B, T), float32, from the model's logits in their own dtype.
    The logits are taken ``chunk_tokens`` response tokens at a time: only one chunk is ever
    in float32, and under autograd each chunk is recomputed in the backward
    (``torch.utils.checkpoint``) instead of keeping its float32 softmax."""
    width = batch.response.shape[1]
    # the columns P-1 .. P+T-2; a forward given logits_to_keep (:func:`response_logits_kwargs`)
    # returned only the last T+1
    start = batch.prompt_width - 1 if logits.shape[1] == batch.input_ids.shape[1] else logits.shape[1] - width - 1
    rows = max(1, chunk_tokens // max(width, 1))  # whole rows per chunk (a row longer than the chunk: one row)
    logprobs, entropies = [], []
    for first in range(0, logits.shape[0], rows):
        chunk = logits[first:first + rows, start:start + width]
        tokens = batch.response[first:first + rows]
        if torch.is_grad_enabled() and chunk.requires_grad:
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, chunk, tokens, temperature, with_entropy,
                                                        use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(chunk, tokens, temperature, with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


def response_logits_kwargs(model: nn.Module, batch: RolloutBatch) -> dict[str, int]:
    """``logits_to_keep`` for causal LMs of transformers that take it: the head then computes
    the logits of the response columns only (T + 1 positions, not the prompt's too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its base
    if "logits_to_keep" in inspect.signature(type(base).forward).parameters:
        return {"logits_to_keep": batch.response.shape[1] + 1}
    return {}


def sequence_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the response tokens under a plain causal LM (the reference) at the
    sampling temperature. (B, T)"""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False, **response_logits_kwargs(model, batch)).logits
        return response_logprobs(logits, batch, temperature)[0]


def disable_dropout(model: nn.Module) -> int:
    """Turn every dropout of a Hugging Face model off, in train mode too; returns how many
    were on. PPO's first-epoch ratio must be exactly 1 and the value targets deterministic
    (TRL disables dropout in all four models). ``nn.Dropout`` modules get ``p = 0``; attention
    dropout in transformers is a float attribute passed to the attention kernel
    (``attention_dropout``/``dropout`` on the attention module), so those are zeroed too."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def load_actor_critic(policy_path: str, value_path: str, *, trust_remote_code: bool = False,
                      on_meta: bool = False) -> ActorCritic:
    """The policy from ``policy_path``; the value model from ``value_path``.

    A reward model's directory (a one-output sequence classifier, from ``cai train rm``)
    gives the value model its backbone *and* its scoring head, as TRL and Huang et al. (2024,
    "The N implementation details of RLHF with PPO") start it: its first values are the
    reward model's scores of each prefix. A causal LM's directory gives the backbone and a
    zero head (values start at 0).

    ``on_meta``: the same modules from the configs alone, on the ``meta`` device (no weight is
    read or allocated): what the FSDP learners other than rank 0 shard before rank 0
    broadcasts the weights (core.sharding.load_from_rank0)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(value_path, trust_remote_code=trust_remote_code)
    scorer = any(a.endswith("ForSequenceClassification") for a in config.architectures or ()) and config.num_labels == 1
    if on_meta:
        policy_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            policy = AutoModelForCausalLM.from_config(policy_config, dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code)
            backbone = (AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                       trust_remote_code=trust_remote_code).base_model
                        if scorer else AutoModel.from_config(config, dtype=torch.float32,
                                                             trust_remote_code=trust_remote_code))
            model = ActorCritic(policy, backbone)
        disable_dropout(model)
        return model
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    head = None
    if scorer:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            value_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        backbone, head = reward_model.base_model, reward_model.score  # TRL reads the head as `.score` too
    else:
        backbone = AutoModel.from_pretrained(value_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = ActorCritic(policy, backbone)
    if head is not None:
        with torch.no_grad():
            model.value_head.weight.copy_(head.weight)
            if head.bias is not None:
                model.value_head.bias.copy_(head.bias)
    disable_dropout(model)
    return model


def weights_blob(state: dict[str, torch.Tensor]) -> bytes:
    """A policy's weights by Hugging Face name (its whole state dict, LoRA merged:
    ``core.lora.merged_state``) as ``safetensors`` bytes, on the CPU."""
    from safetensors.torch import save

    return save({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()})

"""LoRA adapters (peft) on a causal LM, and the merged weights the engines and `--out` get.

A LoRA-wrapped linear layer computes ``W x + (alpha / r) · B A x``. Merging folds the update
into the base weight, ``W' = W + (alpha / r) · B A``, so the result is an ordinary model that
transformers and vLLM load. :func:`merged_state` does that on a state dict (the learner's own,
or one gathered from FSDP shards) instead of on the live model, so training can go on after
each weight sync and no rank needs peft's in-place ``merge_and_unload``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"  # beside the merged model in --out: the adapter alone (peft's layout)


def lora_config(r: int, alpha: int, targets: Sequence[str]):
    """peft's ``LoraConfig`` for a causal LM: ``all-linear`` (alone) targets every linear layer
    but the output head, as peft defines it; otherwise the named modules."""
    from peft import LoraConfig

    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def add_adapters(model: torch.nn.Module, r: int, alpha: int, targets: Sequence[str]) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters (B = 0, so it computes exactly what it did); only the
    adapters train. A target that matches no module is an error naming it (peft's message)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(r, alpha, targets))
    except ValueError as exc:
        raise ValueError(f"--lora-targets {' '.join(targets)}: {exc}") from None


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_state(state: Mapping[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A peft model's state dict (``base_model.model.<name>.base_layer.weight`` with its
    ``lora_A``/``lora_B``) as the base model's, each adapted weight merged:
    ``W + scaling · B @ A`` computed in float32 and cast back to W's dtype. A state dict
    without adapters comes back with its names unchanged."""
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        plain = export_name(name)
        if plain is None:
            continue
        if ".base_layer." in name:
            module = name.rsplit(".base_layer.", 1)[0]
            down, up = state.get(f"{module}.lora_A.{adapter}.weight"), state.get(f"{module}.lora_B.{adapter}.weight")
            if down is None:  # an embedding: peft keeps A (r, vocab) and B (dim, r) as plain tensors
                embedding_down = state.get(f"{module}.lora_embedding_A.{adapter}")
                embedding_up = state.get(f"{module}.lora_embedding_B.{adapter}")
                if embedding_down is not None and embedding_up is not None:
                    down, up = embedding_up.T, embedding_down.T  # (B A)^T = A^T B^T
            if down is not None and up is not None and name.endswith("weight"):
                delta = scaling * (up.float() @ down.float())
                if delta.shape != tensor.shape:  # e.g. GPT-2's Conv1D (peft's fan_in_fan_out)
                    raise ValueError(f"{plain}: a LoRA update of shape {tuple(delta.shape)} does not fit the "
                                     f"weight {tuple(tensor.shape)}; only Linear and Embedding layers are merged")
                tensor = (tensor.float() + delta).to(tensor.dtype)
        merged[plain] = tensor
    return merged


def export_name(key: str) -> str | None:
    """The base model's name for a (peft) state-dict key; None for an adapter's own tensor."""
    if ".lora_" in key:
        return None
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merge_sources(keys: Sequence[str], adapter: str = "default") -> dict[str, tuple[str, ...]]:
    """Each merged name (:func:`merged_state`) and the state-dict keys its tensor is computed
    from: the key itself, and for an adapted weight its ``lora_A``/``lora_B`` (or embedding)
    tensors, in the order of ``keys``."""
    present = set(keys)
    sources: dict[str, tuple[str, ...]] = {}
    for key in keys:
        name = export_name(key)
        if name is None:
            continue
        extra: tuple[str, ...] = ()
        if ".base_layer." in key and key.endswith("weight"):
            module = key.rsplit(".base_layer.", 1)[0]
            extra = tuple(k for k in (f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight",
                                      f"{module}.lora_embedding_A.{adapter}", f"{module}.lora_embedding_B.{adapter}")
                          if k in present)
        sources[name] = (key, *extra)
    return sources


def adapter_scaling(model: torch.nn.Module, adapter: str = "default") -> float:
    """alpha / r of ``model``'s adapter (1 for a model without one)."""
    if not is_adapted(model):
        return 1.0
    config = model.peft_config[adapter]
    return config.lora_alpha / config.r

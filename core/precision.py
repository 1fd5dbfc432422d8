"""One precision policy for every learner (``--compute-dtype``, ``--master-dtype``).

* Trainable weights are float32 *master* copies (the optimizer steps them), under DDP and FSDP
  alike. ``--master-dtype bfloat16`` (pure bf16 training) is an explicit choice that warns: an
  update smaller than half a bf16 step of the weight is lost (lr 1e-5 on a weight of 1 is
  below 2**-8 of it).
* ``--compute-dtype`` sets the dtype of every forward (policy, value, reference, reward model):
  ``auto`` is bfloat16 on GPUs, float32 on CPUs. In bf16 every *parameter* is cast for the
  forward, as FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16)`` does; autocast alone
  would leave embeddings and norms in float32, so a policy computed under autocast and a
  reference stored in bf16 would disagree from the first step. :func:`cast_forward` does the
  same cast under DDP and in one process; gradients flow back through the cast to the float32
  masters.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype_name(name: str, use_gpu: bool) -> str:
    """``--compute-dtype`` resolved, by name: ``auto`` is bfloat16 on GPUs and float32 on CPUs."""
    if name == "auto":
        return "bfloat16" if use_gpu else "float32"
    if name not in DTYPES:
        raise ValueError(f"compute dtype must be 'auto', 'float32' or 'bfloat16', not {name!r}")
    return name


def resolve_compute_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """``--compute-dtype`` as a torch dtype (:func:`compute_dtype_name`)."""
    return DTYPES[compute_dtype_name(name, use_gpu)]


def master_dtype(name: str) -> torch.dtype:
    """``--master-dtype``: the dtype the optimizer steps. bfloat16 warns (pure bf16 training)."""
    if name not in DTYPES:
        raise ValueError(f"master dtype must be 'float32' or 'bfloat16', not {name!r}")
    if name == "bfloat16":
        warnings.warn("--master-dtype bfloat16: the optimizer steps bf16 weights with no float32 copy, so updates "
                      "smaller than a weight's bf16 step (about 1/256 of it) are lost", stacklevel=2)
    return DTYPES[name]


def cast_forward(module: nn.Module, dtype: torch.dtype | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with every floating parameter cast to ``dtype`` for this call
    (None, or parameters already in it: a plain call). The casts are part of the autograd
    graph, so the gradients reach the parameters themselves, in their own dtype."""
    params = dict(module.named_parameters())
    if dtype is None or all(p.dtype == dtype or not p.is_floating_point() for p in params.values()):
        return module(*args, **kwargs)
    cast = {name: p.to(dtype) if p.is_floating_point() else p for name, p in params.items()}
    return torch.func.functional_call(module, cast, args, kwargs, tie_weights=True, strict=False)

"""One precision policy (core.precision), on the CPU where bf16 runs too: every parameter cast
for the forward, gradients on the float32 masters, and a bf16 policy that computes exactly what
a bf16 reference does."""

from __future__ import annotations

import pytest
import torch

from core.precision import cast_forward, master_dtype, resolve_compute_dtype


def test_auto_is_bf16_on_gpus_and_float32_on_cpus():
    assert resolve_compute_dtype("auto", use_gpu=True) == torch.bfloat16
    assert resolve_compute_dtype("auto", use_gpu=False) == torch.float32
    assert resolve_compute_dtype("bfloat16", use_gpu=False) == torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype must be"):
        resolve_compute_dtype("float16", use_gpu=True)
    assert master_dtype("float32") == torch.float32
    with pytest.warns(UserWarning, match="no float32 copy"):
        assert master_dtype("bfloat16") == torch.bfloat16


def test_a_cast_forward_is_the_bf16_models_forward_and_its_gradients_reach_the_float32_masters(tiny_model):
    from transformers import AutoModelForCausalLM

    master = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    stored = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 4, 7, 3]])
    cast = cast_forward(master, torch.bfloat16, input_ids=ids).logits
    assert cast.dtype == torch.bfloat16
    assert torch.equal(cast, stored(input_ids=ids).logits), "the same computation, bit for bit"
    # autocast alone is another computation: embeddings and norms stay float32 there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = master(input_ids=ids).logits
    assert not torch.equal(autocast.to(torch.bfloat16), cast)
    cast.float().sum().backward()
    grads = {name: p.grad for name, p in master.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert all(p.dtype == torch.float32 for p in master.parameters()), "the masters stay float32"
    assert torch.equal(cast_forward(master, None, input_ids=ids).logits, master(input_ids=ids).logits)


def test_a_bf16_policy_and_a_bf16_reference_give_a_kl_of_zero_before_any_update(tiny_model):
    """What `cai train ppo --compute-dtype bfloat16 --frozen-dtype bfloat16` computes at step 1:
    the policy's old log-probs (float32 masters, cast for the forward) against the reference
    stored in bf16."""
    from core.frozen_models import FrozenModels
    from core.ppo_policy import load_actor_critic, pack_rollouts

    batch = pack_rollouts([[10, 11, 12], [20, 21]], [[30, 31, 32], [40, 41]], pad_id=0)
    model = load_actor_critic(tiny_model, tiny_model)
    model.compute_dtype = torch.bfloat16
    with torch.no_grad():
        policy, _, values = model(batch, 0.7)
    reference = FrozenModels(tiny_model, reward_fn="vowel_share", dtype=torch.bfloat16).ref_logprobs(batch, 0.7)
    assert ((policy - reference) * batch.mask).abs().max().item() <= 1e-6
    float32 = FrozenModels(tiny_model, reward_fn="vowel_share", dtype=torch.float32).ref_logprobs(batch, 0.7)
    assert ((policy - float32) * batch.mask).abs().max().item() > 1e-4, "against a float32 reference it is not"
    assert torch.isfinite(values).all()


def test_an_update_at_lr_1e_5_moves_float32_masters_and_is_lost_in_pure_bf16():
    """AdamW's first step moves each weight by about lr: 1e-5 of a weight near 1 is below half
    of bf16's step there (2**-8), so a bf16 weight rounds back to where it was."""
    weights = torch.linspace(0.5, 1.5, 64)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        param = torch.nn.Parameter(weights.to(dtype).clone())
        optimizer = torch.optim.AdamW([param], lr=1e-5, weight_decay=0.0)
        param.grad = torch.ones_like(param)
        optimizer.step()
        moved[dtype] = (param.detach().float() != weights.to(dtype).float()).float().mean().item()
    assert moved[torch.float32] == 1.0 and moved[torch.bfloat16] == 0.0

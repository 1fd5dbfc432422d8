"""LoRA adapters (``core.lora``) on the tiny model: the merge on a state dict against peft's own."""

from __future__ import annotations

import copy

import pytest
import torch

from core.lora import adapter_scaling, add_adapters, merged_state


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def with_trained_adapters(model_dir: str, targets: list[str]):
    """The tiny model with LoRA adapters (r 4, alpha 16) whose B are random, as after training
    (fresh adapters have B = 0, and merging them would change nothing)."""
    model = add_adapters(load_model(model_dir), r=4, alpha=16, targets=targets)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_merged_state_equals_peft_merge_and_unload(tiny_model, targets):
    model = with_trained_adapters(tiny_model, targets)
    assert adapter_scaling(model) == 4.0
    merged = merged_state(model.state_dict(), adapter_scaling(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    gaps = {name: (merged[name] - tensor).abs().max().item() for name, tensor in expected.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-6, f"largest gap {gaps[worst]:.2e} in {worst}"
    # the adapters did change the adapted weights (else the comparison would prove nothing)
    base = load_model(tiny_model).state_dict()
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])


def test_a_state_without_adapters_comes_back_unchanged(tiny_model):
    state = load_model(tiny_model).state_dict()
    merged = merged_state(state, scaling=2.0)
    assert list(merged) == list(state)
    assert all(merged[name] is tensor for name, tensor in state.items())
    assert adapter_scaling(load_model(tiny_model)) == 1.0


def test_only_the_adapters_train(tiny_model):
    model = add_adapters(load_model(tiny_model), r=4, alpha=8, targets=["q_proj", "v_proj"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 layers x 2 targets x (A, B)
    assert len(trainable) == 8 and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # fresh adapters compute exactly what the model did: B starts at 0
    assert all(not p.any() for name, p in model.named_parameters() if ".lora_B." in name)


def test_an_unknown_target_is_an_error_naming_it(tiny_model):
    with pytest.raises(ValueError, match="no_such_proj"):
        add_adapters(load_model(tiny_model), r=4, alpha=8, targets=["no_such_proj"])


def test_an_adapted_embedding_merges_as_peft_merges_it(tiny_model):
    from transformers import AutoModelForCausalLM

    from core.lora import add_adapters, adapter_scaling, merged_state

    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), 4, 8,
                         ["embed_tokens", "q_proj"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    merged = merged_state(model.state_dict(), adapter_scaling(model))
    expected = model.merge_and_unload().state_dict()
    assert not torch.equal(merged["model.embed_tokens.weight"],
                           AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()["model.embed_tokens.weight"])
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)

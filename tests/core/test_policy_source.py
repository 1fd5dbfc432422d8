"""What a weight sync sends: the policy's tensors under the engine's names, LoRA merged, one
bucket at a time (the FSDP gather per bucket: tests/core/test_sharding.py)."""

from __future__ import annotations

import torch

from core.lora import add_adapters, merged_state
from core.policy_source import PolicySource
from core.weight_plan import pack, plan_buckets, unpack


def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def sent(source: PolicySource, cap: int) -> dict[str, torch.Tensor]:
    """Every tensor as the engine receives it: materialized, packed and unpacked per bucket."""
    out = {}
    for bucket in plan_buckets(source.specs(), cap):
        out.update(unpack(bucket, pack(bucket, source.materialize(bucket))))
    return out


def test_a_plain_policy_travels_under_its_own_names():
    model = tiny_llama()
    received = sent(PolicySource(model), 4 << 10)
    state = model.state_dict()
    assert received.keys() == state.keys()
    assert all(torch.equal(received[name], state[name]) for name in state)


def test_lora_adapters_arrive_merged_into_the_base_weights():
    model = add_adapters(tiny_llama(tied=True), 4, 8, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at the start; a trained adapter changes the weights
    source = PolicySource(model)
    received = sent(source, 4 << 10)
    expected = merged_state({k: v.detach() for k, v in model.state_dict().items()}, 2.0)
    expected.pop("lm_head.weight")  # tied: the engine ties it itself
    assert received.keys() == expected.keys()
    assert all(torch.allclose(received[name], expected[name], atol=1e-6) for name in expected)
    original = tiny_llama(tied=True).state_dict()  # the same seed: the weights before the adapters
    changed = [name for name in expected if not torch.equal(expected[name], original[name])]
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)

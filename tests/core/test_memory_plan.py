"""Memory formulas of `cai plan` on shapes small enough to count by hand, and on published figures."""

from __future__ import annotations

import json

import pytest

from core.config import ConfigError
from core.memory_plan import (KNOWN_MODELS, MemoryPlanError, ModelShape, StagePlan, TrainedModel, activation_bytes,
                              check_fits, engine_terms, known_shape, kv_bytes_per_token, learner_terms, logits_bytes,
                              lora_params, read_shape, training_bytes_per_param)

# hidden 8, 2 layers, MLP 16, vocab 10, 2 heads and 1 kv head of 4 dims: q is 8 wide, k and v 4
TINY = ModelShape(hidden_size=8, num_layers=2, intermediate_size=16, vocab_size=10, num_heads=2, num_kv_heads=1,
                  head_dim=4, tie_embeddings=False)
# Llama-2-7B (no GQA): the model of peft's often-quoted LoRA count
LLAMA2_7B = ModelShape(4096, 32, 11008, 32000, 32, 32, 128, False, 4096)


def test_parameters_of_a_tiny_shape_counted_by_hand():
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; gate, up 8x16 and down 16x8 = 384; two norms 16
    assert TINY.layer_params == 192 + 384 + 16
    # embeddings 10x8 + 2 blocks + final norm 8 + untied head 8x10
    assert TINY.params == 80 + 2 * 592 + 8 + 80
    from dataclasses import replace
    assert replace(TINY, tie_embeddings=True).params == 80 + 2 * 592 + 8
    assert TINY.as_score_model().params == 80 + 2 * 592 + 8 + 8  # the head maps hidden to one score
    assert TINY.as_score_model().output_size == 1


@pytest.mark.parametrize("hub_id, published", [
    ("Qwen/Qwen2.5-7B-Instruct", 7.61e9), ("Qwen/Qwen2.5-0.5B-Instruct", 0.494e9),
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9), ("meta-llama/Llama-3.1-70B-Instruct", 70.6e9),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7.25e9), ("HuggingFaceTB/SmolLM2-135M-Instruct", 134.5e6),
])
def test_known_models_match_their_published_sizes(hub_id, published):
    assert known_shape(hub_id).params == pytest.approx(published, rel=0.005)


def test_llama2_7b_parameters():
    assert LLAMA2_7B.params == pytest.approx(6.74e9, rel=0.002)


def test_an_unknown_hub_id_names_itself_and_asks_for_a_directory():
    with pytest.raises(MemoryPlanError, match=r"'org/unknown'.*pass a local model directory"):
        known_shape("org/unknown")


def test_shape_from_a_config_json(tmp_path):
    config = {"architectures": ["LlamaForSequenceClassification"], "hidden_size": 8, "num_hidden_layers": 2,
              "intermediate_size": 16, "vocab_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1,
              "tie_word_embeddings": False, "max_position_embeddings": 128, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_shape(tmp_path)
    assert shape.head_dim == 4  # hidden / heads when the config has no head_dim
    assert shape.score_head and shape.dtype == "float32" and shape.max_position_embeddings == 128
    with pytest.raises(MemoryPlanError, match="no vocab_size"):
        ModelShape.from_config({k: v for k, v in config.items() if k != "vocab_size"})


def test_mixed_precision_adam_costs_the_zero_papers_16_bytes_per_parameter():
    """Rajbhandari et al. 2020 §3.1: mixed-precision Adam holds 16Ψ bytes of model state: here
    float32 masters and gradients and two float32 moments (4 + 4 + 8), 120 GB for 7.5B; the bf16
    copy each forward uses is counted beside it, as what it is (core.precision)."""
    assert training_bytes_per_param() == {"weights": 4, "gradients": 4, "optimizer": 8}
    assert sum(training_bytes_per_param(master_bytes=2).values()) == 12  # pure bf16: no float32 copy
    shape = known_shape("Qwen/Qwen2.5-7B-Instruct")
    terms = learner_terms([TrainedModel(shape)], gpu=True, shards=1, sequences=1, seq_len=1, compute_bytes=2)
    assert terms["weights"] + terms["gradients"] + terms["optimizer"] == 16 * shape.params
    assert terms["compute copy"] == 2 * shape.params, "DDP casts the whole model for the forward"
    assert "compute copy" not in learner_terms([TrainedModel(shape)], gpu=False, shards=1, sequences=1, seq_len=1)
    assert 16 * 7.5e9 == 120e9


def test_fsdp_over_two_learners_halves_ddps_model_state():
    ddp = learner_terms([TrainedModel(TINY)], gpu=True, shards=1, sequences=1, seq_len=4, compute_bytes=2)
    fsdp = learner_terms([TrainedModel(TINY)], gpu=True, shards=2, sequences=1, seq_len=4, compute_bytes=2)
    for term in ("weights", "gradients", "optimizer"):
        assert fsdp[term] == ddp[term] // 2
    assert "unsharded block" not in ddp and "compute copy" not in fsdp
    assert fsdp["unsharded block"] == TINY.layer_params * 2 * 2  # one block's bf16 weights and gradients
    assert fsdp["activations"] == ddp["activations"] and fsdp["logits"] == ddp["logits"]  # per device, unsharded


def test_lora_adapters_counted_by_hand():
    # r·(in + out) per targeted linear: q 8→8, v 8→4; two blocks
    assert lora_params(TINY, 2, ["q_proj", "v_proj"]) == 2 * (2 * (8 + 8) + 2 * (8 + 4))
    all_linear = 8 + 8 + 8 + 4 + 8 + 4 + 8 + 8 + 8 + 16 + 8 + 16 + 16 + 8
    assert lora_params(TINY, 2, ["all-linear"]) == 2 * 2 * all_linear
    # peft's figure for LLaMA-7B, r=8 on q_proj and v_proj: "trainable params: 4,194,304"
    assert lora_params(LLAMA2_7B, 8, ("q_proj", "v_proj")) == 4_194_304
    with pytest.raises(MemoryPlanError, match="lora target 'c_attn'"):
        lora_params(TINY, 2, ["c_attn"])


def test_lora_trains_only_the_adapters_and_keeps_the_base_frozen_in_the_master_dtype():
    model = TrainedModel(TINY, lora_r=2, lora_targets=("q_proj", "v_proj"))
    adapters = 112
    gpu = learner_terms([model], gpu=True, shards=1, sequences=1, seq_len=1, compute_bytes=2)
    assert gpu["weights"] == TINY.params * 4 + adapters * 4 and gpu["compute copy"] == TINY.params * 2
    assert gpu["gradients"] == adapters * 4 and gpu["optimizer"] == adapters * 8
    pure = learner_terms([model], gpu=True, shards=1, sequences=1, seq_len=1, compute_bytes=2, master_bytes=2)
    assert pure["weights"] == TINY.params * 2 + adapters * 2 and "compute copy" not in pure


def test_activations_and_logits_by_hand():
    # per token and layer: 4h + 2q + 2kv + 4i = 32 + 16 + 8 + 64 = 120 elements
    assert activation_bytes(TINY, sequences=3, seq_len=5, gpu=True) == 2 * 3 * 5 * 120 * 2
    assert activation_bytes(TINY, sequences=3, seq_len=5, gpu=False) == 2 * 3 * 5 * 120 * 4
    assert logits_bytes(TINY, sequences=3, seq_len=5) == 3 * 5 * 10 * 4
    assert logits_bytes(TINY.as_score_model(), sequences=3, seq_len=5) == 3 * 5 * 4


def test_gradient_checkpointing_keeps_one_hidden_state_per_block_and_one_blocks_activations():
    # 2 layers x 3 sequences x 5 tokens x h 8 x 2 bytes, plus one block's 120 elements per token
    assert activation_bytes(TINY, sequences=3, seq_len=5, gpu=True, checkpointing=True) == (
        2 * 3 * 5 * 8 * 2 + 3 * 5 * 120 * 2)
    assert activation_bytes(TINY, sequences=3, seq_len=5, gpu=False, checkpointing=True) == (
        2 * 3 * 5 * 8 * 4 + 3 * 5 * 120 * 4)
    # Qwen2.5-7B, 4 x 2048 tokens: 1.5 GiB of block inputs + 1.5 GiB for one block, not 42 GiB
    qwen = known_shape("Qwen/Qwen2.5-7B-Instruct")
    kept = activation_bytes(qwen, sequences=4, seq_len=2048, gpu=True, checkpointing=True)
    assert kept == 28 * 4 * 2048 * 3584 * 2 + 4 * 2048 * 98304 * 2
    assert activation_bytes(qwen, sequences=4, seq_len=2048, gpu=True) == 28 * 4 * 2048 * 98304 * 2 == 42 * 2**30
    # learner_terms: each trained model recomputes its own blocks
    terms = learner_terms([TrainedModel(TINY), TrainedModel(TINY.as_score_model())], gpu=True, shards=1,
                          sequences=3, seq_len=5, checkpointing=True)
    assert terms["activations"] == 2 * (2 * 3 * 5 * 8 * 2 + 3 * 5 * 120 * 2)


def test_frozen_models_hold_weights_only_in_their_dtype():
    terms = learner_terms([TrainedModel(TINY)], gpu=True, shards=1, frozen=[TINY, TINY.as_score_model()],
                          frozen_dtype_bytes=2, sequences=1, seq_len=1)
    assert terms["frozen models"] == (TINY.params + TINY.as_score_model().params) * 2
    assert terms["activations"] == activation_bytes(TINY, sequences=1, seq_len=1, gpu=True)  # no grad: none


def test_kv_cache_per_token():
    llama8b = known_shape("meta-llama/Llama-3.1-8B-Instruct")
    assert kv_bytes_per_token(llama8b, 2) == 2 * 32 * 8 * 128 * 2 == 128 * 1024  # 128 KiB per token in bf16
    assert kv_bytes_per_token(llama8b, 2, tensor_parallel=2) == 64 * 1024
    assert kv_bytes_per_token(llama8b, 2, tensor_parallel=16) == 2 * 32 * 1 * 128 * 2  # a kv head per rank at least
    gpu = engine_terms(TINY, gpu=True, dtype_bytes=2, tensor_parallel=1, max_model_len=100, cpu_kv_cache_gib=1)
    assert gpu == {"weights": TINY.params * 2, "kv cache": 2 * 2 * 1 * 4 * 2 * 100}
    cpu = engine_terms(TINY, gpu=False, dtype_bytes=4, tensor_parallel=1, max_model_len=100, cpu_kv_cache_gib=1)
    assert cpu == {"weights": TINY.params * 4, "kv cache": 2**30}  # VLLM_CPU_KVCACHE_SPACE


def test_check_fits_names_the_stage_and_its_largest_term():
    gib = 2**30
    learner = StagePlan("sft", "fsdp learner", True, 8, {"weights": 2 * gib, "activations": 50 * gib})
    engine = StagePlan("generate", "engine", True, 0, {"weights": 15 * gib, "kv cache": 3 * gib}, usable_fraction=0.85)
    cpu = StagePlan("rm", "ddp learner", False, 1, {"weights": 500 * gib})
    check_fits([learner, engine, cpu], 80 * gib)  # CPU plans unchecked without a CPU size
    with pytest.raises(MemoryPlanError, match=r"stage `rm` does not fit.*largest term is weights"):
        check_fits([learner, engine, cpu], 80 * gib, cpu_bytes=24 * gib)
    with pytest.raises(ConfigError, match=r"stage `generate` does not fit.*85% of 20 GiB.*weights \(15.0 GiB\)"):
        check_fits([engine], 20 * gib)  # 18 GiB > 0.85 x 20 GiB: vLLM's share, not the whole device
    with pytest.raises(MemoryPlanError) as refused:
        check_fits([learner, engine], 4 * gib)
    assert "stage `sft`" in str(refused.value) and "activations (50.0 GiB)" in str(refused.value)


def test_the_table_holds_what_the_cli_promises():
    assert set(KNOWN_MODELS) >= {"Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
                                 "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
                                 "mistralai/Mistral-7B-Instruct-v0.3", "HuggingFaceTB/SmolLM2-135M-Instruct"}


def test_weight_sync_buffers_are_two_buckets_or_two_embeddings():
    """Learner rank 0's sync buffers (#16): two packed buffers, each a bucket or the largest
    tensor; under FSDP also the gathered bucket in float32; the blob holds the whole policy."""
    from core.memory_plan import known_shape, sync_bytes

    llama8b = known_shape("meta-llama/Llama-3.1-8B-Instruct")
    embedding = llama8b.vocab_size * llama8b.hidden_size  # 128256 x 4096: larger than a 64 MiB bucket
    assert sync_bytes(llama8b, bucket_bytes=64 << 20, gpu=True, sharded=False, transport="nccl") == 2 * embedding * 2
    assert sync_bytes(llama8b, bucket_bytes=64 << 20, gpu=True, sharded=True, transport="nccl") == \
        2 * embedding * 2 + embedding * 4
    assert sync_bytes(llama8b, bucket_bytes=4 << 30, gpu=True, sharded=False, transport="nccl") == 2 * (4 << 30)
    assert sync_bytes(llama8b, bucket_bytes=64 << 20, gpu=True, sharded=True, transport="blob") == llama8b.params * 6
    # shm: the whole policy in the engines' dtype in host memory, none of it on a GPU
    assert sync_bytes(llama8b, bucket_bytes=64 << 20, gpu=False, sharded=False, transport="shm") == llama8b.params * 4
    assert sync_bytes(llama8b, bucket_bytes=64 << 20, gpu=True, sharded=True, transport="shm") == embedding * 4

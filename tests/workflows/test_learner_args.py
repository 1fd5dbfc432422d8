"""The GPU-only settings of the learners, checked without a GPU: the training arguments the
trainers get on GPUs, and FSDP's mixed precision (bf16 compute over float32 shards) run on the
CPU in a one-process gloo group."""

from __future__ import annotations

import socket

import pytest
import torch

from core.config import load_config
from learners.hf_sharding import FSDP_CONFIG, model_dtype
from learners.hf_configs import SFTConfig
from learners.hf_trainers import _common_args


def sft(**values) -> SFTConfig:
    return load_config(SFTConfig, overrides=dict(model="m", data=["d"], out="o", **values))


def test_fsdp_on_gpus_is_the_trainers_fsdp2_plugin_over_nccl_in_bf16():
    cfg = sft(use_gpu=True, strategy="fsdp", gradient_checkpointing=True)
    args = _common_args(cfg, "/tmp/x")
    assert args["fsdp"] is True and args["ddp_backend"] == "nccl" and args["bf16"] and not args["use_cpu"]
    assert args["fsdp_config"] == {**FSDP_CONFIG, "activation_checkpointing": True}
    assert args["fsdp_config"]["version"] == 2 and args["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    assert "gradient_checkpointing" not in args, "under FSDP the plugin recomputes, not the trainer"
    assert model_dtype(cfg.learner) == torch.float32, "float32 shards: the optimizer's master weights"


def test_ddp_trains_float32_masters_and_computes_in_bf16_on_gpus():
    gpu = sft(use_gpu=True, gradient_checkpointing=True)
    args = _common_args(gpu, "/tmp/x")
    assert "fsdp" not in args and args["ddp_backend"] == "nccl" and args["gradient_checkpointing"] and args["bf16"]
    assert model_dtype(gpu.learner) == torch.float32, "float32 masters under DDP too"
    cpu = _common_args(sft(), "/tmp/x")
    assert cpu["ddp_backend"] == "gloo" and cpu["use_cpu"] and not cpu["bf16"]
    assert _common_args(sft(compute_dtype="bfloat16"), "/tmp/x")["bf16"], "bf16 on CPUs when asked"
    assert not _common_args(sft(use_gpu=True, compute_dtype="float32"), "/tmp/x")["bf16"]
    with pytest.warns(UserWarning, match="pure bf16|no float32 copy"):
        assert model_dtype(sft(master_dtype="bfloat16").learner) == torch.bfloat16


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    yield
    dist.destroy_process_group()


def test_gpu_mixed_precision_computes_in_bf16_over_float32_shards(tiny_model, one_process_group):
    from transformers import AutoModelForCausalLM

    from core.sharding import is_sharded, shard_model, transformer_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert [type(b).__name__ for b in transformer_blocks(model)] == ["LlamaDecoderLayer"] * 2
    shard_model(model, compute_dtype=torch.bfloat16)
    assert is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
    logits = model(input_ids=torch.tensor([[1, 5, 9, 4]])).logits
    assert logits.dtype == torch.bfloat16, "the forward ran on bf16 copies of the weights"
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters()), \
        "gradients land on the float32 shards"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp_learners_but_rank_0_build_the_model_without_its_weights(tiny_model, tmp_path, tied):
    """learners.hf_sharding.skeleton, what every FSDP learner but rank 0 builds before accelerate sends
    it its shards: the same parameters as the model read from disk, tied embeddings still one
    parameter (accelerate maps parameters to their shards by name, and a rank whose head was a
    parameter of its own failed), each with storage of its own on the CPU (accelerate also maps
    them by data pointer, and every ``meta`` tensor has the same one), and the real rotary buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from learners.hf_sharding import skeleton as skeleton_of

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = tied
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config)
    skeleton = skeleton_of(AutoModelForCausalLM, load_config(SFTConfig, overrides=dict(
        model=str(tmp_path), data=["d"], out="o")), torch.float32)
    assert [name for name, _ in skeleton.named_parameters()] == [name for name, _ in model.named_parameters()]
    assert (skeleton.lm_head.weight is skeleton.model.embed_tokens.weight) == tied
    params = list(skeleton.parameters())
    assert all(p.device.type == "cpu" for p in params) and len({p.data_ptr() for p in params}) == len(params)
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in skeleton.named_buffers())

"""The models the Hugging Face trainers (`cai train sft|rm|dpo`) train, and how FSDP shards
them: their dtypes (core.precision), accelerate's FSDP plugin as the trainers take it, and the
load under FSDP, where rank 0 alone reads the weights (docs/memory.md)."""

from __future__ import annotations

from learners.hf_configs import TrainJobConfig
from learners.options import LearnerOptions


def model_dtype(learner: LearnerOptions):
    """The trained weights' dtype: float32 masters (core.precision), under DDP and FSDP alike;
    bfloat16 only with --master-dtype bfloat16, which warns."""
    from core.precision import master_dtype

    return master_dtype(learner.master_dtype)


def reads_weights(learner: LearnerOptions) -> bool:
    """Whether this learner reads the starting weights: every learner under DDP; under FSDP
    only rank 0, which sends the others their shards."""
    import torch.distributed as dist

    return learner.strategy != "fsdp" or not dist.is_initialized() or dist.get_rank() == 0


def trained_model(model_class, cfg: TrainJobConfig, **config_overrides):
    """The model a trainer trains, in its master dtype. Under FSDP only rank 0 reads the
    weights; the other ranks build a :func:`skeleton`, and accelerate sends them their shards
    from rank 0's copy when the trainer prepares the model (``cpu_ram_efficient_loading`` in
    FSDP_CONFIG). No rank but 0 holds a whole copy in host memory
    (benchmarks/bench_learner_load.py)."""
    dtype = model_dtype(cfg.learner)
    if not reads_weights(cfg.learner):
        return skeleton(model_class, cfg, dtype, **config_overrides)
    return model_class.from_pretrained(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                       **config_overrides)


def skeleton(model_class, cfg: TrainJobConfig, dtype, **config_overrides):
    """The modules of ``cfg.model`` with nothing read: their buffers computed from the config
    (the rotary frequencies, which accelerate keeps as built), their parameters uninitialised.
    Storage never written stays out of host memory until the shards are copied in. It is real
    storage, not ``meta``: accelerate (1.15) maps the optimizer's parameters to their shards by
    data pointer, and every ``meta`` tensor has the same one."""
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig

    trust = cfg.trust_remote_code
    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=trust, **config_overrides)
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust)
    allocated: dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in allocated:
                allocated[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                    requires_grad=param.requires_grad)
            setattr(module, name, allocated[id(param)])
    model.tie_weights()  # init_empty_weights registers a tied parameter anew: tie it again (tie_word_embeddings)
    return model


def bf16_compute(learner: LearnerOptions) -> bool:
    """Whether the Hugging Face trainer computes in bf16 (its ``bf16``): under FSDP, accelerate's
    FSDP2 casts every parameter for the forward (MixedPrecisionPolicy); under DDP, autocast."""
    import torch

    from core.precision import resolve_compute_dtype

    return resolve_compute_dtype(learner.compute_dtype, learner.use_gpu) == torch.bfloat16


# Accelerate's FSDP plugin, as the Hugging Face trainers take it: FSDP2, one unit per
# transformer block (the model's ``_no_split_modules``), sharded (DCP) checkpoints that each
# rank writes beside the others; the final model is gathered into one safetensors model.
# ``cpu_ram_efficient_loading``: the model is sharded on ``meta`` and every rank receives its
# shards from rank 0 (trained_model). It also makes transformers (5.19) give every
# ``from_pretrained`` of a rank but the first zeros for weights once accelerate is up, so no
# model may be loaded behind the trainer's back on those ranks (DPO's reference: fsdp_reference).
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
               "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True}


def with_strategy(trainer_class, learner: LearnerOptions):
    """``trainer_class`` as the learners' strategy needs it: unchanged for DDP; for FSDP,
    the trainer's own FSDP path (accelerate's plugin, from ``fsdp_config``) with two settings
    accelerate 1.15 does not take from the training arguments:

    * on CPU, FSDP at all: ``AcceleratorState`` switches to ``DistributedType.FSDP`` only for
      accelerator devices and silently trains CPU processes as DDP (accelerate/state.py,
      1.15); here the plugin is put in place as it would be on GPUs (gloo runs FSDP2);
    * in bf16 (--compute-dtype), bf16 compute with float32 gradient reduction (accelerate sets both
      to bf16).
    """
    if learner.strategy != "fsdp":
        return trainer_class

    class Sharded(trainer_class):
        def create_accelerator_and_postprocess(self):
            import torch
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
            from torch.distributed.fsdp import MixedPrecisionPolicy

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if not self.is_fsdp_enabled and state.distributed_type == DistributedType.MULTI_CPU:
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True
            if bf16_compute(learner):
                state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    Sharded.__name__ = Sharded.__qualname__ = f"FSDP{trainer_class.__name__}"
    return Sharded


def fsdp_reference(cfg: TrainJobConfig):
    """DPO's frozen reference under FSDP: the starting model, sharded one unit per block as the
    policy is, and stored in the compute dtype (core.precision), which is what the policy's
    parameters are cast to for its forward: at step 0 the two are the same computation, and the
    reference costs 2 bytes a parameter in bf16. Rank 0 reads it; every rank shards the same
    modules built on ``meta`` and receives its shards from rank 0
    (core.sharding.load_from_rank0), as the PPO learners load. TRL would read the whole model on every rank, where
    transformers gives the ranks but the first zeros (FSDP_CONFIG), and shard it as one unit."""
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.precision import resolve_compute_dtype
    from core.sharding import load_from_rank0, shard_model

    compute, trust = resolve_compute_dtype(cfg.learner.compute_dtype, cfg.learner.use_gpu), cfg.trust_remote_code
    full = (AutoModelForCausalLM.from_pretrained(cfg.model, dtype=compute, trust_remote_code=trust)
            if dist.get_rank() == 0 else None)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model, trust_remote_code=trust),
                                                    dtype=compute, trust_remote_code=trust)
    reference = shard_model(skeleton, compute_dtype=compute)
    load_from_rank0(reference, full, ray.train.torch.get_device())
    return reference.eval().requires_grad_(False)

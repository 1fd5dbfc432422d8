"""Per-device memory of each stage, from the model's shapes: what `cai plan` adds up.

Pure arithmetic on a :class:`ModelShape` (read from a model directory's ``config.json``, or
from :data:`KNOWN_MODELS` for a few hub ids, since nothing may be downloaded to plan).
Every term is in bytes *per device* (one GPU, or one process on CPU); ``docs/memory.md``
states each formula with a worked example.

Training (sft, rm, dpo, PPO's policy and value) with AdamW:

* float32 masters (core.precision, the default): 4 (weights) + 4 (gradients) + 8 (two fp32
  moments) = 16 bytes per trained parameter, the figure of the ZeRO paper (Rajbhandari et al.
  2020, §3.1, "16Ψ" for mixed-precision Adam). With ``--compute-dtype bfloat16`` each
  parameter is also cast to bf16 for the forward: under DDP the whole model's copy (2 bytes a
  parameter, kept for the backward), under FSDP only the gathered block's. ``--master-dtype
  bfloat16`` (pure bf16) holds 2 + 2 + 8 instead.
* DDP: every learner holds all of it. FSDP: weights, gradients and optimizer state are
  divided by the learners, plus one transformer block gathered unsharded during
  forward/backward (its weights, and its gradients before the reduce-scatter), in the compute dtype.
* LoRA (r > 0): the base weights stay frozen in the master dtype; the adapters, r·(in + out)
  parameters per targeted linear layer, are the only trained parameters (16 bytes each).

Frozen models (PPO's reference and reward model, DPO's reference) hold weights only, in
their own dtype: one full copy per device that holds them, except DPO's reference under
FSDP, sharded like the policy. Activations (with or without
gradient checkpointing) and logits follow :func:`activation_bytes` and :func:`logits_bytes`.
vLLM engines: :func:`engine_terms`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.config import ConfigError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryPlanError(ConfigError):
    """A stage does not fit its devices, or a model's shape cannot be known."""


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"dtype {dtype!r}: the plan knows {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2): the shapes that set its memory.

    ``score_head``: a sequence classifier (a reward or value model) whose head maps the hidden
    state to one number instead of the vocabulary. Biases (Qwen2's q/k/v) are left out: under
    0.01% of the parameters."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"  # the checkpoint's own dtype (what vLLM's dtype=auto serves on GPU)
    score_head: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block, by its Hugging Face name."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        """One block: attention q/k/v/o (GQA: k and v have num_kv_heads heads), the SwiGLU MLP
        (gate, up, down) and its two RMSNorm weights."""
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden_size

    @property
    def output_size(self) -> int:
        return 1 if self.score_head else self.vocab_size

    @property
    def params(self) -> int:
        """Embeddings + blocks + final norm + head (the LM head unless tied; a score head is hidden × 1)."""
        embeddings = self.vocab_size * self.hidden_size
        tied = self.tie_embeddings and not self.score_head
        head = 0 if tied else self.hidden_size * self.output_size
        return embeddings + self.num_layers * self.layer_params + self.hidden_size + head

    def as_score_model(self) -> ModelShape:
        """The same backbone with a one-output head (what `cai train rm` makes of a causal LM)."""
        return replace(self, score_head=True)

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        """From a Hugging Face ``config.json`` (its standard key names)."""
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
        missing = [k for k in keys if k not in config]
        if missing:
            raise MemoryPlanError(f"{source}: no {', '.join(missing)}: not a decoder the plan knows how to size")
        heads = config["num_attention_heads"]
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        return cls(hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
                   intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
                   num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                   max_position_embeddings=config.get("max_position_embeddings", 4096),
                   dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
                   score_head=config.get("architectures", [""])[0].endswith("ForSequenceClassification"))


# Published config.json values (Hugging Face hub), so that hub ids can be planned offline.
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(896, 24, 4864, 151936, 14, 2, 64, True, 32768),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 28, 18944, 152064, 28, 4, 128, False, 32768),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(4096, 32, 14336, 128256, 32, 8, 128, False, 131072),
    "meta-llama/Llama-3.1-70B-Instruct": ModelShape(8192, 80, 28672, 128256, 64, 8, 128, False, 131072),
    "mistralai/Mistral-7B-Instruct-v0.3": ModelShape(4096, 32, 14336, 32768, 32, 8, 128, False, 32768),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(576, 30, 1536, 49152, 9, 3, 64, True, 8192),
}


def known_shape(hub_id: str) -> ModelShape:
    if hub_id not in KNOWN_MODELS:
        raise MemoryPlanError(f"model {hub_id!r}: its shape is unknown here (the plan reads no hub; it knows "
                              f"{', '.join(sorted(KNOWN_MODELS))}); pass a local model directory instead")
    return KNOWN_MODELS[hub_id]


def read_shape(directory: str | Path) -> ModelShape:
    path = Path(directory) / "config.json"
    return ModelShape.from_config(json.loads(path.read_text()), source=str(path))


# -- terms --------------------------------------------------------------------------------


def training_bytes_per_param(master_bytes: int = 4) -> dict[str, int]:
    """Bytes per trained parameter with AdamW: the weights and gradients in the master dtype
    (float32: ZeRO's 16 in all), and two float32 moments."""
    return {"weights": master_bytes, "gradients": master_bytes, "optimizer": 8}


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] | list[str]) -> int:
    """Adapter parameters: r·(in + out) per targeted linear layer of every block (A is r×in, B is out×r).
    ``all-linear`` targets every linear layer but the output head, as peft does."""
    names = LORA_LINEARS if "all-linear" in targets else tuple(targets)
    unknown = sorted(set(names) - set(LORA_LINEARS))
    if unknown:
        raise MemoryPlanError(f"lora target {unknown[0]!r}: the plan knows {', '.join(LORA_LINEARS)} and all-linear")
    linears = shape.linears()
    return shape.num_layers * sum(rank * sum(linears[name]) for name in set(names))


@dataclass(frozen=True)
class TrainedModel:
    """A model a learner trains: fully, or through LoRA adapters (``lora_r`` > 0)."""

    shape: ModelShape
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("all-linear",)

    @property
    def trainable_params(self) -> int:
        return lora_params(self.shape, self.lora_r, self.lora_targets) if self.lora_r else self.shape.params

    @property
    def frozen_params(self) -> int:
        return self.shape.params if self.lora_r else 0


def activation_bytes(shape: ModelShape, *, sequences: int, seq_len: int, gpu: bool,
                     checkpointing: bool = False) -> int:
    """Activations one forward keeps for its backward. Without recomputation (gradient
    checkpointing off), every block keeps all it saves:

        layers · sequences · seq_len · (4·h + 2·q + 2·kv + 4·i) · bytes

    with h = hidden_size, q = heads·head_dim, kv = kv_heads·head_dim, i = intermediate_size and
    bytes = 2 (bf16 on GPU) or 4 (CPU). It counts the tensors each Llama block saves, the way
    Korthikanti et al. 2022 (§4.1, "34·s·b·h + 5·a·s²·b" bytes for a GPT block) count them:
    the two RMSNorm inputs and the two normed outputs that feed the attention and MLP
    projections (4h), q and the attention output (2q), k and v (2kv), and the MLP's gate, up,
    SiLU(gate) and their product (4i). Their 5·a·s² attention-score term is absent:
    SDPA/FlashAttention does not store the score matrix.

    With ``checkpointing`` (``--gradient-checkpointing``) each block keeps only its input, one
    hidden state per token, and recomputes the rest in backward one block at a time, so at
    most one block's full activations exist at once:

        layers · sequences · seq_len · h · bytes  +  sequences · seq_len · (4·h + 2·q + 2·kv + 4·i) · bytes
    """
    tokens_bytes = sequences * seq_len * (2 if gpu else 4)
    one_block = tokens_bytes * (4 * shape.hidden_size + 2 * shape.q_dim + 2 * shape.kv_dim
                                + 4 * shape.intermediate_size)
    if checkpointing:
        return shape.num_layers * tokens_bytes * shape.hidden_size + one_block
    return shape.num_layers * one_block


def logits_bytes(shape: ModelShape, *, sequences: int, seq_len: int) -> int:
    """sequences · seq_len · outputs · 4: the head's output, in float32 for the log-softmax."""
    return sequences * seq_len * shape.output_size * 4


def learner_terms(trained: list[TrainedModel], *, gpu: bool, shards: int, frozen: list[ModelShape] = (),
                  frozen_dtype_bytes: int = 2, frozen_shards: int = 1, sequences: int, seq_len: int, logits_sequences: int = 0,
                  checkpointing: bool = False, compute_bytes: int = 4, master_bytes: int = 4) -> dict[str, int]:
    """Per-learner bytes: trained models (sharded over ``shards`` learners with FSDP, 1 for DDP)
    in ``master_bytes`` per weight, their copy cast to ``compute_bytes`` for the forward when
    that is smaller, frozen copies (sharded over ``frozen_shards`` learners), activations of ``sequences`` × ``seq_len`` tokens through
    every trained model (recomputed in backward with ``checkpointing``), and the logits of the
    largest forward (``logits_sequences`` rows, default ``sequences``)."""
    per = training_bytes_per_param(master_bytes)
    terms = {
        "weights": sum(m.trainable_params * per["weights"] + m.frozen_params * master_bytes for m in trained) // shards,
        "gradients": sum(m.trainable_params for m in trained) * per["gradients"] // shards,
        "optimizer": sum(m.trainable_params for m in trained) * per["optimizer"] // shards,
    }
    if shards > 1:
        # the block FSDP gathers for compute: its weights, and its gradients before the reduce-scatter
        terms["unsharded block"] = max(m.shape.layer_params * compute_bytes * (1 if m.lora_r else 2) for m in trained)
    elif compute_bytes < master_bytes:  # DDP: every parameter cast for the forward, kept for the backward
        terms["compute copy"] = sum(m.shape.params for m in trained) * compute_bytes
    terms["frozen models"] = sum(s.params for s in frozen) * frozen_dtype_bytes // frozen_shards
    terms["activations"] = sum(activation_bytes(m.shape, sequences=sequences, seq_len=seq_len, gpu=gpu,
                                                checkpointing=checkpointing) for m in trained)
    widest = max([m.shape for m in trained] + list(frozen), key=lambda s: s.output_size)
    terms["logits"] = logits_bytes(widest, sequences=logits_sequences or sequences, seq_len=seq_len)
    return {key: value for key, value in terms.items() if value}


def sync_bytes(shape: ModelShape, *, bucket_bytes: int, gpu: bool, sharded: bool, transport: str) -> int:
    """Learner rank 0's extra bytes during a weight sync (#16). Broadcast transports: two packed
    buffers in the engines' dtype (2 bytes on GPU, 4 on CPU), each the size of a bucket or of
    the largest tensor (the embedding) if that is larger, plus under FSDP the bucket's
    parameters gathered whole in float32. ``blob``: the whole policy gathered (under FSDP) and
    serialized once more. ``shm``: the whole policy packed in the engines' dtype, in host
    memory (on a GPU learner the device holds only the gathered bucket under FSDP)."""
    wire = 2 if gpu else 4
    largest = shape.vocab_size * shape.hidden_size
    if transport == "blob":
        return shape.params * (4 if sharded else 0) + shape.params * wire
    bucket = max(bucket_bytes // wire, largest)
    if transport == "shm":
        return (0 if gpu else shape.params * wire) + (bucket * 4 if sharded else 0)
    return 2 * bucket * wire + (bucket * 4 if sharded else 0)


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """2 (k and v) · layers · kv_heads · head_dim · bytes, with the kv heads split over the
    tensor-parallel ranks (each rank keeps at least one)."""
    heads = math.ceil(shape.num_kv_heads / tensor_parallel)
    return 2 * shape.num_layers * heads * shape.head_dim * dtype_bytes


def engine_terms(shape: ModelShape, *, gpu: bool, dtype_bytes: int, tensor_parallel: int, max_model_len: int,
                 cpu_kv_cache_gib: float) -> dict[str, int]:
    """One vLLM engine, per device. Weights: params · bytes / tensor_parallel.

    KV cache on GPU: one sequence of ``max_model_len`` tokens (kv_bytes_per_token ·
    max_model_len) — the least vLLM needs to start: it refuses an engine whose KV pool cannot
    hold one full-length sequence. vLLM then gives the KV pool whatever is left of its
    ``gpu_memory_utilization`` share of the device, so the plan checks the sum against that
    share (see :class:`StagePlan`) instead of guessing a batch. On CPU, vLLM sizes the pool from
    ``VLLM_CPU_KVCACHE_SPACE``: ``cpu_kv_cache_gib`` exactly."""
    weights = shape.params * dtype_bytes // tensor_parallel
    if gpu:
        kv = kv_bytes_per_token(shape, dtype_bytes, tensor_parallel) * max_model_len
    else:
        kv = int(cpu_kv_cache_gib * GIB)
    return {"weights": weights, "kv cache": kv}


# -- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """The memory of one kind of device in a stage: ``count`` devices (0: as many as the
    cluster fits) each holding ``terms``. ``usable_fraction``: the share of a device the stage may
    take (vLLM's ``gpu_memory_utilization`` for engines on GPU, else 1)."""

    stage: str
    device: str  # learner | frozen actor | engine | ...
    gpu: bool
    count: int
    terms: dict[str, int]
    usable_fraction: float = 1.0
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    def budget(self, device_bytes: int) -> int:
        return int(device_bytes * self.usable_fraction)

    def fits(self, device_bytes: int) -> bool:
        return self.total <= self.budget(device_bytes)


def check_fits(plans: list[StagePlan], device_bytes: int, cpu_bytes: int | None = None) -> None:
    """Raise :class:`MemoryPlanError` naming every stage that does not fit, with its largest term.

    GPU plans are checked against ``device_bytes``; CPU plans against ``cpu_bytes`` (one process
    against a node's memory), or not at all when it is None."""
    failures = []
    for plan in plans:
        size = device_bytes if plan.gpu else cpu_bytes
        if size is None or plan.fits(size):
            continue
        share = f" ({plan.usable_fraction * 100:g}% of {size / GIB:g} GiB)" if plan.usable_fraction < 1 else ""
        failures.append(
            f"stage `{plan.stage}` does not fit: each {plan.device} ({'GPU' if plan.gpu else 'CPU process'}) needs "
            f"{plan.total / GIB:.1f} GiB but has {plan.budget(size) / GIB:.1f} GiB{share}; its largest term is "
            f"{plan.largest} ({plan.terms[plan.largest] / GIB:.1f} GiB)")
    if failures:
        raise MemoryPlanError("\n".join(failures))

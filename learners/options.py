"""The learners' settings, one home each: optimizer and devices (:class:`LearnerOptions`),
LoRA adapters, the Hugging Face trainer jobs (:class:`TrainingOptions`) and the weight sync to
the rollout engines (:class:`SyncOptions`). Nested in the job configs (flat flags and YAML keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import Problem, Rule, above, at_least, below, failing, option

TRANSPORTS = ("shm", "gloo", "nccl", "blob")
# A 16-bit engine's log-probs of a sequence differ from the learner's by up to this much with
# the same weights (kernels and rounding); measured in docs/weight-sync.md.
STALE_NOISE_16BIT = 0.1


@dataclass(frozen=True)
class LearnerOptions:
    """How the Ray Train learners of every training job (sft, rm, dpo, ppo) run and save."""

    lr: float = option(5e-5, "peak learning rate", identity=True)
    use_gpu: bool | None = option(None, "train on GPUs (NCCL) instead of CPUs (gloo); PPO's rollout engines take "
                                  "GPUs too (--tensor-parallel each); default: GPUs on a cluster with GPUs, CPUs on "
                                  "one without (workflows/runtime/devices.py)", identity=True)
    seed: int = option(0, "seed for data order, the held-out split, initialization and sampling", identity=True)
    strategy: Literal["ddp", "fsdp"] = option("ddp", "how the learners hold the trained model: whole replicas (DDP), "
                                              "or FSDP2 shards, one unit per transformer block (computing in "
                                              "--compute-dtype, reducing gradients in float32)", identity=True)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "dtype of every forward (policy, value, reference, reward model): in bfloat16 each parameter is cast "
        "for the forward, under DDP as under FSDP, while the trained weights stay float32 masters. auto: bfloat16 "
        "with --use-gpu, float32 on CPUs", identity=True)
    master_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "dtype of the weights the optimizer steps. bfloat16 is pure bf16 training, which warns: updates "
        "smaller than a weight's bf16 step are lost", identity=True)
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                          "pass instead of keeping them: about one hidden state per block and token "
                                          "stays in memory, for ~1/3 more compute")
    save_steps: int = option(50, "checkpoint every N optimizer steps")
    storage_path: str = option("", "where Ray Train keeps checkpoints (local dir or s3://...); default beside --out")
    max_failures: int = option(0, "restarts from the last checkpoint when a worker dies")
    hold_at_step: int = option(0, "fault drill (tests set it): every learner stops once, right after the checkpoint "
                               "of this step is reported, and waits to be killed; 0 = never")

    def problems(self) -> list[Problem]:
        checks = {"lr": above(0)(self.lr), "save_steps": at_least(1)(self.save_steps),
                  "max_failures": at_least(-1)(self.max_failures), "hold_at_step": at_least(0)(self.hold_at_step)}
        return failing(checks)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters (peft) instead of training every weight; 0 = full fine-tuning."""

    lora_r: int = option(0, "LoRA rank; 0 trains every weight", identity=True)
    lora_alpha: int = option(16, "LoRA scaling numerator (the update is scaled by alpha / r)", identity=True)
    lora_targets: list[str] = option(["all-linear"], "modules that get adapters: names such as q_proj v_proj, or "
                                     "all-linear (every linear layer but the output head)", identity=True)

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    def problems(self) -> list[Problem]:
        return failing({"lora_r": at_least(0)(self.lora_r), "lora_alpha": above(0)(self.lora_alpha),
                        "lora_targets": Rule("at least one module", bool)(self.lora_targets)})


@dataclass(frozen=True)
class TrainingOptions:
    """How a Hugging Face / TRL trainer job (sft, rm, dpo) runs on Ray Train."""

    workers: int = option(1, "Ray Train workers (one process each; one GPU each with --use-gpu)", identity=True)
    epochs: float = option(1.0, "passes over the training data", identity=True)
    max_steps: int = option(0, "stop after this many optimizer steps; 0 = run all epochs", identity=True)
    batch_size: int = option(4, "examples per worker per step", identity=True)
    grad_accum: int = option(1, "steps of gradient accumulation", identity=True)
    max_length: int = option(1024, "token limit per example (longer ones are truncated)", identity=True)
    eval_split: float = option(0.1, "fraction of the data held out for evaluation", identity=True)
    logging_steps: int = option(5, "log the loss every N optimizer steps")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = option("none", "experiment tracker")

    def problems(self) -> list[Problem]:
        checks = {
            "workers": at_least(1)(self.workers), "epochs": above(0)(self.epochs),
            "max_steps": at_least(0)(self.max_steps), "batch_size": at_least(1)(self.batch_size),
            "grad_accum": at_least(1)(self.grad_accum), "max_length": at_least(8)(self.max_length),
            "eval_split": (at_least(0) & below(1))(self.eval_split), "logging_steps": at_least(1)(self.logging_steps),
        }
        return failing(checks)


@dataclass(frozen=True)
class SyncOptions:
    """How learner rank 0 brings the rollout engines to each new policy (``cai train ppo``)."""

    sync_transport: Literal["auto", "shm", "gloo", "nccl", "blob"] = option(
        "auto", "how the policy reaches the engines: a broadcast group per engine over gloo (CPU) or NCCL (GPU); "
        "shm: gloo, but the engines on learner rank 0's machine read the weights from shared memory it writes "
        "once; or a safetensors blob through the object store. auto: nccl with --use-gpu, else shm. Never "
        "replaced by another when it cannot work: it fails")
    sync_bucket_mb: int = option(64, "size of the packed buckets the weights travel in (MiB; a larger tensor "
                                 "travels alone)")
    sync_load: Literal["load", "reload"] = option("load", "how an engine takes each bucket: the model's "
                                                  "load_weights, or vLLM's reload_weights over the whole policy")
    sync_timeout: float = option(120.0, "seconds a join or transfer may take before the engine counts as failed")
    sync_check_every: int = option(10, "check that an engine computes the learner's log-probs at the first sync, "
                                   "then every N versions (and always after an engine restarts)")
    sync_check_tol: float = option(0.0, "largest log-prob gap the check accepts (relative where |log-prob| > 1); "
                                   "0: 1e-4 for engines in float32, 0.5 for 16-bit engines. Beside it, an engine "
                                   "whose gap after the sync is not below half its gap before (when that was above "
                                   "the precision's noise) fails: it kept stale weights")
    sync_fail_at_version: int = option(0, "fault drill (tests set it): learner rank 0 alone fails as it prepares "
                                       "the push of weights version N, as a refused shared region or a failed "
                                       "join would; every learner must stop at once; 0 = never")

    def transport(self, use_gpu: bool) -> str:
        if self.sync_transport == "auto":
            return "nccl" if use_gpu else "shm"
        return self.sync_transport

    def tolerance(self, engine_dtype: str | None) -> float:
        if self.sync_check_tol > 0:
            return self.sync_check_tol
        return 1e-4 if engine_dtype in (None, "float32", "float64") else 0.5

    @staticmethod
    def noise(engine_dtype: str | None) -> float:
        """The log-prob gap a correctly synced engine may still show from precision alone
        (docs/weight-sync.md): below it, a sync's effect cannot be told from noise."""
        return 1e-4 if engine_dtype in (None, "float32", "float64") else STALE_NOISE_16BIT

    def problems(self) -> list[Problem]:
        return failing({"sync_bucket_mb": at_least(1)(self.sync_bucket_mb), "sync_timeout": above(0)(self.sync_timeout),
                        "sync_check_every": at_least(1)(self.sync_check_every),
                        "sync_check_tol": at_least(0)(self.sync_check_tol),
                        "sync_fail_at_version": at_least(0)(self.sync_fail_at_version)})

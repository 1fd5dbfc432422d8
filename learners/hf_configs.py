"""The configs of `cai train sft|rm|dpo`: what every Hugging Face / TRL trainer job takes
(:class:`TrainJobConfig`) and what each adds. Declared here, below the jobs, because the
learners build their trainers from them (``learners/hf_trainers.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from core.cluster_options import ClusterOptions
from core.config import REQUIRED, above, failing, option, require_valid
from learners.options import LearnerOptions, LoraOptions, TrainingOptions

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """What every `cai train sft|rm|dpo` job takes; each job's config adds its own fields."""

    kind: ClassVar[str]
    model: str = option(REQUIRED, "starting model: a local directory, a hub id, or 'default'", identity=True)
    data: list[str] = option(REQUIRED, "training data: cai generate/label run directories, Parquet/JSONL files or "
                             "saved datasets", identity=True)
    out: str = option(REQUIRED, "directory for the trained model and training_summary.json")
    trust_remote_code: bool = option(False, "allow model code from the model directory or hub", identity=True)
    training: TrainingOptions = option(TrainingOptions(), "the Hugging Face / TRL trainer")
    learner: LearnerOptions = option(LearnerOptions(), "the Ray Train learners: optimizer, devices, checkpoints")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        require_valid(self.training.problems(), self.learner.problems(), self.cluster.problems())


@dataclass(frozen=True, kw_only=True)
class SFTConfig(TrainJobConfig):
    kind: ClassVar[str] = "sft"
    lora: LoraOptions = option(LoraOptions(), "LoRA adapters instead of full fine-tuning (the saved model is merged)")
    sft_targets: Literal["all", "final"] = option("all", "on `cai generate` runs: one example per revision round "
                                                  "(§3.1 fine-tunes on every revision), or the final revision only",
                                                  identity=True)

    def __post_init__(self) -> None:
        require_valid(self.training.problems(), self.learner.problems(), self.cluster.problems(),
                      self.lora.problems())


@dataclass(frozen=True, kw_only=True)
class RMConfig(TrainJobConfig):
    kind: ClassVar[str] = "rm"


@dataclass(frozen=True, kw_only=True)
class DPOConfig(TrainJobConfig):
    kind: ClassVar[str] = "dpo"
    beta: float = option(0.1, "strength of the KL constraint to the reference model", identity=True)
    lora: LoraOptions = option(LoraOptions(), "LoRA adapters instead of full fine-tuning (the reference is the "
                               "model with its adapters off; the saved model is merged)")

    def __post_init__(self) -> None:
        require_valid(self.training.problems(), self.learner.problems(), self.cluster.problems(),
                      self.lora.problems(), failing({"beta": above(0)(self.beta)}))

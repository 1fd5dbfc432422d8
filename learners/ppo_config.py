"""The config of `cai train ppo`: one frozen dataclass, declared here, below the job, because
the learners read it (``learners/ppo_loop.py``); the job (``workflows/ppo.py``) gets it from
the command line or YAML and passes it, as itself, to every learner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actors.engine_config import EngineConfig
from core.cluster_options import ClusterOptions
from core.config import REQUIRED, ConfigError, above, at_least, at_most, failing, option, require_valid
from core.prompt_data import PROMPTS_HELP, PromptOptions
from core.sampling import SamplingConfig
from learners.options import LearnerOptions, LoraOptions, SyncOptions


@dataclass(frozen=True)
class PPOConfig:
    policy: str = option(REQUIRED, "starting policy (typically the SL-CAI SFT model): directory, hub id or 'default'", identity=True)
    prompts: str = option(REQUIRED, PROMPTS_HELP, identity=True)
    prompt_source: PromptOptions = option(PromptOptions(), "which split and column of --prompts are read")
    out: str = option(REQUIRED, "directory for the final policy, training_summary.json and metrics.jsonl")
    reward_model: str = option("", "reward model from `cai train rm` (a one-output sequence classifier)", identity=True)
    reward_fn: str = option("", "or a reward function 'package.module:function' (built in: vowel_share, brevity)", identity=True)
    value_model: str = option("", "value model: a reward model (backbone and head, so values start at its scores) "
                              "or a causal LM (backbone, zero head); default: the reward model, else the policy", identity=True)
    ref_model: str = option("", "frozen reference for the KL penalty; default: the starting policy", identity=True)
    steps: int = option(20, "PPO steps (one rollout batch and its update each)", identity=True)
    rollout_batch: int = option(16, "prompts per step, over all learners (one sampled answer each)", identity=True)
    minibatch: int = option(8, "answers per gradient step on each learner", identity=True)
    ppo_epochs: int = option(2, "passes over each rollout batch", identity=True)
    kl_coef: float = option(0.05, "β: per-token penalty on log π − log π_ref (the starting value when adaptive)", identity=True)
    target_kl: float = option(0.0, "adaptive KL controller target (Ziegler et al. 2019); 0 = fixed β", identity=True)
    kl_horizon: int = option(10000, "adaptive KL controller horizon, in samples", identity=True)
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = option("k1", "per-token KL estimator in the reward", identity=True)
    clip_range: float = option(0.2, "ε of the clipped policy loss", identity=True)
    clip_range_value: float = option(0.2, "clip range of the value loss", identity=True)
    vf_coef: float = option(0.1, "weight of the value loss", identity=True)
    gamma: float = option(1.0, "discount", identity=True)
    lam: float = option(0.95, "GAE λ", identity=True)
    lr_schedule: Literal["linear", "constant"] = option("linear", "learning rate over the run: decaying linearly to 0 "
                                                      "(TRL's PPO) or constant", identity=True)
    missing_eos_penalty: float = option(0.0, "subtract this from the score of an answer cut off at --max-new-tokens "
                                        "before its end of sequence (TRL's missing_eos_penalty); 0 = off",
                                        identity=True)
    reward_center: bool = option(False, "subtract the reward model's mean score on its training pairs "
                                 "(train_reward_mean in its training_summary.json, written by cai train rm) from "
                                 "every score, so that 0 is a typical answer", identity=True)
    max_grad_norm: float = option(1.0, "gradient clipping", identity=True)
    max_staleness: int = option(0, "rollouts overlap training: the batch of step k+1 is sampled while the learners "
                                "train on step k's, by a policy at most N versions older than the one it trains "
                                "(the engines take new weights between batches, never during one). 0: the "
                                "synchronous schedule (sample, score, train, sync)", identity=True)
    behaviour_correction: Literal["tis", "none"] = option(
        "tis", "decoupled PPO: weight each token's loss by min(π_proximal / π_behaviour, --is-cap), the learner's "
        "recomputed probability of the sampled token over the engine's (an older policy when rollouts overlap "
        "training, a bf16 engine's rounding on GPUs); none: ignore the gap", identity=True)
    is_cap: float = option(2.0, "truncation of the behaviour-correction weights (truncated importance sampling)",
                           identity=True)
    learners: int = option(1, "Ray Train workers holding policy and value models (DDP replicas or FSDP shards, "
                           "--strategy), and the frozen reference and reward models unless --frozen-on actors",
                           identity=True)
    frozen_on: Literal["learners", "actors"] = option("learners", "where the frozen reference and reward models run: "
                                                      "in every learner, or in their own Ray actors (one per "
                                                      "learner; a GPU each with --use-gpu) that the learners call",
                                                      identity=True)
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "dtype of the frozen reference and reward "
                                                                  "models; auto: bfloat16 on GPU, float32 on CPU",
                                                                  identity=True)
    lora: LoraOptions = option(LoraOptions(), "LoRA adapters on the policy instead of training every weight (the "
                               "engines get merged weights; the saved policy is merged)")
    rollout_workers: int = option(1, "vLLM rollout actors")
    kill_engine_at_step: int = option(0, "fault drill (tests set it): the last rollout engine dies under its part of "
                                      "step N's batch (Ray restarts it), once per run; 0 = never")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=64), "how rollouts are sampled: the learner's "
                                      "log-probs are log softmax(logits/T) over the whole vocabulary, so --top-p and "
                                      "--repetition-penalty stay 1")
    learner: LearnerOptions = option(LearnerOptions(lr=1e-5, save_steps=10), "the Ray Train learners: optimizer "
                                     "(one learning rate for policy and value), devices, checkpoints")
    engine: EngineConfig = option(EngineConfig(), "rollout engines")
    sync: SyncOptions = option(SyncOptions(), "how each new policy reaches the rollout engines (weight sync)")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        checks = {
            "steps": at_least(1)(self.steps), "rollout_batch": at_least(1)(self.rollout_batch),
            "minibatch": at_least(1)(self.minibatch), "ppo_epochs": at_least(1)(self.ppo_epochs),
            "temperature": above(0)(self.sampling.temperature), "kl_coef": at_least(0)(self.kl_coef),
            "missing_eos_penalty": at_least(0)(self.missing_eos_penalty), "target_kl": at_least(0)(self.target_kl),
            "kl_horizon": at_least(1)(self.kl_horizon), "clip_range": above(0)(self.clip_range),
            "clip_range_value": above(0)(self.clip_range_value), "vf_coef": at_least(0)(self.vf_coef),
            "gamma": (at_least(0) & at_most(1))(self.gamma), "lam": (at_least(0) & at_most(1))(self.lam),
            "max_grad_norm": above(0)(self.max_grad_norm), "learners": at_least(1)(self.learners),
            "rollout_workers": at_least(1)(self.rollout_workers),
            "kill_engine_at_step": at_least(0)(self.kill_engine_at_step),
            "max_staleness": at_least(0)(self.max_staleness), "is_cap": at_least(1)(self.is_cap),
        }
        require_valid(failing(checks), self.sampling.problems(), self.learner.problems(), self.engine.problems(),
                      self.cluster.problems(), self.lora.problems(), self.sync.problems())
        if self.sampling.top_p < 1 or self.sampling.repetition_penalty != 1:
            flag = "--top-p" if self.sampling.top_p < 1 else "--repetition-penalty"
            value = self.sampling.top_p if self.sampling.top_p < 1 else self.sampling.repetition_penalty
            raise ConfigError(
                f"{flag} {value}: PPO rollouts sample the whole tempered distribution. The learner's "
                "log-probs are log softmax(logits/T) over the full vocabulary, so an engine sampling a nucleus "
                "(or penalizing repeats) would train a policy other than the one that produced the rollouts "
                "(TRL forces top_p=1 too)")
        if self.sync.sync_transport == "nccl" and self.learner.use_gpu is False:  # None: decided on the cluster
            raise ConfigError("--sync-transport nccl needs --use-gpu (NCCL moves GPU tensors); on CPU use gloo "
                              "or blob")
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ConfigError("give exactly one of --reward-model and --reward-fn")
        if self.reward_center and not self.reward_model:
            raise ConfigError("--reward-center needs --reward-model: it centres a reward model's scores")
        if self.rollout_batch % self.learners:
            raise ConfigError(f"--rollout-batch {self.rollout_batch} must divide evenly over --learners {self.learners}")
        if self.minibatch > self.rollout_batch // self.learners:
            raise ConfigError(f"--minibatch {self.minibatch} is larger than each learner's share of the rollout "
                              f"batch ({self.rollout_batch // self.learners})")

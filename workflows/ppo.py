"""`cai train ppo`: RL from AI feedback with PPO (Bai et al. 2022 §4; Ouyang et al. 2022).

Reads top to bottom: config → check models, reward and prompts → render the prompts →
start the rollout actors (vLLM engines whose weights follow the policy) → the learners as a
Ray Train job (``workflows.ppo_learner``) → the final policy, ``training_summary.json`` and
``metrics.jsonl`` (one line per PPO step) in ``--out``. Rerunning the same command resumes
from the last checkpoint; ``--max-failures`` restarts the learners after one dies.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from core.config import REQUIRED, ConfigError, failing, option, require_valid
from core.prompt_data import load_prompts
from core.sampling import SamplingConfig
from workflows.ppo_learner import ppo_loop
from workflows.runtime.cluster_options import ClusterOptions
from workflows.runtime.engine_config import EngineConfig
from workflows.runtime.engine_stop import stop_engine_actors
from workflows.runtime.frozen_group import frozen_demand, start_frozen_actors
from workflows.runtime.models import resolve_model
from workflows.runtime.placement import WorkerResources, bundle_options, check_total_fits, release, reserve_workers
from workflows.runtime.ray_session import NAMESPACE
from workflows.runtime.training import (
    SUMMARY,
    LearnerOptions,
    LoraOptions,
    TrainJob,
    learner_demand,
    open_training_run,
    run_training,
)
from workflows.runtime.weight_sync import SyncOptions

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class PPOConfig:
    policy: str = option(REQUIRED, "starting policy (typically the SL-CAI SFT model): directory, hub id or 'default'", identity=True)
    prompts: str = option(REQUIRED, "prompt file: JSONL, JSON, Parquet, CSV or a saved dataset directory", identity=True)
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
    kill_engine_at_step: int = option(0, "fault drill (tests set it): as step N begins, learner rank 0 kills the "
                                      "last rollout engine (Ray restarts it) and waits until it is down, once per "
                                      "run; 0 = never")
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
            "steps": self.steps >= 1, "rollout_batch": self.rollout_batch >= 1, "minibatch": self.minibatch >= 1,
            "ppo_epochs": self.ppo_epochs >= 1, "temperature": self.sampling.temperature > 0,
            "kl_coef": self.kl_coef >= 0, "missing_eos_penalty": self.missing_eos_penalty >= 0,
            "target_kl": self.target_kl >= 0, "kl_horizon": self.kl_horizon >= 1, "clip_range": self.clip_range > 0,
            "clip_range_value": self.clip_range_value > 0, "vf_coef": self.vf_coef >= 0,
            "gamma": 0 <= self.gamma <= 1, "lam": 0 <= self.lam <= 1,
            "max_grad_norm": self.max_grad_norm > 0, "learners": self.learners >= 1,
            "rollout_workers": self.rollout_workers >= 1, "kill_engine_at_step": self.kill_engine_at_step >= 0,
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


def render_prompts(cfg: PPOConfig, policy: str, max_model_len: int) -> tuple[list[list[int]], list[list[dict]], list[dict]]:
    """Each usable prompt as chat-template token ids and as its messages (the reward model
    scores the whole conversation); rejects with reasons."""
    from transformers import AutoTokenizer

    prompt_set = load_prompts(cfg.prompts)
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=cfg.engine.trust_remote_code)
    ids, conversations, rejects = [], [], [r.to_dict() for r in prompt_set.rejects]
    for row in prompt_set.rows:
        rendered = tokenizer.apply_chat_template(list(row.messages), add_generation_prompt=True, tokenize=False)
        tokens = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if len(tokens) + cfg.sampling.max_new_tokens > max_model_len:
            rejects.append({"index": row.index, "id": row.id, "reason": f"prompt of {len(tokens)} tokens + "
                            f"max_new_tokens {cfg.sampling.max_new_tokens} exceeds the context of {max_model_len}"})
            continue
        ids.append(tokens)
        conversations.append(list(row.messages))
    if not ids:
        raise ConfigError(f"{cfg.prompts}: no usable prompts ({len(rejects)} rejected)")
    return ids, conversations, rejects


def rollout_resources(cfg: PPOConfig) -> WorkerResources:
    """One rollout engine: a CPU, and its tensor-parallel GPUs on GPU clusters (one bundle, one node)."""
    return WorkerResources(cpus=1, gpus=cfg.engine.tensor_parallel if cfg.learner.use_gpu else 0)


def start_rollout_actors(cfg: PPOConfig, policy: str, run: str, source: Any = None,
                         report=None) -> tuple[dict[str, Any], Any]:
    """Named rollout actors (``cai-ppo-<run>-rollout-<i>``) in their own placement group, and
    the group. Ray restarts an actor that dies (in its bundle). The caller keeps the handles:
    Ray ends an actor once no handle to it is left."""
    import ray

    from actors.rollout_worker import RolloutWorker

    resources = rollout_resources(cfg)
    pg = reserve_workers(cfg.rollout_workers, resources, name=f"cai-ppo-{run}-rollout",
                         timeout_s=cfg.cluster.placement_timeout, report=report)
    try:
        if source is not None:
            from workflows.runtime.model_preflight import nodes_of_placement_group, preflight_models

            preflight_models((source,), nodes_of_placement_group(pg), timeout_s=cfg.cluster.preflight_timeout)
        names = [f"cai-ppo-{run}-rollout-{i}" for i in range(cfg.rollout_workers)]
        actors = [
            ray.remote(RolloutWorker).options(name=name, namespace=NAMESPACE, max_restarts=3, max_task_retries=0,
                                              **bundle_options(pg, i, resources))
            .remote(cfg.engine.options(policy, cfg.learner.seed, source))
            for i, name in enumerate(names)
        ]
        ray.get([actor.info.remote() for actor in actors])
    except BaseException:
        release(pg)
        raise
    return dict(zip(names, actors)), pg


def run_ppo(cfg: PPOConfig) -> dict:
    from workflows.runtime.devices import joined_on_devices
    from workflows.runtime.model_preflight import prepare_model
    from workflows.runtime.ray_session import connect_ray

    policy = str(resolve_model(cfg.policy))
    reward_model = str(resolve_model(cfg.reward_model)) if cfg.reward_model else ""
    if cfg.reward_fn:
        from core.rewards import load_reward_function

        load_reward_function(cfg.reward_fn)  # fail here, not on the learners
    models = {
        "policy": (policy, cfg.policy), "reward_model": (reward_model, cfg.reward_model),
        "value_model": (str(resolve_model(cfg.value_model)), cfg.value_model) if cfg.value_model
        else (reward_model or policy, cfg.reward_model or cfg.policy),
        "ref_model": (str(resolve_model(cfg.ref_model)), cfg.ref_model) if cfg.ref_model else (policy, cfg.policy),
    }
    models = {key: pair for key, pair in models.items() if pair[0]}
    cfg = joined_on_devices(cfg)  # --use-gpu left unset: GPUs when the cluster has them
    # the learners get the config itself, its model fields resolved to folders (on each node,
    # training.local_models swaps in that node's copy)
    resolved = replace(cfg, **{key: path for key, (path, _) in models.items()})
    max_model_len = cfg.engine.max_model_len or _model_context(policy)
    prompt_ids, prompt_messages, rejects = render_prompts(cfg, policy, max_model_len)
    reward_offset = reward_model_mean(reward_model) if cfg.reward_center else 0.0
    out = Path(cfg.out).expanduser().resolve()
    done, run_id = open_training_run(out, cfg, cfg.cluster.run_name)
    if done:
        return done

    def write_outputs(staging: Path, summary: dict) -> None:
        with (staging / METRICS).open("w") as handle:
            for row in summary["history"]:
                handle.write(json.dumps(row) + "\n")
        if rejects:
            (staging / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
        summary.update(prompts=len(prompt_ids), rejected=len(rejects), reward_offset=reward_offset)

    def note(line: str) -> None:
        print(f"cai train ppo [{run_id}]: {line}", file=sys.stderr, flush=True)

    engines = rollout_resources(cfg)
    shape = " + ".join(f"{v:g} {k}" for k, v in engines.bundle().items())
    rollout_demand = {f"{cfg.rollout_workers} rollout engine(s) x {shape}":
                      {k: v * cfg.rollout_workers for k, v in engines.bundle().items()}}
    cluster = connect_ray()
    import ray  # after joining: ray reads RAY_AUTH_MODE once, when it is imported (connect_ray sets it)
    # Rollout engines and learners hold their resources at the same time: refuse what can never
    # fit before anything starts (Ray Train would otherwise retry its worker group for ever).
    frozen_actors = cfg.frozen_on == "actors"
    check_total_fits({**rollout_demand, **learner_demand(cfg.learners, cfg.learner.use_gpu),
                      **(frozen_demand(cfg, cfg.learners) if frozen_actors else {})},
                     fixed=cluster.get("local", False), what="cai train ppo", report=note)
    if frozen_actors:  # the learners then load only what they train
        models = {key: pair for key, pair in models.items() if key not in ("ref_model", "reward_model")}
    rollout, pg = start_rollout_actors(cfg, policy, run_id, prepare_model(policy, cfg.policy, cfg.cluster), note)
    frozen: dict[str, Any] = {}
    groups = [pg]
    loop_data = {"prompt_ids": prompt_ids, "prompt_messages": prompt_messages, "rollout_actors": list(rollout),
                 "reward_offset": reward_offset}
    try:
        if frozen_actors:
            frozen, frozen_pg = start_frozen_actors(resolved, run_id, cfg.learners, note)
            groups.append(frozen_pg)
            loop_data["frozen_actors"] = list(frozen)
        return run_training(TrainJob(
            kind="ppo", out=out, workers=cfg.learners, learner=cfg.learner, loop=ppo_loop, config=cfg,
            settings=resolved, loop_data=loop_data, data=[cfg.prompts], extra_outputs=write_outputs,
            cluster=cfg.cluster, models=models, run_id=run_id,
        ))
    finally:
        stop_engine_actors(rollout.values())
        for actor in frozen.values():  # torch models inside the actor's own process: nothing outlives it
            ray.kill(actor)
        for group in groups:
            release(group)


def reward_model_mean(path: str) -> float:
    """The reward model's mean score on its training pairs, as `cai train rm` recorded it
    (``train_reward_mean`` in the model folder's training_summary.json)."""
    summary = Path(path) / SUMMARY
    try:
        return float(json.loads(summary.read_text())["metrics"]["train_reward_mean"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--reward-center: {summary} holds no metrics.train_reward_mean (a reward model from "
                          "cai train rm records it); drop --reward-center for this model") from None


def _model_context(path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 2048))

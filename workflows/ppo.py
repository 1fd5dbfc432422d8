"""`cai train ppo`: RL from AI feedback with PPO (Bai et al. 2022 §4; Ouyang et al. 2022).

Reads top to bottom: config → check models, reward and prompts → render the prompts →
start the rollout actors (vLLM engines whose weights follow the policy) → the learners as a
Ray Train job (``learners/ppo_loop.py``) → the final policy, ``training_summary.json`` and
``metrics.jsonl`` (one line per PPO step) in ``--out``. Rerunning the same command resumes
from the last checkpoint; ``--max-failures`` restarts the learners after one dies.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.prompt_data import load_prompts
from core.run_identity import NAMESPACE
from learners.ppo_config import PPOConfig
from learners.ppo_loop import PPOInputs, ppo_loop
from workflows.runtime.engine_stop import stop_engine_actors
from workflows.runtime.frozen_group import frozen_demand, start_frozen_actors
from workflows.runtime.models import resolve_model
from workflows.runtime.placement import WorkerResources, bundle_options, check_total_fits, release, reserve_workers
from workflows.runtime.training import SUMMARY, TrainJob, learner_demand, open_training_run, run_training

METRICS = "metrics.jsonl"


def render_prompts(cfg: PPOConfig, policy: str, max_model_len: int) -> tuple[list[list[int]], list[list[dict]], list[dict]]:
    """Each usable prompt as chat-template token ids and as its messages (the reward model
    scores the whole conversation); rejects with reasons."""
    from transformers import AutoTokenizer

    prompt_set = load_prompts(cfg.prompts, cfg.prompt_source)
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

    from actors.engine import EngineOptions
    from actors.rollout_worker import RolloutWorker

    resources = rollout_resources(cfg)
    pg = reserve_workers(cfg.rollout_workers, resources, name=f"cai-ppo-{run}-rollout",
                         timeout_s=cfg.cluster.wait_s, report=report)
    try:
        if source is not None:
            from workflows.runtime.model_preflight import nodes_of_placement_group, preflight_models

            preflight_models((source,), nodes_of_placement_group(pg), timeout_s=cfg.cluster.preflight_timeout)
        names = [f"cai-ppo-{run}-rollout-{i}" for i in range(cfg.rollout_workers)]
        actors = [
            ray.remote(RolloutWorker).options(name=name, namespace=NAMESPACE, max_restarts=3, max_task_retries=0,
                                              **bundle_options(pg, i, resources))
            .remote(EngineOptions(policy, cfg.engine, seed=cfg.learner.seed, model_source=source))
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
    # LearnerContext.local_settings swaps in that node's copy)
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
    try:
        if frozen_actors:
            frozen, frozen_pg = start_frozen_actors(resolved, run_id, cfg.learners, note)
            groups.append(frozen_pg)
        inputs = PPOInputs(prompt_ids=prompt_ids, prompt_messages=prompt_messages, rollout_actors=list(rollout),
                           frozen_actors=list(frozen), reward_offset=reward_offset)
        return run_training(TrainJob(
            kind="ppo", out=out, workers=cfg.learners, learner=cfg.learner, loop=ppo_loop, config=cfg,
            settings=resolved, inputs=inputs, data=[cfg.prompts], extra_outputs=write_outputs,
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

"""The PPO learner: the body of each Ray Train worker of `cai train ppo`.

Per step, on every learner (rank r of L, DDP or FSDP):

1. rollouts: its share of the step's prompts goes to the vLLM rollout actors, which sample
   one response each, with the engine's log-prob of every token (the behaviour policy);
   ``learners/rollout_schedule.py`` decides when: now, or ahead while the last step trained
   (``--max-staleness``);
2. scoring: the reward (model or function) scores each answer; the learner's own policy,
   value and frozen reference models give proximal log-probs, values and reference log-probs;
3. training (``learners/ppo_update.py``): KL-shaped rewards, GAE, whitened advantages, the
   behaviour correction's weights, then ``ppo_epochs`` passes of clipped policy and value
   losses over minibatches (gradients all-reduced by DDP, or reduce-scattered by FSDP);
4. weight sync: learner rank 0 broadcasts the policy to every rollout engine in packed
   buckets (``learners/weight_sync.py``; under FSDP every learner gathers each bucket just
   before it is sent) and, at the first sync and every ``--sync-check-every`` versions,
   checks that the engine's log-probs now match the learner's. Synchronous: after training;
   overlapped: before the next batch is submitted, when that batch would otherwise be
   sampled by a policy more than ``--max-staleness`` versions old.

The reference and reward models live in the learners, beside the policy (or in their own
actors, ``--frozen-on actors``, reached through the same interface).

The loop reads as setup (:func:`setup_learner`), step (:func:`ppo_step`) and the final save
(:func:`ppo_loop`); every setting comes from the run's :class:`learners.ppo_config.PPOConfig`
itself, its model paths resolved for this node.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import ppo_math
from core.frozen_models import FrozenScorer
from core.policy_source import PolicySource
from core.ppo_policy import ActorCritic, RolloutBatch, load_actor_critic, pack_rollouts
from core.sharding import full_state
from learners.context import LearnerContext, hold_if_drilled, log_step, register_worker, report_final
from learners.hf_loop import model_saver
from learners.ppo_checkpoint import checkpoint_state, report_step, restore_model, restore_optimizer, save_checkpoint
from learners.ppo_config import PPOConfig
from learners.ppo_update import learn_from_rollouts
from learners.ranks import max_over_ranks, mean_over_ranks
from learners.rollout_client import RolloutClient
from learners.rollout_schedule import Batch, RolloutSchedule
from learners.weight_sync import Reference, WeightSync


@dataclass(frozen=True)
class PPOInputs:
    """What the PPO job hands its learners beside the config (``workflows/ppo.py`` renders it)."""

    prompt_ids: list[list[int]]  # every usable prompt, as chat-template token ids
    prompt_messages: list[list[dict]]  # the same prompts as messages (the reward model scores the conversation)
    rollout_actors: list[str]  # names of the rollout engines' actors
    frozen_actors: list[str]  # names of the frozen models' actors (--frozen-on actors), else empty
    reward_offset: float = 0.0  # subtracted from every score (--reward-center)


PPOContext = LearnerContext[PPOConfig, PPOInputs]


# -- the loop -------------------------------------------------------------------------------


@dataclass
class Learner:
    """What one learner holds for the whole run (see :func:`setup_learner`)."""

    cfg: PPOConfig  # model paths are this node's folders
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    core: ActorCritic  # the model itself (sharded in place under FSDP); ``ddp`` is its DDP wrapper (or the same)
    ddp: torch.nn.Module
    frozen: FrozenScorer  # reference log-probs and rewards: in this process, or from this learner's frozen actor
    optimizer: torch.optim.Optimizer
    kl_control: Any
    client: RolloutClient
    sync: WeightSync
    schedule: RolloutSchedule  # when each batch is sampled, and when the engines take new weights
    prompts: list[list[int]]  # token ids of every usable prompt
    reward_inputs: list[Any]  # what the reward gets per prompt: the conversation or the question
    pad_id: int
    reference: Reference  # the sequence the sync check scores: the last step's longest rollout
    reward_offset: float = 0.0  # subtracted from every score: the reward model's training mean (--reward-center)
    workers_dir: str = ""  # beside the checkpoints: the fault drill's marker


def build_frozen(cfg: PPOConfig, inputs: PPOInputs, rank: int, device: torch.device) -> FrozenScorer:
    """The reference and the reward: in this learner, or this learner's frozen actor."""
    if cfg.frozen_on == "actors":
        from learners.frozen_client import FrozenClient

        return FrozenClient(inputs.frozen_actors, rank, timeout=cfg.cluster.wait_s)
    from core.frozen_models import FrozenModels, resolve_frozen_dtype

    return FrozenModels(cfg.ref_model, cfg.reward_model, cfg.reward_fn, device=str(device),
                        dtype=resolve_frozen_dtype(cfg.frozen_dtype, cfg.learner.use_gpu),
                        trust_remote_code=cfg.engine.trust_remote_code)


def setup_learner(context: PPOContext) -> tuple[Learner, dict[str, Any]]:
    """Load the models (and the last checkpoint, after a restart or a rerun), wrap them for
    DDP or shard them (FSDP2) and connect to the rollout actors. Returns the learner and the
    run state (``step``, ``kl_coef``, ``history``)."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from core.lora import add_adapters
    from core.precision import master_dtype, resolve_compute_dtype
    from core.sharding import load_from_rank0, shard_model

    cfg, inputs = context.local_settings(), context.inputs
    trust = cfg.engine.trust_remote_code  # one switch for the engines and the learners
    register_worker(context)
    train = ray.train.get_context()
    rank, world = train.get_world_rank(), train.get_world_size()
    torch.manual_seed(cfg.learner.seed + rank)
    if not cfg.learner.use_gpu:
        # Ray sets OMP_NUM_THREADS to the worker's 1 CPU; but in the synchronous schedule rollouts
        # (engines busy) and learning (learners busy) take turns, so on CPU nodes the learners use
        # the cores this process may run on (all of them unless pinned, e.g. with taskset)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // train.get_local_world_size()))
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy, trust_remote_code=trust)
    sharded = cfg.learner.strategy == "fsdp" and world > 1
    masters = master_dtype(cfg.learner.master_dtype)

    def build(on_meta: bool) -> ActorCritic:
        built = load_actor_critic(cfg.policy, cfg.value_model, trust_remote_code=trust, on_meta=on_meta)
        if cfg.learner.gradient_checkpointing:
            for part in (built.policy, built.value_backbone):
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            with torch.device("meta") if on_meta else contextlib.nullcontext():
                built.policy = add_adapters(built.policy, cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_targets)
        return built.to(dtype=masters)

    # Under FSDP only rank 0 reads the weights (its whole copy is the only one in host memory);
    # every rank shards a model built on `meta` and receives its shards from rank 0.
    full = build(on_meta=False) if rank == 0 or not sharded else None
    frozen = build_frozen(cfg, inputs, rank, device)
    restored = restore_model(full)
    state = restored[1] if restored else {"step": 0, "kl_coef": cfg.kl_coef, "history": []}
    compute = resolve_compute_dtype(cfg.learner.compute_dtype, cfg.learner.use_gpu)
    if sharded:
        core = ddp = shard_model(build(on_meta=True), compute_dtype=compute)
        load_from_rank0(core, full, device)
        del full
    else:
        core = full.to(device)
        core.compute_dtype = compute  # every parameter cast for the forward, as FSDP's policy does
        ddp = ray.train.torch.prepare_model(core, move_to_device=False) if world > 1 else core
    trained = [p for p in core.parameters() if p.requires_grad]  # with LoRA: the adapters and the value model
    optimizer = torch.optim.AdamW(trained, lr=cfg.learner.lr, eps=1e-5)
    if restored:
        restore_optimizer(core, optimizer, restored[0])
    kl_control = (ppo_math.AdaptiveKLController(state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
                  if cfg.target_kl else ppo_math.FixedKLController(state["kl_coef"]))
    # the reward model scores the whole conversation, as `cai train rm` trained it; a reward
    # function gets the question (the last user turn), its documented contract
    messages = inputs.prompt_messages
    reward_inputs = messages if cfg.reward_model else [conversation[-1]["content"] for conversation in messages]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    wait = cfg.cluster.wait_s
    client = RolloutClient(inputs.rollout_actors, wait_timeout=wait)
    sync = WeightSync(cfg.sync, client.actors, PolicySource(core.policy, rank=rank), rank=rank, world=world,
                      use_gpu=cfg.learner.use_gpu, device=device, engine_workers=cfg.engine.tensor_parallel,
                      learner_logprobs=functools.partial(reference_logprobs, core, pad_id, device), wait_timeout=wait,
                      learner_dtype=str(compute if sharded else masters).removeprefix("torch."))
    prompts = inputs.prompt_ids
    # until the first step: some prompt's own tokens as the "response" (any tokens test the weights)
    reference = (list(prompts[0]), list(prompts[-1][:16]))
    schedule = RolloutSchedule(cfg, client, sync, prompts, rank=rank, world=world, device=device,
                               engine_version=state["step"])
    learner = Learner(cfg, rank, world, device, tokenizer, core, ddp, frozen, optimizer, kl_control, client, sync,
                      schedule, prompts, reward_inputs, pad_id, reference, inputs.reward_offset, context.workers_dir)
    return learner, state


def ppo_step(learner: Learner, state: dict[str, Any], ahead: Batch | None) -> tuple[dict[str, Any], Batch | None]:
    """One PPO step: its rollouts (``ahead``: sampled while the last step trained; else now,
    with the learner's own weights), scoring, the update, and the weight pushes the schedule
    asks for. Returns the new state (its history ending with this step's metrics, averaged over
    the learners) and the next step's batch when it was submitted ahead."""
    cfg, step, schedule = learner.cfg, state["step"], learner.schedule
    step_started = time.monotonic()
    batch, ahead, sync = schedule.begin_step(step, ahead, learner.reference, drill=lambda k: engine_drill(learner, k))
    # the learner's wait for its rollouts (and, overlapped, the push before the next batch)
    timings = {"rollout_seconds": time.monotonic() - step_started - sync.get("sync_seconds", 0.0)}

    busy = started = time.monotonic()
    rollouts = batch.results
    responses = [list(r.token_ids) for r in rollouts]
    texts = [learner.tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
    scores = [score - learner.reward_offset
              for score in learner.frozen.score([learner.reward_inputs[i] for i in batch.indices], texts)]
    if cfg.missing_eos_penalty:
        scores = ppo_math.penalize_missing_eos(scores, [r.finish_reason == "stop" for r in rollouts],
                                               cfg.missing_eos_penalty)
    timings["scoring_seconds"] = time.monotonic() - started

    started = time.monotonic()
    packed, scored, train_stats = learn_from_rollouts(
        learner.ddp, learner.core, learner.frozen, learner.optimizer, [learner.prompts[i] for i in batch.indices],
        responses, scores, cfg, learner.kl_control.value, pad_id=learner.pad_id,
        seed=cfg.learner.seed * 100003 + step, step=step, behaviour=[r.logprobs for r in rollouts])
    timings["training_seconds"] = time.monotonic() - started
    learner.reference = check_sequence(packed) or learner.reference
    timings["overlap_seconds"] = overlap_seconds(ahead, busy, time.monotonic())

    sync = {**sync, **schedule.end_step(step, learner.reference)}
    timings["sync_seconds"] = sync.pop("sync_seconds", 0.0)

    staleness = max_over_ranks(step - min(r.version for r in rollouts), learner.device)
    metrics = mean_over_ranks({
        "reward": statistics.fmean(scores),
        "reward_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "kl": (scored["kl"] * packed.mask).sum(-1).mean().item(),
        "entropy": ppo_math.masked_mean(scored["entropy"], packed.mask).item(),
        "response_length": packed.mask.sum(-1).mean().item(),
        "rollout_logprob_diff": scored["rollout_logprob_diff"],
        "rollout_sample_seconds": batch.finished - batch.submitted,  # the engines' time on this batch
        **scored["correction"], **train_stats, **timings,
    }, learner.device)
    learner.kl_control.update(metrics["kl"], cfg.rollout_batch)
    if learner.rank == 0:
        print(f"cai train ppo: step {step + 1}/{cfg.steps} reward {metrics['reward']:.4f} "
              f"kl {metrics['kl']:.4f} staleness {staleness:g} ({time.monotonic() - step_started:.1f} s)", flush=True)
    row = {"step": step + 1, "rollout_step": batch.step + 1, "staleness": staleness,
           "kl_coef": learner.kl_control.value, **metrics, **sync, **batch.catch_up,
           "rollout_actors_live": batch.live, "rollout_restarts": learner.sync.restarts,
           "step_seconds": time.monotonic() - step_started, "time": time.time()}
    return {"step": step + 1, "kl_coef": learner.kl_control.value, "history": [*state["history"], row]}, ahead


def overlap_seconds(ahead: Batch | None, busy_from: float, busy_to: float) -> float:
    """How long the batch sampled ahead ran while the learner scored and trained (0: none ahead)."""
    if ahead is None:
        return 0.0
    done = ahead.future.done() and ahead.future.exception() is None  # a failure surfaces when it is collected
    finished = ahead.future.result()[1] if done else busy_to
    return max(0.0, min(busy_to, finished) - max(busy_from, ahead.submitted))


def ppo_loop(context: PPOContext) -> None:
    """The body of each Ray Train worker: set up, step until ``steps`` (checkpointing every
    ``save_steps``), then save the final policy. With ``--max-staleness`` a batch is in flight
    across the checkpoint; a learner restarted from it samples that batch again."""
    learner, state = setup_learner(context)
    cfg, resumed_from, ahead = learner.cfg, state["step"], None
    failed = True
    try:
        while state["step"] < cfg.steps:
            state, ahead = ppo_step(learner, state, ahead)
            log_step(context, state["history"][-1])
            save = None
            if state["step"] % cfg.learner.save_steps == 0 and state["step"] < cfg.steps:
                model_state, optimizer_state = checkpoint_state(learner.core, learner.optimizer, learner.rank)
                save = lambda d, st=state: save_checkpoint(d, model_state, optimizer_state, st)  # noqa: E731
            report_step({**state["history"][-1]}, state, save)
            if save is not None:
                hold_if_drilled(context, cfg.learner, state["step"])
        failed = False
    finally:
        learner.schedule.close(wait=not failed)
    learner.sync.close()  # the groups, and the shared region's memory
    policy = learner.core.policy
    report_final(model_saver(policy, learner.tokenizer, full_state(policy, rank=learner.rank)),
                 {"global_step": state["step"], "resumed_from_step": resumed_from, "history": state["history"],
                  "final_kl_coef": state["kl_coef"], "strategy": cfg.learner.strategy})


def engine_drill(learner: Learner, step: int) -> int | None:
    """The rollout fault drill (``--kill-engine-at-step N``): on learner rank 0, as the batch of
    step N (1-based) is submitted, the last engine is told to die under its part of it (synchronous:
    while the learner waits; overlapped: while step N-1 trains). Its requests go to the other
    engines, and Ray restarts it. Once per run: a marker beside the learner records keeps a
    restarted learner from killing it again. Returns the engine's index, or None."""
    if learner.rank != 0 or learner.cfg.kill_engine_at_step != step + 1:
        return None
    marker = Path(learner.workers_dir) / "killed-engine"
    if marker.exists():
        return None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"step": step + 1, "time": time.time()}))
    print(f"cai train ppo: fault drill: rollout engine {len(learner.client.actors) - 1} dies under the batch of "
          f"step {step + 1}", flush=True)
    return len(learner.client.actors) - 1


def check_sequence(batch: RolloutBatch) -> Reference | None:
    """The longest sampled sequence of ``batch`` as (prompt ids, response ids): what the sync
    check scores on the engines and the learner. None when every response is empty."""
    row = int(batch.mask.sum(-1).argmax())
    width = batch.prompt_width
    prompt = batch.input_ids[row, :width][batch.attention_mask[row, :width].bool()].tolist()
    response = batch.response[row, :int(batch.mask[row].sum())].tolist()
    return (prompt, response) if response else None


def reference_logprobs(model: ActorCritic, pad_id: int, device: torch.device, reference: Reference) -> torch.Tensor:
    """The learner's log-probs of the reference response (at T = 1, as the engine's prompt
    log-probs are). A forward: under FSDP every learner runs it (each on its own reference)."""
    prompt, response = reference
    model.eval()
    with torch.no_grad():
        # in the master weights' dtype: the engines' copy of them is what the check compares
        return model(pack_rollouts([prompt], [response], pad_id).to(device), cast=False)[0][0, :len(response)].cpu()

"""The PPO learner: the body of each Ray Train worker of `cai train ppo`.

Per step, on every learner (rank r of L, DDP):

1. rollouts: its share of the step's prompts goes to the vLLM rollout actors, which sample
   one response each with the current policy (weights version = steps done);
2. scoring: the reward (model or function) scores each answer; the learner's own policy,
   value and frozen reference models give old log-probs, values and reference log-probs;
3. training: KL-shaped rewards, GAE, whitened advantages, then ``ppo_epochs`` passes of
   clipped policy and value losses over minibatches (gradients all-reduced by DDP);
4. weight sync: learner rank 0 broadcasts the new policy to every rollout engine in packed
   buckets (``learners.weight_sync``; under FSDP every learner gathers each bucket
   just before it is sent) and, at the first sync and every ``--sync-check-every`` versions,
   checks that the engine's log-probs now match the learner's.

The reference and reward models live in the learners, beside the policy: one process per
learner holds all four models, so scoring costs no transfers and scales with ``--learners``.
On GPU clusters with large models they would move to their own actors; the reward interface
(a callable over prompt and answer texts) already allows that.

The loop reads as setup (:func:`setup_learner`), step (:func:`ppo_step`) and the final save
(:func:`ppo_loop`); every setting comes from the run's :class:`learners.ppo_config.PPOConfig`
itself, its model paths resolved for this node. The rollout actors are reached through
:class:`learners.rollout_client.RolloutClient`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
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
from learners.rollout_client import RolloutClient
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


# -- one PPO step ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _pass_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_prompts))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_prompts(n_prompts: int, step: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """Indices of this rank's prompts at ``step``: a seeded permutation per pass over the
    prompts, ``batch`` per step in all, split evenly over ranks. Identical after a restart."""
    indices = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(k, n_prompts)
        indices.append(_pass_order(n_prompts, seed, epoch)[offset])
    share = batch // world
    return indices[rank * share:(rank + 1) * share]


def learn_from_rollouts(ddp, core: ActorCritic, frozen: FrozenScorer, optimizer, prompts: list[list[int]], responses: list[list[int]],
                        scores: list[float], cfg: PPOConfig, kl_coef: float, *, pad_id: int, seed: int,
                        step: int = 0):
    """Score one rollout batch and update on it: the learner step after sampling. Every tensor
    goes to the device the models are on (``core``'s parameters); the inputs arrive as lists.
    Returns the batch, the scored tensors and the update's stats."""
    device = next(core.parameters()).device
    batch = pack_rollouts(prompts, responses, pad_id).to(device)
    scored = score_rollouts(core, frozen, batch, torch.tensor(scores, device=device), cfg, kl_coef)
    return batch, scored, ppo_update(ddp, optimizer, batch, scored, cfg, seed=seed, step=step)


def score_rollouts(model: ActorCritic, frozen: FrozenScorer, batch: RolloutBatch, scores: torch.Tensor, cfg: PPOConfig,
                   kl_coef: float):
    """Old log-probs, values, KL-shaped rewards and whitened GAE advantages for one batch."""
    model.eval()
    with torch.no_grad():
        old_logprobs, entropy, values = model(batch, cfg.sampling.temperature)
    ref_logprobs = frozen.ref_logprobs(batch, cfg.sampling.temperature).to(old_logprobs.device)
    rewards, kl = ppo_math.shaped_rewards(scores, old_logprobs, ref_logprobs, batch.mask, kl_coef,
                                          kind=cfg.kl_estimator)
    values = values * batch.mask
    advantages, returns = ppo_math.gae_advantages(rewards, values, batch.mask, cfg.gamma, cfg.lam)
    advantages = ppo_math.masked_whiten(advantages, batch.mask, all_ranks_sum=all_ranks_sum)
    return {"old_logprobs": old_logprobs, "values": values, "advantages": advantages, "returns": returns,
            "kl": kl, "entropy": entropy}


def updates_per_step(rows: int, cfg: PPOConfig) -> int:
    """Optimizer steps one PPO step takes on a learner with ``rows`` rollouts."""
    return cfg.ppo_epochs * -(-rows // cfg.minibatch)


def ppo_update(model, optimizer, batch: RolloutBatch, scored: dict[str, torch.Tensor], cfg: PPOConfig, seed: int,
               step: int = 0):
    """``ppo_epochs`` passes of clipped policy + value loss over shuffled minibatches. The
    learning rate follows ``cfg.lr_schedule`` over every update of the run: a function of
    the step, so a restarted run picks it up where it was."""
    model.train()  # dropout is off in every model (ppo_policy.disable_dropout): train mode changes nothing else
    n = batch.input_ids.shape[0]
    per_step = updates_per_step(n, cfg)
    update = step * per_step
    generator = torch.Generator().manual_seed(seed)
    stats: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(batch.input_ids.device)
        for start in range(0, n, cfg.minibatch):
            for group in optimizer.param_groups:
                group["lr"] = ppo_math.learning_rate(cfg.lr_schedule, cfg.learner.lr, update, cfg.steps * per_step)
            update += 1
            rows = order[start:start + cfg.minibatch]
            mb = batch.select(rows)
            logprobs, _, values = model(mb, cfg.sampling.temperature)
            pg_loss, pg_stats = ppo_math.policy_loss(logprobs, scored["old_logprobs"][rows],
                                                     scored["advantages"][rows], mb.mask, cfg.clip_range)
            vf_loss, vf_stats = ppo_math.value_loss(values, scored["values"][rows], scored["returns"][rows],
                                                    mb.mask, cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            for key, value in {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), **pg_stats,
                               **vf_stats}.items():
                stats.setdefault(key, []).append(float(value))
    return {**{key: sum(values) / len(values) for key, values in stats.items()},
            "lr": optimizer.param_groups[0]["lr"]}


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over the learners (on ``device``: NCCL reduces GPU tensors only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every learner (a collective; the tensor itself on one learner)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    prompts: list[list[int]]  # token ids of every usable prompt
    reward_inputs: list[Any]  # what the reward gets per prompt: the conversation or the question
    pad_id: int
    reference: Reference  # the sequence the sync check scores: the last step's longest rollout
    reward_offset: float = 0.0  # subtracted from every score: the reward model's training mean (--reward-center)


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
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.learner.seed + rank)
    if not cfg.learner.use_gpu:
        # Ray sets OMP_NUM_THREADS to the worker's 1 CPU; but rollouts (engines busy) and
        # learning (learners busy) take turns, so on CPU nodes the learners use the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
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
    learner = Learner(cfg, rank, world, device, tokenizer, core, ddp, frozen, optimizer, kl_control, client, sync,
                      prompts, reward_inputs, pad_id, reference, inputs.reward_offset)
    return learner, state


def ppo_step(learner: Learner, state: dict[str, Any]) -> dict[str, Any]:
    """One PPO step: rollouts, scoring, the update, the weight sync. Returns the new state,
    its history ending with this step's metrics (averaged over the learners)."""
    cfg, step, timings = learner.cfg, state["step"], {}
    step_started = started = time.monotonic()
    mine = step_prompts(len(learner.prompts), step, cfg.rollout_batch, learner.rank, learner.world, cfg.learner.seed)
    # one seed per (step, position in the step's batch): a rerun with --seed samples the same answers
    seeds = [cfg.learner.seed * 1_000_003 + step * cfg.rollout_batch + learner.rank * len(mine) + k
             for k in range(len(mine))]
    rollouts, catch_up = sample_rollouts(learner, [learner.prompts[i] for i in mine], step, seeds)
    timings["rollout_seconds"] = time.monotonic() - started

    started = time.monotonic()
    responses = [list(r.token_ids) for r in rollouts]
    texts = [learner.tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
    scores = [score - learner.reward_offset
              for score in learner.frozen.score([learner.reward_inputs[i] for i in mine], texts)]
    if cfg.missing_eos_penalty:
        scores = ppo_math.penalize_missing_eos(scores, [r.finish_reason == "stop" for r in rollouts],
                                               cfg.missing_eos_penalty)
    timings["scoring_seconds"] = time.monotonic() - started

    started = time.monotonic()
    batch, scored, train_stats = learn_from_rollouts(
        learner.ddp, learner.core, learner.frozen, learner.optimizer, [learner.prompts[i] for i in mine], responses,
        scores, cfg, learner.kl_control.value, pad_id=learner.pad_id, seed=cfg.learner.seed * 100003 + step, step=step)
    timings["training_seconds"] = time.monotonic() - started

    started = time.monotonic()
    learner.reference = check_sequence(batch) or learner.reference
    sync = learner.sync.sync(step + 1, learner.reference)  # every learner: FSDP gathers each bucket together
    barrier()
    timings["sync_seconds"] = time.monotonic() - started

    metrics = mean_over_ranks({
        "reward": statistics.fmean(scores),
        "reward_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "kl": (scored["kl"] * batch.mask).sum(-1).mean().item(),
        "entropy": ppo_math.masked_mean(scored["entropy"], batch.mask).item(),
        "response_length": batch.mask.sum(-1).mean().item(),
        "rollout_logprob_diff": behaviour_logprob_diff(scored["old_logprobs"], batch.mask, rollouts),
        **train_stats, **timings,
    }, learner.device)
    learner.kl_control.update(metrics["kl"], cfg.rollout_batch)
    if learner.rank == 0:
        print(f"cai train ppo: step {step + 1}/{cfg.steps} reward {metrics['reward']:.4f} "
              f"kl {metrics['kl']:.4f} ({sum(timings.values()):.1f} s)", flush=True)
    row = {"step": step + 1, "kl_coef": learner.kl_control.value, **metrics, **sync, **catch_up,
           "rollout_actors_live": learner.client.live_in_step, "rollout_restarts": learner.sync.restarts,
           "step_seconds": time.monotonic() - step_started, "time": time.time()}
    return {"step": step + 1, "kl_coef": learner.kl_control.value, "history": [*state["history"], row]}


def ppo_loop(context: PPOContext) -> None:
    """The body of each Ray Train worker: set up, step until ``steps`` (checkpointing every
    ``save_steps``), then save the final policy."""
    learner, state = setup_learner(context)
    cfg, resumed_from = learner.cfg, state["step"]
    while state["step"] < cfg.steps:
        if learner.rank == 0 and cfg.kill_engine_at_step == state["step"] + 1:
            kill_engine_drill(context, learner.client, state["step"] + 1)
        state = ppo_step(learner, state)
        log_step(context, state["history"][-1])
        save = None
        if state["step"] % cfg.learner.save_steps == 0 and state["step"] < cfg.steps:
            model_state, optimizer_state = checkpoint_state(learner.core, learner.optimizer, learner.rank)
            save = lambda d, st=state: save_checkpoint(d, model_state, optimizer_state, st)  # noqa: E731
        report_step({**state["history"][-1]}, state, save)
        if save is not None:
            hold_if_drilled(context, cfg.learner, state["step"])
    learner.sync.close()  # the groups, and the shared region's memory
    policy = learner.core.policy
    report_final(model_saver(policy, learner.tokenizer, full_state(policy, rank=learner.rank)),
                 {"global_step": state["step"], "resumed_from_step": resumed_from, "history": state["history"],
                  "final_kl_coef": state["kl_coef"], "strategy": cfg.learner.strategy})


def kill_engine_drill(context: LearnerContext, client: RolloutClient, step: int) -> None:
    """The rollout fault drill (``--kill-engine-at-step``): kill the last rollout engine as
    ``step`` begins and return once it is down (Ray restarts it, which takes far longer than a
    rollout ping), so the step meets a lost engine at a known point. Once per run: a marker
    beside the learner records keeps a restarted learner from killing it again."""
    import ray

    marker = Path(context.workers_dir) / "killed-engine"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"step": step, "time": time.time()}))
    engine = client.actors[-1]
    ray.kill(engine, no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:  # answered by the old process until the kill lands; then it fails, or waits for the restart
            ray.get(engine.weights_version.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            print(f"cai train ppo: fault drill: killed rollout engine {len(client.actors) - 1} before step {step}",
                  flush=True)
            return
        time.sleep(0.1)
    raise RuntimeError("fault drill: the killed rollout engine kept answering for 120 s")


def behaviour_logprob_diff(learner: torch.Tensor, mask: torch.Tensor, rollouts: list[Any]) -> float:
    """Largest gap between the learner's log-probs of the sampled tokens (at the sampling
    temperature, before the update) and the engine's own from sampling them. Near 0 when the
    engine held the learner's weights and both applied the same temperature; PPO's ratio
    assumes exactly that."""
    engine = torch.zeros_like(learner, device="cpu")
    for row, rollout in enumerate(rollouts):
        engine[row, :len(rollout.logprobs)] = torch.tensor(rollout.logprobs, dtype=engine.dtype)
    gap = (learner.detach().cpu() - engine).abs() * mask.cpu()
    return float(gap.max()) if gap.numel() else 0.0


def sample_rollouts(learner: Learner, prompts: list[list[int]], version: int,
                    seeds: list[int]) -> tuple[list[Any], dict[str, Any]]:
    """This learner's rollouts with weights ``version``. When no engine holds it (all restarted,
    or a resumed run), the learners sync the engines together and go on: a collective round
    on every learner until every learner has all its rollouts. Returns the rollouts and the
    catch-up sync's metrics (prefixed ``catchup_``)."""
    learner.client.live_in_step = len(learner.client.actors)
    results: list[Any] = [None] * len(prompts)
    catch_up: dict[str, Any] = {}
    for _ in range(2 * len(learner.client.actors) + 4):
        learner.client.generate(prompts, version, learner.cfg.sampling, seeds, results)
        if not any_rank(any(r is None for r in results), learner.device):
            return results, catch_up
        started = time.monotonic()
        synced = learner.sync.sync(version, learner.reference, only_if_stale=True)
        catch_up = {"catchup_sync_seconds": catch_up.get("catchup_sync_seconds", 0.0) + time.monotonic() - started,
                    **{f"catchup_{k}": v for k, v in synced.items() if k in ("sync_logprob_diff", "sync_engines")}}
    raise RuntimeError("rollouts kept failing: the rollout engines died or restarted repeatedly")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every learner when ``flag`` is true on any (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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

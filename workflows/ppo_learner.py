"""The PPO learner: the body of each Ray Train worker of `cai train ppo`.

Per step, on every learner (rank r of L, DDP):

1. rollouts: its share of the step's prompts goes to the vLLM rollout actors, which sample
   one response each with the current policy (weights version = steps done);
2. scoring: the reward (model or function) scores each answer; the learner's own policy,
   value and frozen reference models give old log-probs, values and reference log-probs;
3. training: KL-shaped rewards, GAE, whitened advantages, then ``ppo_epochs`` passes of
   clipped policy and value losses over minibatches (gradients all-reduced by DDP);
4. weight sync: rank 0 pushes the new policy to every rollout engine (a safetensors blob
   through vLLM's weight-loading path, no files) and checks that the engine's log-probs
   now match the learner's.

The reference and reward models live in the learners, beside the policy: one process per
learner holds all four models, so scoring costs no transfers and scales with ``--learners``.
On GPU clusters with large models they would move to their own actors; the reward interface
(a callable over prompt and answer texts) already allows that.
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workflows import ppo_math
from workflows.ppo_policy import (
    ActorCritic,
    RolloutBatch,
    load_actor_critic,
    load_value_state,
    pack_rollouts,
    sequence_logprobs,
    value_state,
    weights_blob,
)
from workflows.ray_session import NAMESPACE
from workflows.training import hold_if_drilled, local_models, register_worker, report_final

PPO_STATE = "ppo_state.json"


# -- rollouts through the vLLM actors -------------------------------------------------------


class RolloutClient:
    """Sends a learner's prompts to the rollout actors and keeps their weights current.

    Each step pings every actor: one that does not answer within ``ping_timeout`` (dead, or
    restarting after a crash) sits the step out; one that answers with an old weights
    version gets the current weights first. A request that fails because its actor died is
    sent again to another actor, so a crash costs time, not rows.
    """

    def __init__(self, names: list[str], policy_blob, *, wait_timeout: float | None, ping_timeout: float = 2.0):
        import ray

        self.actors = [ray.get_actor(name, namespace=NAMESPACE) for name in names]
        self.policy_blob = policy_blob  # () -> safetensors bytes of the current policy
        self.ping_timeout, self.wait_timeout = ping_timeout, wait_timeout
        self.restarts_seen = 0  # actors found restarted (back with old weights)
        self.live_in_step = len(self.actors)  # fewest actors that answered during the last generate

    def ready_actors(self, version: int, *, after_update: bool = False) -> list[Any]:
        """The actors that answer now, each holding weights ``version`` (pushed if not)."""
        import ray

        pings = {actor.weights_version.remote(): actor for actor in self.actors}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=self.ping_timeout)
        if not ready:  # all down: wait for the first one back (a restart may wait for a node)
            ready, _ = ray.wait(list(pings), num_returns=1, timeout=self.wait_timeout)
        live, stale = [], []
        for ref in ready:
            try:
                held = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue
            if held == version:
                live.append(pings[ref])
            else:
                stale.append(pings[ref])
                # after an update every engine is one version behind; further behind: restarted
                self.restarts_seen += held < version - 1 or not after_update
        if stale:
            self.push(stale, version)
        live += stale
        if not live:
            raise RuntimeError(f"no rollout actor answered within --placement-timeout ({self.wait_timeout} s)")
        return live

    def push(self, actors: list[Any], version: int) -> float:
        """Load the current policy into ``actors``; returns seconds."""
        import ray

        started = time.monotonic()
        blob = ray.put(self.policy_blob())
        for ref in [actor.load_weights.remote(blob, version) for actor in actors]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # died meanwhile: it gets the weights when it is back
        return time.monotonic() - started

    def generate(self, prompts: list[list[int]], version: int, sampling: dict[str, Any]) -> list[Any]:
        import ray

        from actors.rollout_worker import StaleWeightsError

        results: list[Any] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        self.live_in_step = len(self.actors)
        for _ in range(len(self.actors) + 2):
            actors = self.ready_actors(version)
            self.live_in_step = min(self.live_in_step, len(actors))
            chunks = [todo[i::len(actors)] for i in range(len(actors))]
            calls = {
                actor.generate.remote([prompts[i] for i in chunk], version=version, **sampling): chunk
                for actor, chunk in zip(actors, chunks) if chunk
            }
            todo = []
            for ref, chunk in calls.items():
                try:
                    for i, rollout in zip(chunk, ray.get(ref)):
                        results[i] = rollout
                except (ray.exceptions.RayActorError, StaleWeightsError):
                    todo += chunk  # died (or restarted) under the request: another actor takes it
            if not todo:
                return results
        raise RuntimeError("rollouts kept failing: every rollout actor died repeatedly")


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


def learn_from_rollouts(ddp, core: ActorCritic, ref, optimizer, prompts: list[list[int]], responses: list[list[int]],
                        scores: list[float], s: dict[str, Any], kl_coef: float, *, pad_id: int, seed: int,
                        step: int = 0):
    """Score one rollout batch and update on it: the learner step after sampling. Every tensor
    goes to the device the models are on (``core``'s parameters); the inputs arrive as lists.
    Returns the batch, the scored tensors and the update's stats."""
    device = next(core.parameters()).device
    batch = pack_rollouts(prompts, responses, pad_id).to(device)
    scored = score_rollouts(core, ref, batch, torch.tensor(scores, device=device), s, kl_coef)
    return batch, scored, ppo_update(ddp, optimizer, batch, scored, s, seed=seed, step=step)


def score_rollouts(model: ActorCritic, ref, batch: RolloutBatch, scores: torch.Tensor, s: dict[str, Any], kl_coef: float):
    """Old log-probs, values, KL-shaped rewards and whitened GAE advantages for one batch."""
    model.eval()
    with torch.no_grad():
        old_logprobs, entropy, values = model(batch, s["temperature"])
    ref_logprobs = sequence_logprobs(ref, batch, s["temperature"])
    rewards, kl = ppo_math.shaped_rewards(scores, old_logprobs, ref_logprobs, batch.mask, kl_coef,
                                          kind=s["kl_estimator"])
    values = values * batch.mask
    advantages, returns = ppo_math.gae_advantages(rewards, values, batch.mask, s["gamma"], s["lam"])
    advantages = ppo_math.masked_whiten(advantages, batch.mask)
    return {"old_logprobs": old_logprobs, "values": values, "advantages": advantages, "returns": returns,
            "kl": kl, "entropy": entropy}


def updates_per_step(rows: int, s: dict[str, Any]) -> int:
    """Optimizer steps one PPO step takes on a learner with ``rows`` rollouts."""
    return s["ppo_epochs"] * -(-rows // s["minibatch"])


def ppo_update(model, optimizer, batch: RolloutBatch, scored: dict[str, torch.Tensor], s: dict[str, Any], seed: int,
               step: int = 0):
    """``ppo_epochs`` passes of clipped policy + value loss over shuffled minibatches. The
    learning rate follows ``s["lr_schedule"]`` over every update of the run: a function of
    the step, so a restarted run picks it up where it was."""
    model.train()  # dropout is off in every model (ppo_policy.disable_dropout): train mode changes nothing else
    n = batch.input_ids.shape[0]
    per_step = updates_per_step(n, s)
    update = step * per_step
    generator = torch.Generator().manual_seed(seed)
    stats: dict[str, list[float]] = {}
    for _ in range(s["ppo_epochs"]):
        order = torch.randperm(n, generator=generator).to(batch.input_ids.device)
        for start in range(0, n, s["minibatch"]):
            for group in optimizer.param_groups:
                group["lr"] = ppo_math.learning_rate(s["lr_schedule"], s["lr"], update, s["steps"] * per_step)
            update += 1
            rows = order[start:start + s["minibatch"]]
            mb = batch.select(rows)
            logprobs, _, values = model(mb, s["temperature"])
            pg_loss, pg_stats = ppo_math.policy_loss(logprobs, scored["old_logprobs"][rows],
                                                     scored["advantages"][rows], mb.mask, s["clip_range"])
            vf_loss, vf_stats = ppo_math.value_loss(values, scored["values"][rows], scored["returns"][rows],
                                                    mb.mask, s["clip_range_value"])
            loss = pg_loss + s["vf_coef"] * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: ActorCritic, tokenizer, optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    model.policy.save_pretrained(directory / "policy", safe_serialization=True)
    tokenizer.save_pretrained(directory / "policy")
    save_file(value_state(model), str(directory / "value.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / PPO_STATE).write_text(json.dumps(state))


def restore_checkpoint(model: ActorCritic, optimizer) -> dict[str, Any] | None:
    """Load the latest checkpoint Ray Train hands back (after a restart or a rerun)."""
    import ray.train
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = Path(checkpoint.to_directory())
    print(f"cai train ppo: resuming from {checkpoint.path}", flush=True)
    policy = AutoModelForCausalLM.from_pretrained(local / "policy", dtype=torch.float32)
    model.policy.load_state_dict(policy.state_dict())
    load_value_state(model, load_file(str(local / "value.safetensors")))
    # our own file, written by save_checkpoint; weights_only refuses anything but tensors and containers
    optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=True))
    return json.loads((local / PPO_STATE).read_text())


def report_step(metrics: dict[str, Any], state: dict[str, Any], save) -> None:
    """Every rank reports; rank 0 attaches a checkpoint when ``save`` is given."""
    import ray.train
    from ray.train import Checkpoint

    if save is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics=metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics=metrics, checkpoint=Checkpoint.from_directory(tmp))


# -- the loop -------------------------------------------------------------------------------


def ppo_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workflows.rewards import RewardModelScorer, checked_scores, load_reward_function

    s = local_models(config["settings"], config.get("model_sources", {}))
    register_worker(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(s["seed"] + rank)
    if not s["use_gpu"]:
        # Ray sets OMP_NUM_THREADS to the worker's 1 CPU; but rollouts (engines busy) and
        # learning (learners busy) take turns, so on CPU nodes the learners use the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(s["policy"], trust_remote_code=s["trust_remote_code"])
    model = load_actor_critic(s["policy"], s["value_model"], trust_remote_code=s["trust_remote_code"])
    ref = AutoModelForCausalLM.from_pretrained(s["ref_model"], dtype=torch.float32,
                                               trust_remote_code=s["trust_remote_code"]).to(device).eval()
    if s["reward_model"]:
        reward = RewardModelScorer(s["reward_model"], device=str(device), trust_remote_code=s["trust_remote_code"])
    else:
        reward = load_reward_function(s["reward_fn"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], eps=1e-5)
    state = restore_checkpoint(model, optimizer) or {"step": 0, "kl_coef": s["kl_coef"], "history": []}
    resumed_from = state["step"]
    model = model.to(device)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    core: ActorCritic = ddp.module if world > 1 else ddp
    kl_control = (ppo_math.AdaptiveKLController(state["kl_coef"], s["target_kl"], s["kl_horizon"])
                  if s["target_kl"] else ppo_math.FixedKLController(state["kl_coef"]))

    prompts: list[list[int]] = config["prompt_ids"]
    # the reward model scores the whole conversation, as `cai train rm` trained it; a reward
    # function gets the question (the last user turn), its documented contract
    messages: list[list[dict]] = config["prompt_messages"]
    reward_inputs = messages if s["reward_model"] else [conversation[-1]["content"] for conversation in messages]
    client = RolloutClient(config["rollout_actors"], lambda: weights_blob(core.policy),
                           wait_timeout=s["cluster"]["placement_timeout"] or None)
    sampling = {"max_new_tokens": s["max_new_tokens"], "temperature": s["temperature"], "top_p": s["top_p"]}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    while state["step"] < s["steps"]:
        step, timings = state["step"], {}
        started = time.monotonic()
        mine = step_prompts(len(prompts), step, s["rollout_batch"], rank, world, s["seed"])
        rollouts = client.generate([prompts[i] for i in mine], step, sampling)
        timings["rollout_seconds"] = time.monotonic() - started

        started = time.monotonic()
        responses = [list(r.token_ids) for r in rollouts]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        scores = checked_scores(reward([reward_inputs[i] for i in mine], texts), len(texts),
                                s["reward_model"] or s["reward_fn"])
        if s["missing_eos_penalty"]:
            scores = ppo_math.penalize_missing_eos(scores, [r.finish_reason == "stop" for r in rollouts],
                                                   s["penalty_reward_value"])
        timings["scoring_seconds"] = time.monotonic() - started

        started = time.monotonic()
        batch, scored, train_stats = learn_from_rollouts(
            ddp, core, ref, optimizer, [prompts[i] for i in mine], responses, scores, s, kl_control.value,
            pad_id=pad_id, seed=s["seed"] * 100003 + step, step=step)
        timings["training_seconds"] = time.monotonic() - started

        started = time.monotonic()
        sync = sync_rollout_engines(client, core, batch, step + 1) if rank == 0 else {}
        barrier()
        timings["sync_seconds"] = time.monotonic() - started

        sequence_kl = (scored["kl"] * batch.mask).sum(-1).mean().item()
        metrics = mean_over_ranks({
            "reward": statistics.fmean(scores),
            "reward_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "kl": sequence_kl,
            "entropy": ppo_math.masked_mean(scored["entropy"], batch.mask).item(),
            "response_length": batch.mask.sum(-1).mean().item(),
            "rollout_logprob_diff": behaviour_logprob_diff(scored["old_logprobs"], batch.mask, rollouts),
            **train_stats, **timings,
        }, device)
        kl_control.update(metrics["kl"], s["rollout_batch"])
        state = {"step": step + 1, "kl_coef": kl_control.value,
                 "history": [*state["history"], {"step": step + 1, "kl_coef": kl_control.value, **metrics, **sync,
                                                 "rollout_actors_live": client.live_in_step,
                                                 "rollout_restarts": client.restarts_seen}]}
        if rank == 0:
            print(f"cai train ppo: step {step + 1}/{s['steps']} reward {metrics['reward']:.4f} "
                  f"kl {metrics['kl']:.4f} ({sum(timings.values()):.1f} s)", flush=True)
        last = state["step"] == s["steps"]
        save = (lambda d, st=state: save_checkpoint(d, core, tokenizer, optimizer, st)) \
            if state["step"] % s["save_steps"] == 0 and not last else None
        report_step({**state["history"][-1]}, state, save)
        if save is not None:
            hold_if_drilled(config, state["step"])

    def save_final(target: str) -> None:
        core.policy.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)

    report_final(save_final, {"global_step": state["step"], "resumed_from_step": resumed_from,
                              "history": state["history"], "final_kl_coef": state["kl_coef"]})


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


def sync_rollout_engines(client: RolloutClient, model: ActorCritic, batch: RolloutBatch, version: int) -> dict:
    """Push the new policy to every live engine and measure how exact the sync is: the
    engine's log-probs of one sampled sequence against the learner's, before and after."""
    import ray

    row = int(batch.mask.sum(-1).argmax())
    width = batch.prompt_width
    prompt = batch.input_ids[row, :width][batch.attention_mask[row, :width].bool()].tolist()
    length = int(batch.mask[row].sum())
    response = batch.response[row, :length].tolist()
    model.eval()
    with torch.no_grad():  # the engine's prompt log-probs are at T = 1: so is this check
        learner = model(batch.select(torch.tensor([row])))[0][0, :length].cpu()
    before = None
    try:  # the engine still holds the previous policy
        before = ray.get(client.actors[0].sequence_logprobs.remote(prompt, response), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    actors = client.ready_actors(version, after_update=True)  # every live engine is one version behind
    after = ray.get(actors[0].sequence_logprobs.remote(prompt, response))
    diff = lambda engine: float((torch.tensor(engine) - learner).abs().max()) if engine is not None else None
    return {"presync_logprob_diff": diff(before), "sync_logprob_diff": diff(after)}

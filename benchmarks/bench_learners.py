"""Memory and step time of the PPO learner's update under DDP and FSDP2, side by side.

    .venv/bin/python benchmarks/bench_learners.py --model default --steps 2

Two learner processes over gloo (torch.multiprocessing, no Ray, no vLLM) per strategy, one
strategy after the other in the same invocation. Each learner holds what a `cai train ppo`
learner holds: the ActorCritic (``core.ppo_policy.load_actor_critic``: policy and value
model, both trained, AdamW) and a frozen reference (``core.frozen_models.FrozenModels``:
the policy loaded again). Per step it scores a synthetic rollout batch of its own
(``score_rollouts``: old log-probs, values, reference log-probs, GAE) and updates on it
(``ppo_update``, one PPO epoch). DDP wraps the model as Ray Train's ``prepare_model`` does;
FSDP shards it with ``core.sharding.shard_model``, one unit per decoder layer.

Measured per learner: seconds per update and per scoring (median over ``--steps`` after
``--warmup`` steps, between barriers, so the slower rank sets the time), the bytes of
parameters, gradients and optimizer state it holds (local shards under FSDP), its RSS once
set up, at the end, at the end after ``malloc_trim`` (glibc keeps freed activation and
all-gather buffers: RSS minus that retention) and its peak (``ru_maxrss``). glibc's tunables
reach the learners through the environment, e.g. ``MALLOC_MMAP_THRESHOLD_=4194304`` in front
of the command (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = 2
MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    """Resident memory of this process now (``ru_maxrss`` only gives the peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int | None:
    """RSS once glibc has handed its free heap memory back to the system (``malloc_trim``):
    what the process still uses, without the freed activation and all-gather buffers that the
    allocator keeps. None where the C library is not glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_bytes()


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` held by this rank: a DTensor's local shard, else the tensor."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def synthetic_rollouts(rank: int, rows: int, prompt: int, response: int, vocab: int, pad_id: int):
    """``rows`` random prompts and responses of fixed length (every step does the same work),
    different on each rank and the same for every strategy; random scores in [0, 1)."""
    import torch

    from core.ppo_policy import pack_rollouts

    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (rows, prompt + response), generator=generator).tolist()
    batch = pack_rollouts([r[:prompt] for r in ids], [r[prompt:] for r in ids], pad_id)
    return batch, torch.rand(rows, generator=generator)


def run_learner(rank: int, strategy: str, port: int, options: dict, out: str) -> None:
    """One learner: set up as ``setup_learner`` does, then score and update ``steps`` times."""
    entered = time.monotonic()
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from core.config import load_config
    from core.frozen_models import FrozenModels
    from core.ppo_policy import load_actor_critic
    from core.sharding import shard_bytes, shard_model
    from learners.ppo_config import PPOConfig
    from learners.ppo_update import ppo_update, score_rollouts

    torch.set_num_threads(options["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(minutes=10))
    policy, steps = options["policy"], options["warmup"] + options["steps"]
    cfg = load_config(PPOConfig, overrides=dict(
        policy=policy, prompts="p.jsonl", out="o", reward_fn="vowel_share", rollout_batch=options["rows"] * WORLD,
        minibatch=options["minibatch"], ppo_epochs=1, steps=steps, learners=WORLD))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(0)
    model = load_actor_critic(policy, policy)
    frozen = FrozenModels(policy, reward_fn="vowel_share")  # the reference: the policy, loaded again
    if strategy == "fsdp":
        core = trained = shard_model(model)
    else:
        core, trained = model, torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg.learner.lr, eps=1e-5)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch, scores = synthetic_rollouts(rank, options["rows"], options["prompt_tokens"], options["response_tokens"],
                                       len(tokenizer), pad_id)
    rss_setup, setup_seconds = rss_bytes(), time.monotonic() - entered

    scoring, update = [], []
    for step in range(steps):
        dist.barrier()
        started = time.perf_counter()
        scored = score_rollouts(core, frozen, batch, scores, cfg, cfg.kl_coef)
        dist.barrier()
        scored_at = time.perf_counter()
        ppo_update(trained, optimizer, batch, scored, cfg, seed=step, step=step)
        dist.barrier()
        scoring.append(scored_at - started)
        update.append(time.perf_counter() - scored_at)
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    result = {
        "rank": rank, "setup_seconds": setup_seconds, "scoring_seconds": scoring, "update_seconds": update,
        "parameter_bytes": shard_bytes(core),
        "gradient_bytes": local_bytes(p.grad for p in core.parameters() if p.grad is not None),
        "optimizer_bytes": local_bytes(optimizer_tensors),
        "rss_after_setup_bytes": rss_setup, "rss_end_bytes": rss_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }
    result["rss_trimmed_bytes"] = trimmed_rss_bytes()  # last: it changes what the process holds
    (Path(out) / f"{strategy}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def summary(strategy: str, ranks: list[dict], warmup: int) -> dict:
    """The median step over the measured steps (ranks agree: barriers); per-learner sizes as
    the larger of the two ranks."""
    largest = lambda key: None if None in (r[key] for r in ranks) else max(r[key] for r in ranks)  # noqa: E731
    return {
        "strategy": strategy,
        "update_seconds": statistics.median(ranks[0]["update_seconds"][warmup:]),
        "scoring_seconds": statistics.median(ranks[0]["scoring_seconds"][warmup:]),
        "first_update_seconds": ranks[0]["update_seconds"][0],
        **{key: largest(key) for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes",
                                          "rss_after_setup_bytes", "rss_end_bytes", "rss_trimmed_bytes",
                                          "peak_rss_bytes")},
        "ranks": ranks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model directory, hub id or 'default'")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per strategy (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the medians")
    parser.add_argument("--rows", type=int, default=8, help="rollouts per learner per step")
    parser.add_argument("--minibatch", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // WORLD),
                        help="torch threads per learner")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from workflows.runtime.models import resolve_model

    options = {"policy": resolve_model(args.model), "steps": args.steps, "warmup": args.warmup, "rows": args.rows,
               "minibatch": args.minibatch, "prompt_tokens": args.prompt_tokens,
               "response_tokens": args.response_tokens, "threads": args.threads}
    results = []
    with tempfile.TemporaryDirectory() as out:
        for strategy in args.strategies:
            started = time.monotonic()
            mp.spawn(run_learner, args=(strategy, free_port(), options, out), nprocs=WORLD, join=True)
            ranks = [json.loads((Path(out) / f"{strategy}-{rank}.json").read_text()) for rank in range(WORLD)]
            results.append({**summary(strategy, ranks, args.warmup), "wall_seconds": time.monotonic() - started})

    print(f"\nmodel {args.model}, {WORLD} learners over gloo, {args.threads} thread(s) each; per learner and step "
          f"{args.rows} rows of {args.prompt_tokens} + {args.response_tokens} tokens, minibatch {args.minibatch}, "
          f"1 PPO epoch; medians of {args.steps} steps after {args.warmup} warm-up\n")
    print("| strategy | update s | scoring s | parameters MB | gradients MB | optimizer MB | RSS after setup MB "
          "| RSS at end MB | RSS at end, trimmed MB | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['strategy']} | {r['update_seconds']:.2f} | {r['scoring_seconds']:.2f} | "
              f"{r['parameter_bytes'] / MB:.0f} | {r['gradient_bytes'] / MB:.0f} | {r['optimizer_bytes'] / MB:.0f} | "
              f"{r['rss_after_setup_bytes'] / MB:.0f} | {r['rss_end_bytes'] / MB:.0f} | "
              f"{(r['rss_trimmed_bytes'] or 0) / MB:.0f} | {r['peak_rss_bytes'] / MB:.0f} |")
    if len(results) == 2:
        base, other = results
        print(f"\n{other['strategy']}/{base['strategy']}: " + ", ".join(
            f"{key.removesuffix('_bytes').removesuffix('_seconds')} {other[key] / base[key]:.2f}"
            for key in ("update_seconds", "scoring_seconds", "parameter_bytes", "gradient_bytes", "optimizer_bytes",
                        "rss_after_setup_bytes", "rss_end_bytes", "rss_trimmed_bytes", "peak_rss_bytes")
            if base[key] and other[key]))
    print(json.dumps({"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

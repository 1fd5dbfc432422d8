"""Peak host memory of each FSDP learner while it loads its model, two ways, side by side.

    .venv/bin/python benchmarks/bench_learner_load.py --model default              # PPO learners
    .venv/bin/python benchmarks/bench_learner_load.py --model default --job sft    # cai train sft

Two learner processes over gloo (torch.multiprocessing; no Ray, no vLLM) per way, one way after
the other in the same invocation, each in fresh processes:

* ``every-rank`` (before #25): every rank reads the whole ActorCritic (policy and value model,
  float32) into host memory, then shards it (``core.sharding.shard_model``);
* ``rank-0`` (``learners/ppo_loop.py`` now): rank 0 alone reads it; every rank shards an
  ActorCritic built on ``meta`` and receives its shards from rank 0
  (``core.sharding.load_from_rank0``).

With ``--job sft``, each process builds the `cai train sft` trainer as a Ray Train worker does
(``learners.hf_trainers.build_sft``, FSDP, on a few rows of chat data) and trains until the trainer
has prepared the model (its ``on_train_begin``, before the first step):

* ``every-rank`` (before #25): every rank reads the whole model (``from_pretrained``), and
  accelerate shards it in place (``cpu_ram_efficient_loading`` off);
* ``rank-0`` (``learners/hf_sharding.py`` now): rank 0 alone reads it; the others build it on
  storage that is never written (``learners/hf_sharding.py`` ``skeleton``) and accelerate sends them their shards from
  rank 0.

Measured per rank: the RSS once the libraries are imported, just before the load (``start``),
the peak resident memory (``ru_maxrss``) from process start to the end of the load, the RSS at
the end, and the parameter bytes it then holds. The ratios are given for the peak and for the
peak above the start (what the load itself adds: the imports are the same both ways and
dominate a model as small as the default one).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_learners import MB, WORLD, free_port, rss_bytes  # noqa: E402


def learner(rank: int, way: str, model: str, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from core.ppo_policy import load_actor_critic
    from core.sharding import load_from_rank0, shard_bytes, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=300))
    import transformers  # noqa: F401  (in the start figure, as in a learner)

    start = rss_bytes()
    try:
        if way == "every-rank":
            sharded = shard_model(load_actor_critic(model, model))
        else:
            full = load_actor_critic(model, model) if rank == 0 else None
            sharded = shard_model(load_actor_critic(model, model, on_meta=True))
            load_from_rank0(sharded, full, torch.device("cpu"))
            del full
        dist.barrier()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(out, f"{way}-{rank}.json").write_text(json.dumps(
            {"start_mb": start / MB, "peak_mb": peak / MB, "rss_mb": rss_bytes() / MB,
             "params_mb": shard_bytes(sharded) / MB}))
    finally:
        dist.destroy_process_group()


class _Prepared(Exception):
    """Raised once the trainer has prepared the model: the load is over, no step is taken."""


def sft_learner(rank: int, way: str, model: str, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    from core.config import load_config
    from core.sharding import shard_bytes
    from learners import hf_sharding
    from learners.hf_configs import SFTConfig
    from learners.hf_trainers import build_sft

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    if way == "every-rank":  # the trainers' load before #25
        hf_sharding.reads_weights = lambda learner: True
        hf_sharding.FSDP_CONFIG["cpu_ram_efficient_loading"] = False
    data = Path(out, "sft.jsonl")
    if rank == 0 and not data.exists():
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                         {"role": "assistant", "content": f"{i}."}]}) + "\n"
                                for i in range(8)))
    dist.barrier()
    import trl  # noqa: F401  (in the start figure, as in a learner)

    start = rss_bytes()
    cfg = load_config(SFTConfig, overrides=dict(model=model, data=[str(data)], out=str(Path(out, way)),
                                                      workers=WORLD, batch_size=1, max_steps=1, eval_split=0.0,
                                                      strategy="fsdp"))
    trainer, _, _ = build_sft(cfg, str(Path(out, way, f"rank{rank}")))

    class Loaded(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            dist.barrier()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            Path(out, f"{way}-{rank}.json").write_text(json.dumps(
                {"start_mb": start / MB, "peak_mb": peak / MB, "rss_mb": rss_bytes() / MB,
                 "params_mb": shard_bytes(kwargs["model"]) / MB}))
            raise _Prepared

    trainer.add_callback(Loaded())
    try:
        trainer.train()
    except _Prepared:
        pass
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' (the embedded model)")
    parser.add_argument("--job", choices=("ppo", "sft"), default="ppo",
                        help="the PPO learners' models, or the `cai train sft` trainer's")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from workflows.runtime.models import resolve_model

    model = str(resolve_model(args.model))
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for way in ("every-rank", "rank-0"):
            mp.spawn(learner if args.job == "ppo" else sft_learner, args=(way, model, free_port(), out),
                     nprocs=WORLD, join=True)
            results[way] = [json.loads(Path(out, f"{way}-{rank}.json").read_text()) for rank in range(WORLD)]
    print(f"model: {model}, job: {args.job}")
    print("| way | rank | RSS at start (MiB) | peak RSS during load (MiB) | RSS after (MiB) | parameters held (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for way, ranks in results.items():
        for rank, seen in enumerate(ranks):
            print(f"| {way} | {rank} | {seen['start_mb']:.0f} | {seen['peak_mb']:.0f} | {seen['rss_mb']:.0f} "
                  f"| {seen['params_mb']:.0f} |")
    for rank in range(WORLD):
        new, old = results["rank-0"][rank], results["every-rank"][rank]
        print(f"rank {rank}: peak rank-0 / every-rank = {new['peak_mb'] / old['peak_mb']:.2f}; peak above start "
              f"{(new['peak_mb'] - new['start_mb']) / (old['peak_mb'] - old['start_mb']):.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

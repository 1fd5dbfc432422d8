"""Peak host memory of each FSDP learner while it loads the PPO models, two ways, side by side.

    .venv/bin/python benchmarks/bench_learner_load.py --model default

Two learner processes over gloo (torch.multiprocessing; no Ray, no vLLM) per way, one way after
the other in the same invocation, each in fresh processes:

* ``every-rank`` (before #25): every rank reads the whole ActorCritic (policy and value model,
  float32) into host memory, then shards it (``core.sharding.shard_model``);
* ``rank-0`` (``workflows/ppo_learner.py`` now): rank 0 alone reads it; every rank shards an
  ActorCritic built on ``meta`` and receives its shards from rank 0
  (``core.sharding.load_from_rank0``).

Measured per rank: the peak resident memory (``ru_maxrss``) from process start to the end of
the load, the RSS at the end, and the parameter bytes it then holds. The import of torch and
transformers is in every figure alike.
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
            {"peak_mb": peak / MB, "rss_mb": rss_bytes() / MB, "params_mb": shard_bytes(sharded) / MB}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' (the embedded model)")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from workflows.runtime.models import resolve_model

    model = str(resolve_model(args.model))
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for way in ("every-rank", "rank-0"):
            mp.spawn(learner, args=(way, model, free_port(), out), nprocs=WORLD, join=True)
            results[way] = [json.loads(Path(out, f"{way}-{rank}.json").read_text()) for rank in range(WORLD)]
    print(f"model: {model}")
    print("| way | rank | peak RSS during load (MiB) | RSS after (MiB) | parameters held (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for way, ranks in results.items():
        for rank, seen in enumerate(ranks):
            print(f"| {way} | {rank} | {seen['peak_mb']:.0f} | {seen['rss_mb']:.0f} | {seen['params_mb']:.0f} |")
    for rank in range(WORLD):
        ratio = results["rank-0"][rank]["peak_mb"] / results["every-rank"][rank]["peak_mb"]
        print(f"rank {rank}: peak rank-0 / every-rank = {ratio:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

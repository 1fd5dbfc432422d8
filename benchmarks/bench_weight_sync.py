"""Seconds per weight sync (#16): the policy pushed from this process (a learner, rank 0 of 1)
to 1 and to 2 vLLM-CPU rollout engines, per transport and engine load mode, side by side.

    .venv/bin/python benchmarks/bench_weight_sync.py --model default --rounds 10 --bucket-mb 64 16

Both engines start once; each round pushes a perturbed policy with every setting in turn
(gloo to 1 and to 2 engines per bucket size, shm to 1 and to 2 engines, 2 engines gloo with
``reload_weights``, 2 engines blob),
so slow spells of a noisy machine hit every setting alike. Reports the median of each
setting's pushes and the ratio 2 engines / 1 engine. Not timed: the exactness check (it runs
in the first, uncounted round) and forming the groups (an engine is in one group at a time, so
settings that share engines form theirs again each round; ``sync_join_s`` is subtracted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLIT = ("sync_gather_s", "sync_pack_s", "sync_transfer_s", "sync_load_s", "sync_push_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 16],
                        help="bucket sizes to compare (the first one also for reload and blob)")
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.engine import EngineOptions
    from actors.engine_config import EngineConfig
    from actors.rollout_worker import RolloutWorker
    from core.policy_source import PolicySource
    from workflows.runtime.models import resolve_model
    from workflows.runtime.ray_session import connect_ray
    from learners.options import SyncOptions
    from learners.weight_sync import WeightSync

    policy = str(resolve_model(args.model))
    connect_ray(num_cpus=4, include_dashboard=False)
    options = EngineOptions(model=policy, config=EngineConfig(max_model_len=2048))
    engines = [ray.remote(num_cpus=1)(RolloutWorker).remote(options) for _ in range(2)]
    ray.get([e.info.remote() for e in engines])
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    reference = ([1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16])

    def learner_logprobs(ref):
        prompt, response = ref
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], -1)
        return torch.stack([logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(response)])

    first = args.bucket_mb[0]
    settings = {}
    for mb in args.bucket_mb:
        settings[f"gloo, 1 engine, {mb} MiB"] = (engines[:1], "gloo", "load", mb)
        settings[f"gloo, 2 engines, {mb} MiB"] = (engines, "gloo", "load", mb)
    settings[f"shm, 1 engine, {first} MiB"] = (engines[:1], "shm", "load", first)
    settings[f"shm, 2 engines, {first} MiB"] = (engines, "shm", "load", first)
    settings[f"gloo reload_weights, 2 engines, {first} MiB"] = (engines, "gloo", "reload", first)
    settings["blob, 2 engines"] = (engines, "blob", "load", first)
    syncs = {name: WeightSync(SyncOptions(sync_transport=transport, sync_load=load, sync_bucket_mb=mb,
                                          sync_check_every=10**9), actors, PolicySource(model), rank=0, world=1,
                              use_gpu=False, device=torch.device("cpu"), learner_logprobs=learner_logprobs,
                              wait_timeout=300)
             for name, (actors, transport, load, mb) in settings.items()}
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    version = 0
    for round_no in range(args.rounds + 1):  # round 0: joins and first checks, not counted
        for name, sync in syncs.items():
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            version += 1
            row = sync.sync(version, reference)
            row["sync_push_s"] -= row["sync_join_s"]
            if round_no:
                rows[name].append(row)
            else:
                print(f"{name}: first sync {row['sync_push_s'] + row['sync_check_s']:.2f} s with the check, "
                      f"exact to {row['sync_logprob_diff']:.1e}", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in got) for k in SPLIT} for name, got in rows.items()}
    size = rows["blob, 2 engines"][0]["sync_bytes"] or rows[f"gloo, 1 engine, {first} MiB"][0]["sync_bytes"]
    print(f"\nmodel {args.model} ({size / 2**20:.0f} MiB per engine), median of {args.rounds} pushes per setting\n")
    print("| setting | gather s | pack s | transfer s | engine load s | push s (no join) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in medians.items():
        print(f"| {name} | {' | '.join(f'{m[k]:.3f}' for k in SPLIT)} |")
    ratios = {f"{transport} {mb} MiB": medians[f"{transport}, 2 engines, {mb} MiB"]["sync_push_s"]
              / medians[f"{transport}, 1 engine, {mb} MiB"]["sync_push_s"]
              for transport, mb in [*(("gloo", mb) for mb in args.bucket_mb), ("shm", first)]}
    print("\n" + ", ".join(f"{name}: 2 engines / 1 engine {r:.2f}x" for name, r in ratios.items()))
    print(json.dumps({"medians": medians, "ratio_2_to_1": ratios}))
    for sync in syncs.values():
        sync.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""An elastic `cai generate --workers 0` run that gains two nodes mid-run: rows/s and the
number of live engines, before and after the nodes join.

    .venv/bin/python benchmarks/bench_elastic.py --model default

A ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs and one 1-CPU worker node,
so the pool starts with one engine. Once ``--join-after`` shards are done, two more 1-CPU nodes
join; the pool adds an engine for each (``workflows/runtime/placement.py`` ``PoolPlacements``).
Nothing holds the run (no drill): the figures are the run's own. Reported, from the run's
manifest and summary: the live engines over time (``workers_timeline``), and rows/s in three
windows measured on the shards' finish times: before the join, while the new engines start,
and once all three are up. On a 2-core machine three engines share two cores, so the third
window shows what one more core-sharing engine adds, not linear scaling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

SMALL_STORE = 80 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--join-after", type=int, default=6, help="shards done before the two nodes join")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from core.config import load_config
    from workflows.generate import GenerateConfig, run_generate
    from workflows.runtime.models import resolve_model
    from workflows.runtime.ray_session import connect_ray

    work = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: how do I stay safe online?"}) + "\n"
                               for i in range(args.prompts)))
    out = work / "run"
    config = load_config(GenerateConfig, overrides=dict(
        model=resolve_model(args.model), constitution="harmless", prompts=str(prompts), out=str(out), workers=0,
        revisions=1, max_new_tokens=args.max_new_tokens, ignore_eos=True, shard_size=args.shard_size,
        enforce_eager=True, max_model_len=1024))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": SMALL_STORE})
    cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
    connect_ray(address=cluster.address)
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(summary=run_generate(config)), daemon=True)
    try:
        driver.start()
        while len(list((out / "rejects").glob("shard-*.jsonl"))) < args.join_after and driver.is_alive():
            time.sleep(0.2)
        joined_wall = time.time()
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
        driver.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = outcome["summary"]
    manifest = json.loads((out / "manifest.json").read_text())
    finished = sorted((s["finished_at"], s["rows"]) for s in manifest["shards"].values())
    began, timeline = summary["pool_started_at"], summary["workers_timeline"]
    joined = joined_wall - began  # on the timeline's clock
    all_up = next((t for t, up in timeline if up >= 3), None)
    windows = {"1 engine, before the join": (next(t for t, up in timeline if up >= 1), joined)}
    if all_up is not None:
        windows["new engines starting"] = (joined, all_up)
        windows["3 engines up"] = (all_up, finished[-1][0] - began)
    rates = {}
    for name, (begin, end) in windows.items():
        rows = sum(r for t, r in finished if begin < t - began <= end)
        rates[name] = {"from_s": round(begin, 1), "to_s": round(end, 1), "rows": rows,
                       "rows_per_s": round(rows / (end - begin), 3) if end > begin else None}
    report = {"workers_timeline": timeline, "workers_peak": summary["workers_peak"], "nodes_joined_at_s": round(joined, 1),
              "windows": rates, "rows_out": summary["rows_out"], "wall_seconds": summary["wall_seconds"]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

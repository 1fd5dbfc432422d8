"""`cai generate --workers 0` on a multi-node Ray cluster that gains nodes mid-run; writes JSON.

``test_elastic.py`` runs this in a subprocess (``cluster_scenario.py``). The head has no CPUs,
so every engine runs on a worker node:

1. one 1-CPU worker node: the elastic pool starts with the one engine it fits;
2. after the first shard, the fault drill ``--hold-until-workers 3`` stops the pool handing out
   shards until 3 workers are up (so the growth is seen whatever the engines' speed), and two
   more 1-CPU nodes join: the pool adds a worker for each, and the rest of the run uses all 3.

Usage: python elastic_scenario.py RESULT.json WORK_DIR MODEL_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from tests.workflows.runtime.cluster_scenario import done_shards, finish_scenario, generate_config
from workflows.generate import run_generate
from workflows.runtime.ray_session import connect_ray

SMALL_STORE = 80 * 1024 * 1024
PROMPTS = 24  # 12 shards of 2


def main(result_path: str, work: str, model: str) -> None:
    work_dir = Path(work)
    out = work_dir / "run"
    config = generate_config(model, work_dir, PROMPTS, workers=0, max_new_tokens=16, placement_timeout=120,
                             hold_until_workers=3)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": SMALL_STORE})
    cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
    connect_ray(address=cluster.address)
    result: dict = {}
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_generate(config)
        except Exception as exc:  # noqa: BLE001 - reported in the results
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    try:
        driver = threading.Thread(target=run, daemon=True)
        driver.start()
        deadline = time.monotonic() + 300
        while done_shards(out) < 1 and driver.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError("no shard finished on the first node")
            time.sleep(0.2)
        result["shards_before_join"] = done_shards(out)
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
        driver.join(timeout=300)
        if driver.is_alive():
            raise TimeoutError("the run did not finish within 300 s of the nodes joining")
        if "error" in outcome:
            raise RuntimeError(outcome["error"])
        summary = outcome["summary"]
        import pyarrow.parquet as pq

        rows = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p, columns=["index"]).to_pylist()]
        manifest = json.loads((out / "manifest.json").read_text())
        result.update(
            summary={k: summary[k] for k in ("rows_in", "rows_out", "rejected", "workers_peak", "workers_timeline")},
            manifest_summary={k: manifest["summary"].get(k) for k in ("workers_peak", "workers_timeline")},
            indexes=sorted(r["index"] for r in rows), prompts=PROMPTS,
            shard_workers=sorted({s["worker"].split()[0] for s in manifest["shards"].values()}),
        )
    finally:
        finish_scenario(result_path, result, cluster)


if __name__ == "__main__":
    main(*sys.argv[1:4])

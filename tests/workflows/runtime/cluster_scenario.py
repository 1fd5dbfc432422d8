"""Run a multi-node scenario script (``*_scenario.py``) in its own process and read its results.

One process joins one Ray cluster, and pytest's own process may hold the session's
``ray_local``; so each ``ray.cluster_utils.Cluster`` scenario runs as a script. It gets a short
private ``RAY_TMPDIR`` (unix socket paths must stay under ~107 characters, and no other
``ray.init()`` on the machine may find its cluster's address file) and is called as
``python SCRIPT RESULT.json WORK_DIR [ARGS...]``; it writes its results as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def run_scenario(script: Path, *args: str, timeout: float) -> tuple[dict, subprocess.CompletedProcess]:
    """(the script's JSON results, the finished process); fails the test with its output."""
    ray_tmp = tempfile.mkdtemp(prefix="rays")
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # The GCS declares a node dead after RAY_health_check_failure_threshold failed checks
        # every RAY_health_check_period_ms (Ray 2.60 reads its system config from RAY_<name>;
        # defaults 5 x 3000 ms): a removed raylet is noticed in ~3 s instead of ~15 s, twice
        # per node-loss scenario. A live raylet still has the default 10 s to answer each check.
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        result_path, work = Path(ray_tmp) / "result.json", Path(ray_tmp) / "work"
        work.mkdir()
        done = subprocess.run([sys.executable, str(script), str(result_path), str(work), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        assert done.returncode == 0 and result, (
            f"{script.name} failed (rc {done.returncode}), got {result}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
        return result, done
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def generate_config(model: str, work_dir: Path, prompts: int, **values):
    """A `cai generate` config for a scenario: ``prompts`` prompts written to WORK_DIR, out in
    WORK_DIR/run, shards of 2, one revision, fixed-length answers; ``values`` add to it."""
    from core.config import load_config
    from workflows.generate import GenerateConfig

    path = work_dir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: how do I stay safe?"}) + "\n"
                            for i in range(prompts)))
    return load_config(GenerateConfig, overrides=dict(
        model=model, constitution="harmless", prompts=str(path), out=str(work_dir / "run"), revisions=1,
        ignore_eos=True, shard_size=2, enforce_eager=True, max_model_len=1024) | values)


def done_shards(out: Path) -> int:
    """Shards a run has finished (each writes its rejects file last)."""
    return len(list((out / "rejects").glob("shard-*.jsonl")))


def finish_scenario(result_path: str, result: dict, cluster) -> None:
    """A scenario's last step, whatever happened: write what it found, leave Ray, and end the
    cluster it started (in a ``finally``)."""
    import ray

    Path(result_path).write_text(json.dumps(result, indent=1))
    ray.shutdown()
    cluster.shutdown()

"""Engine start-up and throughput on CPU: vLLM's process layouts side by side.

    .venv/bin/python benchmarks/bench_engine_process.py --model default --prompts 64 --max-new-tokens 64 --repeats 2

vLLM-CPU runs an ``AsyncLLM`` as three processes: the caller, the EngineCore (scheduler)
and, because the CPU platform switches the executor to ``mp`` whenever
``VLLM_ENABLE_V1_MULTIPROCESSING`` is on (its default), a separate model worker. Each of them
imports torch and vLLM. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the executor stays ``uni``:
the model runs inside the EngineCore process, as it does on GPUs at tensor parallel 1.

Each trial is a fresh process hosting :class:`actors.engine.VLLMEngineHost` (the class our
actors use): it reports the engine's start-up seconds, then the tokens/s of ``--prompts``
concurrent greedy requests of exactly ``--max-new-tokens`` tokens (EOS ignored, so both
layouts do the same work). Layouts alternate which goes first in each repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"mp": "1", "uni": "0"}  # the value of VLLM_ENABLE_V1_MULTIPROCESSING


def trial(args: argparse.Namespace) -> dict:
    from actors.engine import EngineOptions, VLLMEngineHost
    from actors.engine_config import EngineConfig
    from actors.engine_config import EngineConfig
    from workflows.runtime.models import resolve_model
    from core.prompt_data import load_prompts
    from core.sampling import greedy

    base = [row.prompt for row in load_prompts(ROOT / "data" / "demo_prompts.jsonl").rows]
    prompts = [[{"role": "user", "content": f"{base[i % len(base)]} (case {i})"}] for i in range(args.prompts)]
    host = VLLMEngineHost(EngineOptions(model=resolve_model(args.model),
                                        config=EngineConfig(max_model_len=1024, enforce_eager=args.enforce_eager)))

    async def generate() -> int:
        outs = await asyncio.gather(*(host.complete(p, greedy(args.max_new_tokens), ignore_eos=True) for p in prompts))
        return sum(len(c.token_ids) for (c,) in outs)

    started = time.monotonic()
    tokens = asyncio.run(generate())
    seconds = time.monotonic() - started
    host.shutdown()
    return {"startup_seconds": round(host.startup_seconds, 1), "tokens": tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--trial", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        Path(args.result).write_text(json.dumps(trial(args)))
        os._exit(0)

    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    order = list(LAYOUTS)
    for repeat in range(args.repeats):
        for layout in order if repeat % 2 == 0 else order[::-1]:
            result = Path(tempfile.mkdtemp()) / "trial.json"
            argv = [sys.executable, __file__, "--trial", layout, "--result", str(result), "--model", args.model,
                    "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens)]
            argv += ["--enforce-eager"] if args.enforce_eager else []
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": LAYOUTS[layout],
                   "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
            # output to a file, not a pipe: engine processes that outlive the trial would hold a pipe open
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            row = json.loads(result.read_text())
            results[layout].append(row)
            print(json.dumps({"repeat": repeat, "layout": layout, **row}), flush=True)
    print("\n| layout | start-up s (median) | tokens/s (median) |\n|---|---:|---:|")
    for layout, rows in results.items():
        print(f"| {layout} | {statistics.median(r['startup_seconds'] for r in rows):.1f} | "
              f"{statistics.median(r['tokens_per_s'] for r in rows):.1f} |")
    mp, uni = (statistics.median(r["tokens_per_s"] for r in results[k]) for k in ("mp", "uni"))
    print(f"\nuni/mp tokens/s = {uni / mp:.2f}")


if __name__ == "__main__":
    main()

"""`cai analyze` on a synthetic label run: rows/s, wall time and peak RSS.

Produces the results with::

    .venv/bin/python benchmarks/bench_analyze.py --rows 1000000

1. data (not timed): a label run folder of ``--rows`` pairs with every column of
   ``workflows.label.OUTPUT_SCHEMA`` (short texts; 3 of the harmless constitution's feedback
   principles per pair, both orders, soft labels drawn per principle with a position bias),
   written in shards of ``--shard-rows`` like `cai label` writes them, plus manifest and rejects;
2. the analysis: ``cai analyze RUN --out DIR`` in a fresh child process (``python -m
   workflows.cli``), so the peak RSS is the command's own (``RUSAGE_CHILDREN``).

Exits 1 when the analysis takes longer than ``--limit-seconds`` (120) or its peak RSS
exceeds ``--limit-rss-mb`` (2048).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from constitutions.loader import load_constitution  # noqa: E402
from core.shards import write_jsonl  # noqa: E402
from workflows.label import OUTPUT_SCHEMA  # noqa: E402


def _lists(values: np.ndarray, width: int, type_: pa.DataType) -> pa.Array:
    """Rows of ``width`` consecutive values as a list array."""
    offsets = pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=type_))


def synthetic_shard(rng: np.random.Generator, start: int, n: int, ids: list[str], per_row: int,
                    sha: str) -> pa.Table:
    """``n`` label rows: each principle has its own lean and noise, and the judge a pull toward (A)."""
    lean = np.linspace(-0.3, 0.3, len(ids))
    picks = np.argsort(rng.random((n, len(ids))), axis=1)[:, :per_row]  # distinct principles per pair
    quality = rng.normal(0, 1, n)[:, None]
    first = 1 / (1 + np.exp(-(quality + lean[picks] + rng.normal(0, 0.7, picks.shape))))  # P(first better)
    bias = 0.08
    a_first = np.clip(first + bias, 0.001, 0.999)  # first answer shown as (A)
    a_second = np.clip(1 - first + bias, 0.001, 0.999)  # second answer shown as (A)
    probs = (a_first + (1 - a_second)) / 2
    prob_a = probs.mean(axis=1)
    index = np.arange(start, start + n)
    texts = pa.array([f"An answer of about this length, number {i}." for i in range(n)])
    chosen = pa.array([[{"role": "assistant", "content": f"chosen {i}"}] for i in range(n)],
                      OUTPUT_SCHEMA.field("chosen").type)
    scorings = per_row * 2
    columns = {
        "index": index, "id": [f"p{i}/0-1" for i in index], "prompt_id": [f"p{i}" for i in index],
        "prompt": pa.array([[{"role": "user", "content": f"Question {i}?"}] for i in index],
                           OUTPUT_SCHEMA.field("prompt").type),
        "chosen": chosen, "rejected": chosen, "chosen_prob": np.maximum(prob_a, 1 - prob_a),
        "response_a": texts, "response_b": texts,
        "sample_indices": _lists(np.tile([0, 1], n), 2, pa.int64()), "prob_a": prob_a,
        "principle_ids": _lists(np.asarray(ids)[picks].ravel(), per_row, pa.string()),
        "principle_probs": _lists(probs.ravel(), per_row, pa.float64()),
        "order_prob_a": _lists(np.stack([a_first, a_second], axis=2).ravel(), scorings, pa.float64()),
        "order_fallbacks": _lists(rng.random(n * scorings) < 0.01, scorings, pa.bool_()),
        "reasoning": _lists(np.full(n * scorings, ""), scorings, pa.string()),
        "identical": rng.random(n) < 0.02, "cot": np.zeros(n, bool),
        "scoring_fallbacks": np.zeros(n, np.int64), "policy_model": pa.array(["sft"] * n),
        "feedback_model": pa.array(["default"] * n), "constitution_sha256": pa.array([sha] * n),
        "seed": np.zeros(n, np.int64), "generated_tokens": rng.integers(40, 200, n),
    }
    orders = _lists(np.tile([0, 1, 1, 0], n * per_row), 2, pa.int64())  # each principle: (0, 1) then (1, 0)
    columns["option_orders"] = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(orders) + 1, scorings, dtype=np.int32)), orders)
    return pa.table({name: columns[name] for name in OUTPUT_SCHEMA.names}).cast(OUTPUT_SCHEMA)


def write_run(folder: Path, rows: int, shard_rows: int, per_row: int, seed: int = 0) -> Path:
    constitution = load_constitution("harmless")
    ids = [p.id for p in constitution.feedback]
    rng = np.random.default_rng(seed)
    shards = 0
    for shards, start in enumerate(range(0, rows, shard_rows)):
        table = synthetic_shard(rng, start, min(shard_rows, rows - start), ids, per_row, constitution.sha256)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "data" / f"shard-{shards:05d}.parquet")
        write_jsonl(folder / "rejects" / f"shard-{shards:05d}.jsonl", [])
    write_jsonl(folder / "rejects" / "input.jsonl", [{"index": rows, "id": "empty", "reason": "empty prompt"}])
    manifest = {"stage": "label", "identity": {"constitution_sha256": constitution.sha256},
                "config": {"constitution": "harmless"}, "input": {"total_rows": rows + 1, "shards": shards + 1},
                "summary": {"rows_in": rows + 1, "rows_out": rows, "rejected": 1, "tokens": 0}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=4096,
                        help="rows per data shard (cai label writes one row per pair of --shard-size prompts)")
    parser.add_argument("--principles", type=int, default=3, help="feedback principles per pair")
    parser.add_argument("--limit-seconds", type=float, default=120.0)
    parser.add_argument("--limit-rss-mb", type=float, default=2048.0)
    parser.add_argument("--keep", default="", help="keep the run and the report in this folder")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    try:
        started = time.monotonic()
        run = write_run(root / "label-run", args.rows, args.shard_rows, args.principles)
        data_mb = sum(f.stat().st_size for f in (run / "data").glob("*.parquet")) / 2**20
        print(f"data: {args.rows} rows, {data_mb:.0f} MB of Parquet in {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "workflows.cli", "analyze", str(run), "--out",
                                 str(root / "analysis")], cwd=ROOT, capture_output=True, text=True)
        wall = time.monotonic() - started
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        summary = json.loads(result.stdout)
        report = {"rows": args.rows, "principles_per_row": args.principles, "data_mb": round(data_mb),
                  "wall_seconds": round(wall, 1), "analysis_seconds": summary["seconds"],
                  "stream_seconds": summary["stream_seconds"],
                  "rows_per_second": round(args.rows / wall), "stream_rows_per_second": summary["rows_per_second"],
                  "peak_rss_mb": round(rss_mb), "figures": len(summary["figures"])}
        print(json.dumps(report, indent=2))
        return 0 if wall <= args.limit_seconds and rss_mb <= args.limit_rss_mb else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

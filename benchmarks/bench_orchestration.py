"""Orchestration at scale: the driver's own cost for 10k, 100k and 1M prompts, no model.

Produces the results with::

    .venv/bin/python benchmarks/bench_orchestration.py --sizes 10000 100000 1000000 --shard-size 512

Each size runs in a fresh child process (so its peak RSS is its own) that walks the driver
path of ``workflows/runtime/stage_runner.py`` (``run_stage``, which ``cai generate`` uses), with a
fake engine in place of the Ray actors:

1. data: a synthetic prompts JSONL of N rows (not counted);
2. planning: fingerprint the prompt file, ``stage_inputs``, one ``ShardState`` per shard,
   ``manifest.save()``, ``completed_shards``;
3. shards: ``ShardQueue.take``, ``read_shard_inputs``, the fake engine (rows shaped like
   ``OUTPUT_SCHEMA``), ``write_shard_output``, the state update and ``manifest.save(force=False)``;
4. merge: ``verify_run``.

Reported per size: seconds per phase, the bookkeeping total (planning + queue/manifest +
merge), the driver total (that plus reading inputs and writing outputs, i.e. all but the
fake engine), input/output bytes, peak RSS, the baseline RSS (after imports and a tiny
warm-up run), the tracemalloc peak of Python allocations and Arrow's memory-pool peak.
tracemalloc slows Python allocation, so it runs in a second child per size and the
timings come from an untraced one. Exits 1 if the bookkeeping at the largest size
exceeds ``--limit-seconds``.
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

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.manifest import RunManifest, ShardState, file_fingerprint  # noqa: E402
from core.shards import (  # noqa: E402
    completed_shards,
    read_shard_inputs,
    stage_inputs,
    verify_run,
    write_shard_output,
)
from workflows.generate import OUTPUT_SCHEMA  # noqa: E402
from workflows.runtime.shard_pool import ShardQueue  # noqa: E402

MB = 1024 * 1024


def write_synthetic_prompts(path: Path, n: int) -> None:
    """N rows of ~100-character prompts, no id column (ids come from row numbers)."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            prompt = f"synthetic question number {i}: how should an assistant answer this request safely and helpfully?"
            handle.write(json.dumps({"prompt": prompt}) + "\n")


def fake_engine(rows: list[dict]) -> list[dict]:
    """Output rows shaped like the generation worker's: one critique/revision round."""
    out = []
    for row in rows:
        prompt = [dict(m) for m in row["messages"]]
        question = prompt[-1]["content"][:48]
        initial, revised = f"initial answer to {question}", f"revised answer to {question}"
        final = {"role": "assistant", "content": revised}
        out.append({
            "index": row["index"], "id": row["id"], "prompt": prompt,
            "initial_response": initial,
            "revisions": [{"round": 1, "principle_id": "harm-1", "critique": f"critique of {question}",
                           "revision": revised}],
            "final_response": revised,
            "messages": [*prompt, final], "completion": [final], "chosen": [final],
            "rejected": [{"role": "assistant", "content": initial}],
            "principle_ids": ["harm-1"], "model": "fake-model", "constitution_sha256": "0" * 64,
            "seed": 0, "prompt_tokens": 24, "generated_tokens": 36, "error": None,
        })
    return out


def rss_mb() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plan(prompts: Path, run_dir: Path, shard_size: int) -> tuple[RunManifest, int, int, dict[str, float]]:
    """What ``run_stage`` does before Ray starts; returns the manifest, rows, shards, timings."""
    times = {}
    t0 = time.perf_counter()
    identity = {"prompts": file_fingerprint(prompts), "shard_size": shard_size}
    t1 = time.perf_counter()
    manifest = RunManifest.open(run_dir, "generate", identity, {"shard_size": shard_size})
    staged = stage_inputs(prompts, run_dir, shard_size)
    t2 = time.perf_counter()
    manifest.input = {"source": str(prompts), "total_rows": staged.total_rows, "rejected": staged.rejected,
                      "shards": len(staged.shards)}
    manifest.shards = {s.index: ShardState(rows=s.rows) for s in staged.shards}
    manifest.save()
    done = completed_shards(run_dir)
    t3 = time.perf_counter()
    times.update(fingerprint_s=t1 - t0, stage_inputs_s=t2 - t1, manifest_create_s=t3 - t2, planning_s=t3 - t0)
    assert not done, "a fresh run directory has no completed shards"
    return manifest, staged.total_rows, len(staged.shards), times


def run_shards(run_dir: Path, manifest: RunManifest, shard_count: int) -> dict[str, float]:
    """The pool's loop on one process: take, read, fake engine, write, record, throttled save."""
    times = dict.fromkeys(("queue_s", "read_inputs_s", "fake_engine_s", "write_output_s", "manifest_s"), 0.0)
    saves = 0
    clock = time.perf_counter
    t = clock()
    queue = ShardQueue.of(range(shard_count), max_attempts=3)
    times["queue_s"] += clock() - t
    while True:
        t = clock()
        if not queue:
            times["queue_s"] += clock() - t
            break
        shard = queue.take()
        manifest.shards[shard].attempts += 1  # as run_stage's submit
        t1 = clock()
        inputs = read_shard_inputs(run_dir, shard)
        t2 = clock()
        rows = fake_engine(inputs)
        t3 = clock()
        write_shard_output(run_dir, shard, rows, [], OUTPUT_SCHEMA)
        t4 = clock()
        state = manifest.shards[shard]
        state.status, state.rows_out, state.rejected = "done", len(rows), 0
        state.seconds, state.tokens, state.worker = round(t3 - t2, 3), 36 * len(rows), "bench:0"
        state.started_at, state.finished_at = time.time() - (t3 - t2), time.time()
        before = manifest._last_save  # to count the saves the throttle let through
        manifest.save(force=False)
        saves += manifest._last_save != before
        t5 = clock()
        times["queue_s"] += t1 - t
        times["read_inputs_s"] += t2 - t1
        times["fake_engine_s"] += t3 - t2
        times["write_output_s"] += t4 - t3
        times["manifest_s"] += t5 - t4
    t = clock()
    manifest.save()  # as run_stage's `finally`
    times["manifest_s"] += clock() - t
    times["manifest_saves"] = saves + 1
    return times


def warm_up(scratch: Path) -> None:
    """One tiny run, so lazy imports (Parquet, NumPy) and first-call caches are loaded before
    the baseline is taken and before tracemalloc starts."""
    scratch.mkdir(parents=True, exist_ok=True)
    write_synthetic_prompts(scratch / "prompts.jsonl", 8)
    manifest, total_rows, shard_count, _ = plan(scratch / "prompts.jsonl", scratch / "run", 4)
    run_shards(scratch / "run", manifest, shard_count)
    verify_run(scratch / "run", total_rows, shard_count)
    shutil.rmtree(scratch)


def child(size: int, shard_size: int, workdir: Path, trace: bool) -> dict:
    """One size, end to end, in this process; returns the report."""
    import tracemalloc

    workdir.mkdir(parents=True, exist_ok=True)
    warm_up(workdir / f"warm-up-{size}")
    baseline = rss_mb()
    prompts, run_dir = workdir / f"prompts-{size}.jsonl", workdir / f"run-{size}-{'trace' if trace else 'time'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    if not prompts.exists():
        write_synthetic_prompts(prompts, size)
    data_s = time.perf_counter() - t
    peaks = {}  # tracemalloc peak per phase, MB: which phase's Python memory grows with N

    def phase_peak(name: str) -> None:
        if trace:
            peaks[f"{name}_traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
            tracemalloc.reset_peak()

    if trace:
        tracemalloc.start()
    manifest, total_rows, shard_count, times = plan(prompts, run_dir, shard_size)
    phase_peak("planning")
    times.update(run_shards(run_dir, manifest, shard_count))
    phase_peak("shards")
    t = time.perf_counter()
    accounting = verify_run(run_dir, total_rows, shard_count)
    times["merge_s"] = time.perf_counter() - t
    phase_peak("merge")
    assert accounting.rows_out == size and accounting.rejected == 0
    traced_peak = max(peaks.values()) if trace else None
    bookkeeping = times["planning_s"] + times["queue_s"] + times["manifest_s"] + times["merge_s"]
    report = {
        "size": size, "shard_size": shard_size, "shards": shard_count, "traced": trace,
        "data_generation_s": data_s, **times,
        "bookkeeping_s": bookkeeping,
        "driver_s": bookkeeping + times["read_inputs_s"] + times["write_output_s"],
        "input_bytes": prompts.stat().st_size,
        "staged_bytes": dir_bytes(run_dir / "inputs"),
        "output_bytes": dir_bytes(run_dir / "data") + dir_bytes(run_dir / "rejects"),
        "manifest_bytes": manifest.path.stat().st_size,
        "peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline,
        "tracemalloc_peak_mb": traced_peak, **peaks,
        "arrow_pool_peak_mb": pa.default_memory_pool().max_memory() / MB,
    }
    shutil.rmtree(run_dir)
    return report


def run_child(size: int, shard_size: int, workdir: Path, trace: bool) -> dict:
    """A fresh interpreter per measurement, so peak RSS belongs to this size alone."""
    command = [sys.executable, __file__, "--child", str(size), "--shard-size", str(shard_size),
               "--workdir", str(workdir), "--trace" if trace else "--no-trace"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"child for {size} prompts failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(reports: list[dict]) -> None:
    print("| prompts | shards | planning s | queue+manifest s | read+write s | fake engine s | merge s "
          "| bookkeeping s | driver s | input MB | output MB | peak RSS MB | RSS over baseline MB "
          "| tracemalloc peak MB | Arrow pool peak MB |")
    print("|" + " ---: |" * 15)
    for r in reports:
        print(f"| {r['size']:,} | {r['shards']:,} | {r['planning_s']:.2f} | {r['queue_s'] + r['manifest_s']:.3f} "
              f"| {r['read_inputs_s'] + r['write_output_s']:.2f} | {r['fake_engine_s']:.2f} | {r['merge_s']:.2f} "
              f"| {r['bookkeeping_s']:.2f} | {r['driver_s']:.2f} | {r['input_bytes'] / MB:.1f} "
              f"| {r['output_bytes'] / MB:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
              f"| {_mb(r.get('tracemalloc_peak_mb'))} | {r['arrow_pool_peak_mb']:.1f} |")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_phase_memory(reports: list[dict]) -> None:
    if not any(r.get("tracemalloc_peak_mb") for r in reports):
        return
    print("| prompts | tracemalloc peak MB: planning | shards | merge |")
    print("| ---: | ---: | ---: | ---: |")
    for r in reports:
        print(f"| {r['size']:,} | {_mb(r.get('planning_traced_peak_mb'))} | {_mb(r.get('shards_traced_peak_mb'))} "
              f"| {_mb(r.get('merge_traced_peak_mb'))} |")
    print()


def print_growth(reports: list[dict]) -> None:
    for small, big in zip(reports, reports[1:]):
        data = big["input_bytes"] / small["input_bytes"]
        over = max(big["peak_rss_mb"] - big["baseline_rss_mb"], 1e-9) / max(
            small["peak_rss_mb"] - small["baseline_rss_mb"], 1e-9)
        traced = (f", tracemalloc peak x{big['tracemalloc_peak_mb'] / small['tracemalloc_peak_mb']:.2f}"
                  if small["tracemalloc_peak_mb"] else "")
        print(f"{small['size']:,} -> {big['size']:,} prompts: data x{data:.1f}, peak RSS x"
              f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}, RSS over baseline x{over:.2f}{traced}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="prompt counts")
    parser.add_argument("--shard-size", type=int, default=512, help="prompts per shard")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to make the scratch directory (deleted at the end); default: the system temp dir")
    parser.add_argument("--limit-seconds", type=float, default=60.0, help="bookkeeping limit at the largest size")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each size under tracemalloc (slow: Python allocations are traced)")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.shard_size, args.workdir, trace=args.trace)))
        return

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-orchestration-", dir=args.workdir))
    reports = []
    try:
        for size in sorted(args.sizes):
            reports.append(run_child(size, args.shard_size, workdir, trace=False))
            print(json.dumps(reports[-1]), file=sys.stderr, flush=True)
            if args.trace:
                traced = run_child(size, args.shard_size, workdir, trace=True)
                reports[-1].update({k: v for k, v in traced.items() if "traced_peak" in k or "tracemalloc" in k})
                print(json.dumps(traced), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(reports)
    print()
    print_phase_memory(reports)
    print_growth(reports)
    largest = reports[-1]
    # The target is on the driver's bookkeeping (planning, queue and manifest, merge); writing
    # and reading the shard files is reported beside it (it is per-file I/O, set by --shard-size).
    verdict = "within" if largest["bookkeeping_s"] <= args.limit_seconds else "OVER"
    print(f"\n{largest['size']:,} prompts: bookkeeping {largest['bookkeeping_s']:.1f} s, {verdict} the "
          f"{args.limit_seconds:.0f} s limit (driver with shard file I/O: {largest['driver_s']:.1f} s)")
    sys.exit(0 if verdict == "within" else 1)


if __name__ == "__main__":
    main()

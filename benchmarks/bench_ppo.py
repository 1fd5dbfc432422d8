"""Seconds per PPO step of `cai train ppo`, split into rollout, scoring, training and weight sync.

    .venv/bin/python benchmarks/bench_ppo.py --model default --steps 5 --rollout-batch 8 --max-new-tokens 64 \
        --rollout-workers 2 --sync-transport shm

Synchronous against overlapped (``--max-staleness N``), side by side: ``--vs-staleness N``
runs the job ``--pairs`` times in each schedule, alternating, and reports each pair's ratio of
mean step seconds. ``--pin`` gives the learner one core and the rollout engine another: the
benchmark process (and so Ray's processes and the learner it starts) runs on core 1, and every
thread of the rollout engine's processes is moved to core 0:

    .venv/bin/python benchmarks/bench_ppo.py --model default --steps 6 --rollout-batch 8 --max-new-tokens 64 \
        --vs-staleness 1 --pairs 2 --pin

Runs the real job (Ray Train learners, vLLM rollout actors) on the given policy with a reward
model of the same size: the policy's weights under a fresh one-output sequence-classification
head, so scoring costs what a real reward model of that size costs. The first step (engine
and allocator warm-up) is reported separately from the mean of the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("rollout_seconds", "scoring_seconds", "training_seconds", "sync_seconds")
SPLIT = ("sync_gather_s", "sync_pack_s", "sync_transfer_s", "sync_load_s", "sync_check_s")


def reward_model_like(policy: str, out: Path) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rollout-batch", type=int, default=8)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--learners", type=int, default=1)
    parser.add_argument("--rollout-workers", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="skip vLLM's torch.compile warm-up")
    parser.add_argument("--sync-transport", default="auto", choices=("auto", "shm", "gloo", "blob"))
    parser.add_argument("--sync-check-every", type=int, default=10)
    parser.add_argument("--max-staleness", type=int, default=0, help="the schedule of a single run")
    parser.add_argument("--vs-staleness", type=int, default=0,
                        help="compare the synchronous schedule with --max-staleness N, --pairs times each")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="the learner on core 1, the engine's threads on core 0")
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1})  # inherited by Ray's processes started below: the learner gets core 1
        threading.Thread(target=pin_engines, args=({0},), daemon=True).start()
    if args.vs_staleness:
        return compare_schedules(args)
    history = run_once(args, args.max_staleness)
    report(args, history)
    return 0


ENGINE_ACTOR = "ray::RolloutWor"  # /proc/PID/comm of a rollout actor; its EngineCore is its child


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (this benchmark's local Ray instance and its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pin_engines(cores: set[int]) -> None:
    """Keep every thread of this benchmark's rollout actors and their processes (the EngineCore)
    on ``cores`` (checked twice a second, so threads started later follow). vLLM-CPU's own binding (VLLM_CPU_OMP_THREADS_BIND)
    applies to the worker processes of its multiprocessing executor, which an engine at tensor
    parallel 1 on CPU does not start (actors/engine.py, engine_environment)."""
    while True:
        actors = [pid for pid in descendants(os.getpid()) if _comm(pid) == ENGINE_ACTOR]
        for pid in actors + [child for actor in actors for child in descendants(actor)]:
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    if os.sched_getaffinity(int(task.name)) != cores:
                        os.sched_setaffinity(int(task.name), cores)
            except (OSError, ValueError):
                continue  # gone meanwhile
        time.sleep(0.5)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def run_once(args, max_staleness: int) -> list[dict]:
    """One `cai train ppo` job on a local Ray instance (started once, kept for the next run);
    its metrics.jsonl rows."""
    from core.config import load_config
    from learners.ppo_config import PPOConfig
    from workflows.ppo import run_ppo
    from workflows.runtime.models import resolve_model

    policy = str(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        source = (ROOT / "data" / "prompts" / "train.jsonl").read_text().splitlines()
        prompts.write_text("\n".join(source[: args.rollout_batch * args.steps]) + "\n")
        config = load_config(PPOConfig, overrides=dict(
            policy=policy, reward_model=reward_model_like(policy, Path(tmp) / "rm"), prompts=str(prompts),
            out=str(Path(tmp) / "ppo"), steps=args.steps, rollout_batch=args.rollout_batch, minibatch=args.minibatch,
            ppo_epochs=1, max_new_tokens=args.max_new_tokens, learners=args.learners,
            rollout_workers=args.rollout_workers, save_steps=args.steps + 1, enforce_eager=args.eager,
            max_model_len=2048, lr=1e-6, sync_transport=args.sync_transport,
            sync_check_every=args.sync_check_every, max_staleness=max_staleness))
        from workflows.runtime.ray_session import connect_ray

        # a local instance with a logical CPU per process (2 engines + 1 learner > 2 cores: they take turns)
        connect_ray(num_cpus=max(2, args.learners + args.rollout_workers), include_dashboard=False)
        run_ppo(config)
        return [json.loads(line) for line in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()]


OVERLAP = ("rollout_sample_seconds", "overlap_seconds")


def compare_schedules(args) -> int:
    """The synchronous schedule and --max-staleness N in turn, ``--pairs`` times; each pair's
    ratio of mean step seconds over steps 2.. (the first step warms the engine up)."""
    runs: dict[int, list[list[dict]]] = {0: [], args.vs_staleness: []}
    for pair in range(args.pairs):
        for staleness in runs:
            history = run_once(args, staleness)
            runs[staleness].append(history)
            rest = history[1:]
            means = {k: sum(row.get(k, 0.0) for row in rest) / len(rest)
                     for k in (*PHASES, *OVERLAP, "step_seconds", "response_length")}
            print(f"pair {pair + 1}, max-staleness {staleness}: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()),
                  flush=True)
    where = "learner on core 1, engine threads on core 0" if args.pin else "learner and engine sharing both cores"
    print(f"\nmodel {args.model}, {args.steps} steps of {args.rollout_batch} prompts x {args.max_new_tokens} new "
          f"tokens, {args.learners} learner(s), {args.rollout_workers} engine(s), {where}; means of steps 2-{args.steps}\n")
    print("| pair | schedule | rollout wait s | engine sampling s | scoring s | training s | sync s | overlap s | "
          "step s | staleness |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mean = lambda rows, key: sum(row.get(key, 0.0) for row in rows) / len(rows)  # noqa: E731
    ratios = []
    for pair in range(args.pairs):
        for staleness, histories in runs.items():
            rest = histories[pair][1:]
            print(f"| {pair + 1} | {'synchronous' if not staleness else f'--max-staleness {staleness}'} | "
                  + " | ".join(f"{mean(rest, k):.2f}" for k in (*PHASES[:1], OVERLAP[0], *PHASES[1:], OVERLAP[1],
                                                                  "step_seconds"))
                  + f" | {max(row['staleness'] for row in rest):g} |")
        sync, overlapped = (mean(runs[k][pair][1:], "step_seconds") for k in runs)
        ratios.append(overlapped / sync)
    print("\noverlapped / synchronous step seconds, pair by pair: " + ", ".join(f"{r:.3f}" for r in ratios))
    return 0


def report(args, history: list[dict]) -> None:
    rest = history[1:] or history
    mean = {k: sum(row[k] for row in rest) / len(rest) for k in PHASES}
    print(f"\nmodel {args.model}, {args.steps} steps of {args.rollout_batch} prompts x {args.max_new_tokens} new "
          f"tokens, {args.learners} learner(s), {args.rollout_workers} rollout worker(s), eager={args.eager}\n")
    print("| | rollout s | scoring s | training s | weight sync s | total s | tokens/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = history[0]
    tokens = lambda row: round(row["response_length"] * args.rollout_batch)
    print(f"| first step | {' | '.join(f'{first[k]:.2f}' for k in PHASES)} | {sum(first[k] for k in PHASES):.2f} "
          f"| {tokens(first)} |")
    print(f"| mean of steps 2-{len(history)} | {' | '.join(f'{mean[k]:.2f}' for k in PHASES)} | "
          f"{sum(mean.values()):.2f} | {sum(tokens(r) for r in rest) / len(rest):.0f} |")
    checked = [r for r in history if r.get("sync_logprob_diff") is not None]
    print(f"\nweight sync exactness: max |engine - learner| log-prob after sync "
          f"{max(r['sync_logprob_diff'] for r in checked):.2e} (checked at steps {[r['step'] for r in checked]})")
    print(f"\nweight sync ({history[0].get('sync_transport')}), per step:\n")
    print("| step | gather s | pack s | transfer s | engine load s | check s | sync s | step s | sync share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in history:
        total = sum(row[k] for k in PHASES)
        print(f"| {row['step']} | " + " | ".join(f"{row.get(k, 0.0):.2f}" for k in SPLIT) +
              f" | {row['sync_seconds']:.2f} | {total:.2f} | {row['sync_seconds'] / total:.1%} |")
    share = sum(r["sync_seconds"] for r in rest) / sum(sum(r[k] for k in PHASES) for r in rest)
    print(f"\nsync share of the step over steps 2-{len(history)}: {share:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())

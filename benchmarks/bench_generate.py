"""SL-CAI generation throughput: `cai generate` against the raw vLLM engine, side by side.

    .venv/bin/python benchmarks/bench_generate.py --prompts 64 --revisions 1 --max-new-tokens 64

Both sides run the same chains (answer, then critique and revision per round) on the same
model, prompts and engine settings, greedy, each in its own process:

* raw:  ``vllm.LLM.generate`` over all conversations of a step, step by step (the
  stage-by-stage batching a hand-written script would do);
* cai:  ``cai generate`` with one worker actor: per-conversation async chains on Ray.

Mode ``fixed`` ignores EOS so every step generates exactly ``--max-new-tokens`` tokens and
the work is equal: the ratio cai/raw of tokens/s measures our overhead (target >= 0.9).
Mode ``variable`` stops at EOS, where async chains keep the batch fuller than step-by-step
batching; it reports tokens/s and the mean batch occupancy (running requests sampled over
the generation window, divided by the most that can run: min(max_num_seqs, prompts)).
Timing excludes engine start-up on both sides (first request to last answer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_SECONDS = 0.05


def write_prompts(path: Path, n: int) -> Path:
    from core.prompt_data import load_prompts

    base = [row.prompt for row in load_prompts(ROOT / "data" / "demo_prompts.jsonl").rows]
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"p{i}", "prompt": f"{base[i % len(base)]} (case {i})"}) + "\n")
    return path


def run_raw(args: argparse.Namespace, prompts_path: Path) -> dict:
    """Step-by-step batching on vllm.LLM, the same chain as critique_revision_chain."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from actors.engine import resolve_dtype
    from constitutions.loader import load_constitution
    from constitutions.sampling import sample_critique_ids
    from workflows.runtime.models import resolve_model
    from core.prompt_data import load_prompts

    model = resolve_model(args.model)
    constitution = load_constitution("harmless")
    rows = load_prompts(prompts_path).rows
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = LLM(model, seed=0, dtype=resolve_dtype("auto"), max_model_len=args.max_model_len or None,
              enable_prefix_caching=True, enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=args.mode == "fixed")
    histories = [list(row.messages) for row in rows]
    principles = [sample_critique_ids(constitution, args.revisions, seed=0, key=row.id) for row in rows]

    def step(messages_list: list[list[dict]]) -> list[str]:
        prompts = []
        for messages in messages_list:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts.append(TokensPrompt(prompt_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"]))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        nonlocal_tokens[0] += sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text.strip() for o in outputs]

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(llm.llm_engine.get_num_unfinished_requests())
            time.sleep(SAMPLE_SECONDS)

    nonlocal_tokens = [0]
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    sampler.start()
    for history, text in zip(histories, step(histories)):
        history.append({"role": "assistant", "content": text})
    for round_index in range(args.revisions):
        for kind in ("critique", "revision"):
            for history, ids in zip(histories, principles):
                principle = constitution.critique(ids[round_index])
                history.append({"role": "user", "content": getattr(principle, kind)})
            for history, text in zip(histories, step(histories)):
                history.append({"role": "assistant", "content": text})
    seconds = time.monotonic() - started
    stop.set()
    return {"tokens": nonlocal_tokens[0], "seconds": seconds, "mean_running": sum(samples) / max(len(samples), 1)}


def run_cai(args: argparse.Namespace, prompts_path: Path, out: Path) -> dict:
    from core.config import load_config
    from workflows.generate import GenerateConfig, run_generate

    config = load_config(GenerateConfig, overrides=dict(
        model=args.model, constitution="harmless", prompts=str(prompts_path), out=str(out),
        revisions=args.revisions, max_new_tokens=args.max_new_tokens, temperature=0.0,
        ignore_eos=args.mode == "fixed", workers=1, shard_size=max(1, args.shard_size or args.prompts // 2),
        inflight_shards=2, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
    ))
    summary = run_generate(config)
    shards = json.loads((out / "manifest.json").read_text())["shards"].values()
    seconds = max(s["finished_at"] for s in shards) - min(s["started_at"] for s in shards)
    return {"tokens": summary["tokens"], "seconds": seconds, "mean_running": summary["mean_running_requests"]}


def side(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    prompts = workdir / "prompts.jsonl"
    if args.side == "raw":
        result = run_raw(args, prompts)
    else:
        # a fresh run directory per trial: the same one would resume (and skip) the finished run
        result = run_cai(args, prompts, Path(tempfile.mkdtemp(dir=workdir, prefix=f"cai-{args.mode}-")))
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    result["occupancy"] = result["mean_running"] / min(args.max_num_seqs, args.prompts)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model directory, hub id or 'default'")
    parser.add_argument("--prompts", type=int, default=64, help="conversations")
    parser.add_argument("--revisions", type=int, default=1, help="critique/revision rounds")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per step")
    parser.add_argument("--max-model-len", type=int, default=4096, help="engine context length")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="engine batch limit")
    parser.add_argument("--shard-size", type=int, default=0, help="cai shard size (default: prompts / 2)")
    parser.add_argument("--mode", choices=["fixed", "variable", "both"], default="both", help="output lengths")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile on either side")
    parser.add_argument("--repeats", type=int, default=1, help="trials per side, alternating which side runs first")
    parser.add_argument("--side", choices=["raw", "cai"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args)

    workdir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    write_prompts(workdir / "prompts.jsonl", args.prompts)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "RAY_CAI_DASHBOARD": "0", "TOKENIZERS_PARALLELISM": "false"}
    modes = ["fixed", "variable"] if args.mode == "both" else [args.mode]
    results = {}
    for mode in modes:
        for trial in range(args.repeats):
            # alternate which side goes first, so a drift in machine load hits both alike
            for which in ("raw", "cai") if trial % 2 == 0 else ("cai", "raw"):
                results[(mode, which, trial)] = run_side(args, mode, which, workdir, env)
    print(f"model {args.model}, {args.prompts} prompts, {args.revisions} revision round(s), "
          f"{args.max_new_tokens} max new tokens, eager={args.enforce_eager}, {args.repeats} trial(s)\n")
    print("| mode | trial | side | tokens | seconds | tokens/s | mean running | occupancy |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, which, trial), r in sorted(results.items()):
        print(f"| {mode} | {trial + 1} | {which} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | "
              f"{r['mean_running']:.1f} | {r['occupancy']:.2f} |")
    for mode in modes:
        ratios = [results[(mode, "cai", t)]["tokens_per_second"] / results[(mode, "raw", t)]["tokens_per_second"]
                  for t in range(args.repeats)]
        occupancy = {w: statistics.mean(results[(mode, w, t)]["occupancy"] for t in range(args.repeats))
                     for w in ("cai", "raw")}
        print(f"\n{mode}: cai/raw tokens/s per trial {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}; occupancy cai {occupancy['cai']:.2f} vs raw {occupancy['raw']:.2f}")


def run_side(args, mode: str, which: str, workdir: Path, env: dict) -> dict:
    argv = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--side", which, "--workdir", str(workdir)]
    completed = subprocess.run(argv, env=env, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"{which}/{mode} failed (exit {completed.returncode})")
    return json.loads(lines[-1][len("RESULT "):])

if __name__ == "__main__":
    main()

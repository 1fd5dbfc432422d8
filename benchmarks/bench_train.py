"""Training throughput of `cai train sft` and `cai train rm` with 1 and 2 Ray Train workers.

    .venv/bin/python benchmarks/bench_train.py --model default --steps 12

Synthetic data of fixed length (so every step does the same work): SFT conversations of a
prompt and a ~200-token answer; RM pairs of two such answers. Tokens/s = tokens per example
× the trainer's own samples/s over its training loop (start-up, data preparation and the
final save excluded), both counted over all workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSWER = ("A careful, honest answer explains the risks, suggests a safe alternative and stays helpful. " * 12).strip()
REJECTED = ANSWER.replace("careful, honest", "careless, vague")


def write_data(directory: Path) -> tuple[Path, Path]:
    sft, rm = directory / "sft.jsonl", directory / "rm.jsonl"
    with sft.open("w") as s, rm.open("w") as r:
        for i in range(256):
            prompt = [{"role": "user", "content": f"Question {i}: how should I handle this safely?"}]
            s.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": ANSWER}]}) + "\n")
            r.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": ANSWER}],
                                "rejected": [{"role": "assistant", "content": REJECTED}],
                                "chosen_prob": 0.8}) + "\n")
    return sft, rm


def tokens_per_example(model: str, kind: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = [{"role": "user", "content": "Question 100: how should I handle this safely?"}]
    one = len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": ANSWER}], tokenize=True,
                                            return_dict=True)["input_ids"])
    if kind == "sft":
        return one
    other = len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": REJECTED}],
                                              tokenize=True, return_dict=True)["input_ids"])
    return one + other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model directory, hub id or 'default'")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per worker per step")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--jobs", nargs="+", default=["sft", "rm"], choices=["sft", "rm"], help="jobs to measure")
    args = parser.parse_args()

    from core.config import load_config
    from workflows.runtime.models import resolve_model
    from learners.hf_configs import RMConfig, SFTConfig
    from workflows.train import run_train

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    sft, rm = write_data(work)
    rows = []
    for kind, data in (("sft", sft), ("rm", rm)):
        if kind not in args.jobs:
            continue
        per_example = tokens_per_example(model, kind)
        for workers in args.workers:
            config = load_config({"sft": SFTConfig, "rm": RMConfig}[kind], overrides=dict(
                model=model, data=[str(data)], out=str(work / f"{kind}-{workers}"), workers=workers,
                batch_size=args.batch_size, max_steps=args.steps, save_steps=10_000, logging_steps=5,
                eval_split=0.0, max_length=512, lr=1e-5))
            metrics = run_train(config)["metrics"]
            samples = metrics["train_samples_per_second"]
            rows.append((kind, workers, per_example, samples, samples * per_example, metrics["train_runtime"]))
    print(f"\nmodel {args.model}, {args.steps} steps, batch {args.batch_size} per worker\n")
    print("| job | workers | tokens/example | samples/s | tokens/s | train seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, workers, per_example, samples, tokens, seconds in rows:
        print(f"| {kind} | {workers} | {per_example} | {samples:.2f} | {tokens:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()

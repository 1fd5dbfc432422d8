"""`cai eval feedback` scoring speed: the exact method against the fast one, on one engine.

    .venv/bin/python benchmarks/bench_eval_feedback.py --model default --data data/feedback_eval.jsonl --enforce-eager

One engine host in this process scores every item with :class:`actors.feedback_scorer.FeedbackScorer`
(chat template, no chain of thought), all items at once as a worker scores a shard, once per
mode: ``exact`` (every option's tokens by prompt log-probs, one request per option) and
``fast`` (one top-k request per single-token item). The modes alternate for ``--repeats``
rounds with the prefix cache emptied before each pass, so neither inherits the other's cache;
items/s is each mode's median. Timing excludes engine start-up. Also printed: both modes'
accuracy and mean P(correct), how many items agree on the most likely option, the largest
probability gap between the modes, and the top-k fallbacks of the fast mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def score_all(scorer, items: list[dict], scoring: str) -> tuple[float, list[dict]]:
    await scorer.host.engine.reset_prefix_cache()
    started = time.perf_counter()
    scored = await asyncio.gather(*(
        scorer.score_choices(i["prompt"], [*i["corrects"], *i["incorrects"]], scoring=scoring) for i in items))
    return time.perf_counter() - started, scored


async def bench(args: argparse.Namespace) -> dict:
    from actors.engine import EngineOptions, VLLMEngineHost
    from actors.engine_config import EngineConfig
    from actors.feedback_scorer import FeedbackScorer
    from workflows.eval_feedback import accuracy, read_items
    from workflows.runtime.models import resolve_model

    items, rejects = read_items(args.data)
    if rejects:
        raise SystemExit(f"{args.data}: {len(rejects)} malformed lines, e.g. {rejects[0]}")
    host = VLLMEngineHost(EngineOptions(model=resolve_model(args.model), config=EngineConfig(
        enforce_eager=args.enforce_eager, max_model_len=args.max_model_len or 0)))
    scorer = FeedbackScorer(host)
    await score_all(scorer, items[:2], "exact")  # warm-up: first-request costs out of the timing
    seconds: dict[str, list[float]] = {"exact": [], "fast": []}
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in ("exact", "fast"):
            elapsed, results[mode] = await score_all(scorer, items, mode)
            seconds[mode].append(elapsed)
    host.shutdown()

    n_correct = [len(i["corrects"]) for i in items]
    report = {"model": args.model, "items": len(items), "repeats": args.repeats}
    for mode in ("exact", "fast"):
        median = statistics.median(seconds[mode])
        report[mode] = {
            "seconds": [round(s, 2) for s in seconds[mode]],
            "items_per_second": round(len(items) / median, 2),
            **{k: round(v, 4) for k, v in accuracy([(r["probs"], n) for r, n in zip(results[mode], n_correct)]).items()},
        }
    report["fast"]["scored_by"] = {m: sum(r["method"] == m for r in results["fast"]) for m in ("fast", "exact")}
    report["fast"]["fallbacks"] = sum(r["fallbacks"] for r in results["fast"])
    report["speedup"] = round(report["fast"]["items_per_second"] / report["exact"]["items_per_second"], 2)

    def argmax(probs: list[float]) -> int:
        return max(range(len(probs)), key=probs.__getitem__)

    pairs = list(zip(results["exact"], results["fast"]))
    report["same_argmax"] = sum(argmax(e["probs"]) == argmax(f["probs"]) for e, f in pairs)
    report["max_prob_gap"] = round(max(abs(a - b) for e, f in pairs for a, b in zip(e["probs"], f["probs"])), 4)
    report["accuracy_gap"] = round(report["fast"]["accuracy"] - report["exact"]["accuracy"], 4)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT / "data" / "feedback_eval.jsonl"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (exact, fast); the median is reported")
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile warm-up")
    parser.add_argument("--max-model-len", type=int, default=0, help="0 = the model's own")
    print(json.dumps(asyncio.run(bench(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()

"""`make demo`: the whole method on the embedded default model, on this machine.

Runs ``cai run --config configs/demo.yaml`` (every stage, with progress), then shows a few
revisions and AI-labelled pairs and ends with where the evaluation report is. A rerun skips
the stages already done.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from workflows.pipeline import load_pipeline_config, run_pipeline
from workflows.runtime.models import materialize_default_model

ROOT = Path(__file__).resolve().parents[1]


def show_examples(run_dir: Path, count: int) -> None:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((run_dir / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for row in rows[:count]:
        print(f"\n### {row['prompt'][-1]['content']}")
        print("initial:  " + textwrap.shorten(row["initial_response"], 300))
        for revision in row["revisions"]:
            print(f"critique [{revision['principle_id']}]: " + textwrap.shorten(revision["critique"], 300))
            print("revision: " + textwrap.shorten(revision["revision"], 300))


def show_labels(run_dir: Path, count: int) -> None:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((run_dir / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for row in rows[:count]:
        print(f"\n### {row['prompt'][-1]['content']}")
        print(f"chosen (p={row['chosen_prob']:.2f}, principles {', '.join(row['principle_ids'])}): "
              + textwrap.shorten(row["chosen"][0]["content"], 240))
        print("rejected: " + textwrap.shorten(row["rejected"][0]["content"], 240))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--show", type=int, default=3, help="examples to print")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for cai run")
    args = parser.parse_args(argv)

    print(f"== model: {materialize_default_model()}")
    print(f"== cai run --config configs/demo.yaml out={args.out}")
    config = load_pipeline_config(ROOT / "configs" / "demo.yaml", [f"out={args.out}", *args.overrides], base_dir=ROOT)
    record = run_pipeline(config)
    stages = record["stages"]
    print("\n== SL-CAI: answers, critiques and revisions")
    show_examples(Path(stages["generate"]["out"]), args.show)
    print("\n== RL-CAI: pairs labelled by AI feedback")
    show_labels(Path(stages["label"]["out"]), args.show)
    print("\n== stages")
    for name, stage in stages.items():
        print(f"  {name:<9} {'skipped (done before)' if stage.get('skipped') else stage['status']:<22} {stage['out']}")
    if record.get("analysis"):
        print(f"\nconstitution analytics: {record['analysis']}")
    if record.get("report"):
        print(f"report: {record['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

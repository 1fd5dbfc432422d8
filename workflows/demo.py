"""`make demo`: the pipeline on the embedded default model, on this machine.

Stages run in order, each as its own `cai` command would, and each prints what it made.
Stages that later issues add (labelling, training, evaluation) join here as they land.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from workflows.config import load_config
from workflows.generate import GenerateConfig, run_generate
from workflows.label import LabelConfig, run_label
from workflows.models import materialize_default_model

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
    parser.add_argument("--out", default="runs/demo", help="directory for the demo's runs")
    parser.add_argument("--show", type=int, default=3, help="examples to print")
    args = parser.parse_args(argv)
    out = Path(args.out)

    print(f"== model: {materialize_default_model()}")
    print("== SL-CAI generation (cai generate --config configs/demo.yaml)")
    config = load_config(GenerateConfig, config_file=str(ROOT / "configs" / "demo.yaml"),
                         overrides={"out": str(out / "sl-cai"), "prompts": str(ROOT / "data" / "demo_prompts.jsonl")})
    summary = run_generate(config)
    print(json.dumps(summary, indent=2))
    show_examples(Path(summary["out"]), args.show)

    print("\n== RL-CAI labelling (cai label --config configs/demo_label.yaml)")
    config = load_config(LabelConfig, config_file=str(ROOT / "configs" / "demo_label.yaml"),
                         overrides={"out": str(out / "rl-cai"), "prompts": str(ROOT / "data" / "demo_prompts.jsonl")})
    summary = run_label(config)
    print(json.dumps(summary, indent=2))
    show_labels(Path(summary["out"]), args.show)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

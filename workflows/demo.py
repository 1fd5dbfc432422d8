"""`make demo`: the pipeline on the embedded default model, on this machine.

Stages run in order and each prints what it produced. Stages that later issues add
(generation, labelling, training) join here as they land.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from constitutions.loader import load_constitution
from workflows.chat import chat
from workflows.models import materialize_default_model
from workflows.prompt_data import load_prompts
from workflows.ray_session import connect_ray

DATA = Path(__file__).resolve().parents[1] / "data" / "demo_prompts.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--prompts", type=int, default=4, help="how many demo prompts to answer")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== model")
    model = materialize_default_model()
    print(model)
    print("== constitution")
    constitution = load_constitution("harmless")
    print(json.dumps(constitution.summary()))
    print("== prompts")
    prompt_set = load_prompts(DATA)
    print(f"{len(prompt_set.rows)} usable, {len(prompt_set.rejects)} rejected from {DATA.name}")
    print("== ray")
    print(json.dumps(connect_ray()))
    print("== initial responses (vLLM on Ray)")
    results = chat(str(model), [row.prompt for row in prompt_set.rows[: args.prompts]], max_new_tokens=96)
    with (out / "initial_responses.jsonl").open("w") as handle:
        for result in results:
            print(f"### {result.prompt}\n{result.response.strip()}\n")
            handle.write(json.dumps(result.__dict__) + "\n")
    print(f"wrote {out / 'initial_responses.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``cai`` commands that read and build files: ``models``, ``constitution``, ``prompts``.

Each command is a run function and an arguments function; :mod:`workflows.cli.registry`
lists them. Jobs with a config class (``generate``, ``train sft``, ...) need neither: their
flags come from the config's fields.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from constitutions.importers import import_anthropic, import_llm_swarm
from constitutions.loader import ConstitutionError, dump_constitution, load_constitution, save_constitution
from core.config import ConfigError, add_config_arguments, load_config
from core.hub_datasets import is_hub_source
from core.prompt_data import PROMPTS_HELP, PromptOptions, load_prompts
from workflows.runtime.models import build_tiny_model, materialize_default_model


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- cai models ---------------------------------------------------------------------------


def cmd_models_tiny(args: argparse.Namespace) -> int:
    print(build_tiny_model(args.out_dir, seed=args.seed))
    return 0


def cmd_models_default(args: argparse.Namespace) -> int:
    print(materialize_default_model(Path(args.cache_dir) if args.cache_dir else None))
    return 0


def models_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives the same files")


def models_default_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", default=None, help="parent directory (default: $RAY_CAI_CACHE or ~/.cache/ray-cai/models)"
    )


# -- cai constitution ---------------------------------------------------------------------


def cmd_constitution_import(args: argparse.Namespace) -> int:
    meta = {"name": args.name, "version": args.version, "description": args.description}
    meta = {k: v for k, v in meta.items() if v is not None}
    if args.source == "anthropic":
        if not args.critiques:
            raise ConfigError("--from anthropic needs --critiques FILE")
        constitution = import_anthropic(args.critiques, args.feedback, args.few_shot, **meta)
    else:
        if not args.file:
            raise ConfigError("--from llm-swarm needs the constitution.json FILE")
        constitution = import_llm_swarm(args.file, **meta)
    save_constitution(constitution, args.out)
    print_json({"written": args.out, "read": constitution.description, **constitution.summary()})
    return 0


def cmd_constitution_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            print_json({"file": path, "valid": True, **load_constitution(path).summary()})
        except (ConstitutionError, FileNotFoundError) as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
    return 1 if failed else 0


def cmd_constitution_show(args: argparse.Namespace) -> int:
    constitution = load_constitution(args.file)
    if args.format == "yaml":
        print(dump_constitution(constitution), end="")
        return 0
    print(f"{constitution.name} {constitution.version}  sha256 {constitution.sha256}")
    if constitution.description:
        print(constitution.description.strip())
    print(f"\nCritique/revision principles ({len(constitution.critiques)}):")
    for p in constitution.critiques:
        print(f"  [{p.id}]\n    critique: {p.critique.strip()}\n    revision: {p.revision.strip()}")
    print(f"\nFeedback principles ({len(constitution.feedback)}):")
    for p in constitution.feedback:
        print(f"  [{p.id}] {p.text.strip()}")
    print(f"\nFew-shot examples: {len(constitution.few_shot)}; feedback few-shot: {len(constitution.feedback_few_shot)}")
    return 0


def constitution_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="the llm-swarm constitution.json (with --from llm-swarm)")
    parser.add_argument("--from", dest="source", required=True, choices=["anthropic", "llm-swarm"], help="input layout")
    parser.add_argument("--critiques", help="Anthropic CritiqueRevisionInstructions JSON (with --from anthropic)")
    parser.add_argument("--feedback", help="Anthropic multiple-choice principles JSON list (optional)")
    parser.add_argument("--few-shot", help="Anthropic few-shot transcripts JSON list (optional)")
    parser.add_argument("--out", required=True, help="YAML file to write")
    parser.add_argument("--name", help="constitution name to record (default: derived from the layout)")
    parser.add_argument("--version", help="version string to record (default: 1.0)")
    parser.add_argument("--description", help="description to record")


def constitution_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="constitution YAML files or bundled names")


def constitution_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="constitution YAML file or bundled name (e.g. harmless)")
    parser.add_argument("--format", choices=["text", "yaml"], default="text", help="output layout")


# -- cai prompts --------------------------------------------------------------------------


def cmd_prompts_check(args: argparse.Namespace) -> int:
    options = load_config(PromptOptions, args)
    prompt_set = load_prompts(args.source, options)
    first = prompt_set.rows[0] if prompt_set.rows else None
    print_json(
        {
            "source": prompt_set.source,
            **({"split": options.prompt_split} if is_hub_source(args.source) else {}),
            **prompt_set.layout.describe(),
            "rows": prompt_set.total,
            "usable": len(prompt_set.rows),
            "rejected": len(prompt_set.rejects),
            "rejects_by_reason": rejects_by_reason(prompt_set.rejects)[: args.show],
            "first_prompt": {"row": first.index, "id": first.id, "messages": list(first.messages)} if first else None,
        }
    )
    return 0


def rejects_by_reason(rejects: list, examples: int = 3) -> list[dict]:
    """Rejects grouped by reason, most frequent first, each with its first rows. A reason's
    details (after ": " or " (") are left out of the grouping: "invalid JSON: …" is one reason."""
    groups: dict[str, list] = {}
    for reject in rejects:
        groups.setdefault(re.split(r": | \(", reject.reason, maxsplit=1)[0], []).append(reject)
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    return [{"reason": reason, "count": len(group), "rows": [r.index for r in group[:examples]],
             "example": group[0].reason} for reason, group in ordered]


def prompts_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=PROMPTS_HELP)
    add_config_arguments(parser, PromptOptions)
    parser.add_argument("--show", type=int, default=20, help="reject reasons to list, each with its first rows")

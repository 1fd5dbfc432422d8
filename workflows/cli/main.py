"""The ``cai`` command line, built from :data:`workflows.cli.registry.COMMANDS`.

User errors (bad files, missing models) print one ``cai: error: ...`` line and exit 2; a run
that failed on its learners prints one such line and exits 1. Set ``CAI_DEBUG=1`` to see the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from actors.process_output import LOG_LEVEL_ENV
from constitutions.importers import ConstitutionImportError
from constitutions.loader import ConstitutionError
from core.analysis import AnalysisInputError
from core.config import ConfigError
from core.prompt_data import PromptDataError
from core.rewards import RewardError
from core.run_identity import RunMismatchError
from core.training_data import TrainingDataError
from workflows.cli.registry import COMMANDS, GROUPS
from workflows.eval_feedback import EvalDataError
from workflows.runtime.job_client import JobClientError
from workflows.runtime.models import ModelNotFoundError
from workflows.runtime.placement import PlacementError
from workflows.runtime.ray_auth import RayAuthError
from workflows.runtime.shard_pool import NoCapacityError
from workflows.runtime.training import LearnerFailed

USER_ERRORS = (ConfigError, RewardError, EvalDataError, TrainingDataError, RunMismatchError, ConstitutionError,
               ConstitutionImportError, ModelNotFoundError, PromptDataError, FileNotFoundError, JobClientError,
               RayAuthError, PlacementError, NoCapacityError, AnalysisInputError)
RUN_FAILURES = (LearnerFailed,)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per registry entry; commands of two words share a group (``cai train ...``)."""
    parser = argparse.ArgumentParser(
        prog="cai",
        description="Constitutional AI on Ray: SL-CAI generation, RL-CAI labelling and training.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's and other libraries' start-up output from every actor on this terminal "
                        f"(the same as {LOG_LEVEL_ENV}=debug; by default it goes to the Ray logs only)")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}  # first word -> its subcommands
    for command in COMMANDS:
        *group, name = command.words
        commands = top
        if group:
            if group[0] not in groups:
                group_parser = top.add_parser(group[0], help=GROUPS[group[0]])
                groups[group[0]] = group_parser.add_subparsers(dest=f"{group[0]}_command", required=True,
                                                               metavar="COMMAND")
            commands = groups[group[0]]
        sub = commands.add_parser(name, help=command.help, description=command.description or command.help,
                                  usage=command.usage)
        command.add_arguments(sub)
        sub.set_defaults(command_entry=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "debug"  # read here and, through the job's runtime env, by every actor
    try:
        return args.command_entry(args)
    except USER_ERRORS as exc:
        if os.environ.get("CAI_DEBUG"):
            raise
        print(f"cai: error: {exc}", file=sys.stderr)
        return 2
    except RUN_FAILURES as exc:  # the run itself failed: one line too, exit 1
        if os.environ.get("CAI_DEBUG"):
            raise
        print(f"cai: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

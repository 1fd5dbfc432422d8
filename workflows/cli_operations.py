"""The ``cai`` commands that operate runs and clusters: ``submit``, ``jobs``, ``run``, ``status``.

Registered by :func:`workflows.cli.build_parser`, which also turns user errors into one
``cai: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- cai submit / cai jobs ---------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from workflows import submit
    from workflows.cli import UsageError

    cai_args = submit.command_args(args.cai_args)
    if cai_args[0] not in submit.cai_subcommands():
        raise UsageError(f"{cai_args[0]!r} is not a cai command (see cai --help)")
    runtime_env = submit.load_runtime_env(args.runtime_env, args.working_dir)
    client = submit.connect_jobs(args.address)
    job_id = submit.submit(client, cai_args, runtime_env, args.job_id)
    if args.no_wait:
        print(job_id)
        return 0
    print(f"cai: submitted {job_id} to {client.get_address()}; following its logs (Ctrl-C detaches)", file=sys.stderr)
    try:
        submit.stream_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\ncai: detached; job {job_id} keeps running (cai jobs stop {job_id} ends it)", file=sys.stderr)
        return submit.DETACHED_EXIT_CODE
    status = submit.final_status(client, job_id)
    print(f"cai: job {job_id} {status}", file=sys.stderr)
    return submit.exit_code(status)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from workflows import submit

    jobs = submit.list_jobs(submit.connect_jobs(args.address))
    if args.json:
        _print_json(jobs)
    else:
        print(submit.job_table(jobs))
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from workflows import submit

    _print_json(submit.job_status(submit.connect_jobs(args.address), args.job_id))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from workflows import submit

    client = submit.connect_jobs(args.address)
    if not args.follow:
        print(submit.job_logs(client, args.job_id), end="")
        return 0
    try:
        submit.stream_logs(client, args.job_id)
    except KeyboardInterrupt:
        return submit.DETACHED_EXIT_CODE
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from workflows import submit

    stopped = submit.stop_job(submit.connect_jobs(args.address), args.job_id)
    print(f"cai: {'stopping' if stopped else 'already ended:'} {args.job_id}", file=sys.stderr)
    return 0


def _add_address_argument(parser) -> None:
    parser.add_argument(
        "--address", default=None,
        help="Ray job server (dashboard) URL; default: $RAY_DASHBOARD_ADDRESS, an http(s) $RAY_ADDRESS, "
        "or http://127.0.0.1:8265. The token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )


def register_submit(commands) -> None:
    parser = commands.add_parser(
        "submit", help="run a cai command as a Ray Job on a cluster and follow its logs",
        usage="cai submit [options] -- COMMAND [ARGS...]",
        description="Submit `cai COMMAND ARGS...` to a Ray cluster's job server, stream its logs, and exit with "
        "its status: SUCCEEDED 0, FAILED 1, STOPPED 130 (Ctrl-C detaches, also 130; the job keeps running). "
        "Unreachable servers and rejected tokens are errors (exit 2).",
    )
    _add_address_argument(parser)
    parser.add_argument("--working-dir", help="local directory uploaded as the job's working_dir "
                        "(without excludes in --runtime-env: .venv, .git, runs, __pycache__, weights are left out)")
    parser.add_argument("--runtime-env", help="YAML file with the job's runtime_env (e.g. cluster/runtime_env.yaml)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument("--job-id", help="submission id to use (default: one Ray generates)")
    parser.add_argument("cai_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                        help="the cai command to run on the cluster")
    parser.set_defaults(run=cmd_submit)


def register_jobs(commands) -> None:
    group = commands.add_parser("jobs", help="list, inspect, follow and stop Ray Jobs")
    sub = group.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    listing = sub.add_parser("list", help="every job on the cluster, oldest first")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=cmd_jobs_list)
    status = sub.add_parser("status", help="a job's status, message and times as JSON")
    status.set_defaults(run=cmd_jobs_status)
    logs = sub.add_parser("logs", help="a job's logs so far, or --follow them until it ends")
    logs.add_argument("--follow", "-f", action="store_true", help="stream new output until the job ends")
    logs.set_defaults(run=cmd_jobs_logs)
    stop = sub.add_parser("stop", help="ask the cluster to stop a job")
    stop.set_defaults(run=cmd_jobs_stop)
    for parser in (listing, status, logs, stop):
        _add_address_argument(parser)
    for parser in (status, logs, stop):
        parser.add_argument("job_id", metavar="ID", help="submission id (printed by cai submit, listed by cai jobs list)")


# -- cai run / cai status -----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from workflows.pipeline import load_pipeline_config, run_pipeline

    record = run_pipeline(load_pipeline_config(args.config, args.overrides))
    for name, stage in record["stages"].items():
        print(f"{name:<9} {'skipped' if stage.get('skipped') else stage['status']:<8} {stage['out']}")
    if record.get("report"):
        print(f"report: {record['report']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from workflows.run_status import format_status, run_status

    status = run_status(args.dir)
    if args.json:
        _print_json(status)
    else:
        print(format_status(status))
    return 0


def register_run(commands) -> None:
    run = commands.add_parser(
        "run", help="the whole method: generate, train sft, label, train rm, train ppo (or dpo), eval",
        description="Run every stage into one run directory; a rerun skips the stages already done. "
        "Overrides: dotted key=value pairs, e.g. rl=dpo generate.revisions=2 ppo.steps=10.",
    )
    run.add_argument("--config", required=True, help="pipeline YAML (see configs/demo.yaml)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, values read as YAML")
    run.set_defaults(run=cmd_run)
    status = commands.add_parser("status", help="show a run's stages, shard progress and outputs")
    status.add_argument("dir", metavar="DIR", help="a cai run directory or one stage's output directory")
    status.add_argument("--json", action="store_true", help="print JSON instead of lines")
    status.set_defaults(run=cmd_status)

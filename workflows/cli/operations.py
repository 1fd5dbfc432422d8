"""The ``cai`` commands that operate runs and clusters: ``submit``, ``jobs``, ``run``, ``status``.

Listed in :mod:`workflows.cli.registry`; :func:`workflows.cli.main.main` turns user errors
into one ``cai: error: ...`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from actors.process_output import with_log_level
from core.config import ConfigError
from workflows.cli.commands import print_json
from workflows.plan import gpu_memory_argument


# -- cai submit / cai jobs ---------------------------------------------------------------


def job_server(args: argparse.Namespace):
    """The job server that ``--address`` and ``--allow-http-token`` name."""
    from workflows.runtime import job_client

    return job_client.connect_jobs(args.address, allow_http_token=args.allow_http_token)


def cmd_submit(args: argparse.Namespace, known: Callable[[], set[str]]) -> int:
    """Submit ``cai <args>``; ``known()`` names the cai commands, to catch a typo before anything is uploaded."""
    from workflows.runtime import job_client

    cai_args = job_client.command_args(args.cai_args)
    if cai_args[0] not in known():
        raise ConfigError(f"{cai_args[0]!r} is not a cai command (see cai --help)")
    # cai --verbose submit: the job's actors keep their output on the log stream
    runtime_env = with_log_level(job_client.load_runtime_env(args.runtime_env, args.working_dir))
    client = job_server(args)
    job_id = job_client.submit(client, cai_args, runtime_env, args.job_id)
    if args.no_wait:
        print(job_id)
        return 0
    print(f"cai: submitted {job_id} to {client.get_address()}; following its logs (Ctrl-C detaches)", file=sys.stderr)
    try:
        job_client.stream_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\ncai: detached; job {job_id} keeps running (cai jobs stop {job_id} ends it)", file=sys.stderr)
        return job_client.DETACHED_EXIT_CODE
    status = job_client.final_status(client, job_id)
    print(f"cai: job {job_id} {status}", file=sys.stderr)
    return job_client.exit_code(status)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from workflows.runtime import job_client

    jobs = job_client.list_jobs(job_server(args))
    if args.json:
        print_json(jobs)
    else:
        print(job_client.job_table(jobs))
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from workflows.runtime import job_client

    print_json(job_client.job_status(job_server(args), args.job_id))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from workflows.runtime import job_client

    client = job_server(args)
    if not args.follow:
        print(job_client.job_logs(client, args.job_id), end="")
        return 0
    try:
        job_client.stream_logs(client, args.job_id)
    except KeyboardInterrupt:
        return job_client.DETACHED_EXIT_CODE
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from workflows.runtime import job_client

    stopped = job_client.stop_job(job_server(args), args.job_id)
    print(f"cai: {'stopping' if stopped else 'already ended:'} {args.job_id}", file=sys.stderr)
    return 0


def address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None,
        help="Ray job server (dashboard) URL; default: $RAY_DASHBOARD_ADDRESS, an http(s) $RAY_ADDRESS, "
        "or http://127.0.0.1:8265. The token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, "
        "and goes only to a server that asks for it (or with RAY_AUTH_MODE=token)",
    )
    parser.add_argument(
        "--allow-http-token", action="store_true",
        help="send the token over plain http:// to a host that is not the loopback (it crosses the network "
        "unencrypted); without it such a server is refused: use https:// or a tunnel to 127.0.0.1",
    )


def submit_arguments(parser: argparse.ArgumentParser) -> None:
    address_argument(parser)
    parser.add_argument("--working-dir", help="local directory uploaded as the job's working_dir "
                        "(without excludes in --runtime-env: .venv, .git, runs, __pycache__, weights are left out)")
    parser.add_argument("--runtime-env", help="YAML file with the job's runtime_env (e.g. cluster/runtime_env.yaml)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument("--job-id", help="submission id to use (default: one Ray generates)")
    parser.add_argument("cai_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                        help="the cai command to run on the cluster")


def jobs_list_arguments(parser: argparse.ArgumentParser) -> None:
    address_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def job_id_arguments(parser: argparse.ArgumentParser) -> None:
    address_argument(parser)
    parser.add_argument("job_id", metavar="ID", help="submission id (printed by cai submit, listed by cai jobs list)")


def jobs_logs_arguments(parser: argparse.ArgumentParser) -> None:
    job_id_arguments(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="stream new output until the job ends")


# -- cai run / cai status -----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from workflows.pipeline import run_pipeline

    record = run_pipeline(pipeline_config(args))
    for name, stage in record["stages"].items():
        print(f"{name:<9} {'skipped' if stage.get('skipped') else stage['status']:<8} {stage['out']}")
    if record.get("analysis"):
        print(f"analysis: {record['analysis']}")
    if record.get("report"):
        print(f"report: {record['report']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Lives here, not in workflows.plan: the pipeline imports that module for `cai run`'s check."""
    from workflows.pipeline import plan
    from workflows.plan import print_plan

    cfg = pipeline_config(args)
    return print_plan(cfg.model, plan(cfg), args, cfg.gpu_memory_gib)


def pipeline_config(args: argparse.Namespace):
    """`cai run`'s and `cai plan`'s pipeline config: the YAML, its overrides, then --gpu-memory-gib."""
    from dataclasses import replace

    from workflows.pipeline import load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides)
    return replace(cfg, gpu_memory_gib=args.gpu_memory_gib) if args.gpu_memory_gib is not None else cfg


def cmd_status(args: argparse.Namespace) -> int:
    from workflows.cli.status import format_status, run_status

    status = run_status(args.dir)
    if args.json:
        print_json(status)
    else:
        print(format_status(status))
    return 0


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, values read as YAML")
    gpu_memory_argument(parser)


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a cai run directory or one stage's output directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")

"""``cai submit`` and ``cai jobs``: run any ``cai`` command as a Ray Job on a cluster.

``cai submit [options] -- generate --config ...`` sends the entrypoint ``cai generate
--config ...`` (shell-quoted) to the cluster's job server through
``ray.job_submission.JobSubmissionClient``, streams the driver's logs, and exits with the
job's final status:

    SUCCEEDED -> 0    FAILED -> 1    STOPPED -> 130 (stopped by ``cai jobs stop``/the dashboard)

A Ctrl-C while following only detaches: the job keeps running (``cai jobs stop ID`` ends it)
and ``cai submit`` exits 130 as well. Connection and authentication failures are user errors
(``cai: error: ...``, exit 2).

**Address.** ``--address``, else ``RAY_DASHBOARD_ADDRESS``, else ``RAY_ADDRESS`` when it is an
``http(s)://`` URL (inside a cluster ``RAY_ADDRESS`` is the GCS ``host:6379``, which is not the
job server), else ``http://127.0.0.1:8265``, the end of a ``kubectl port-forward`` or
``ssh -L`` tunnel.

**Token authentication (Ray 2.60).** A cluster enforces tokens when its processes run with
``RAY_AUTH_MODE=token`` (read once, when ray is imported; ``ray start --head`` also
turns it on by itself when ``RAY_AUTH_MODE`` is unset and a token already exists, see
``ray._private.authentication.authentication_token_setup.maybe_enable_token_auth_if_token_available``).
:func:`workflows.runtime.ray_auth.find_token` finds the token where Ray's C++ loader does:
``RAY_AUTH_TOKEN`` (the value), ``RAY_AUTH_TOKEN_PATH`` (a file; unreadable or empty is an
error), ``~/.ray/auth_token``.
The dashboard's middleware (``ray._private.authentication.http_token_authentication``) reads
``Authorization: Bearer <token>`` (or ``X-Ray-Authorization``, or the
``ray-authentication-token`` cookie) and answers 401 when it is missing, 403 when wrong.
Ray's own ``JobSubmissionClient``/``ray job submit`` add that header only when the *client*
runs with ``RAY_AUTH_MODE=token`` (``get_auth_headers_if_auth_enabled``). ``cai`` sends it
by the rule ``ray start`` uses: when ``RAY_AUTH_MODE=token``, or when it is unset and a
token is found; never with ``RAY_AUTH_MODE=disabled`` (a header is harmless to a server
without auth). So ``export RAY_AUTH_TOKEN=...`` (or a token file) is all a client needs; the
other commands join a cluster's GCS with the same token (:mod:`workflows.runtime.ray_session`). On
KubeRay the token is the ``auth_token`` key of the cluster's Secret (docs/cluster.md).

A first word ``cai`` (or a path ending in ``/cai``) after ``--`` is dropped, so the Ray habit
``cai submit -- cai generate ...`` submits ``cai generate ...`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from core.config import ConfigError
from workflows.runtime import ray_auth

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
DETACHED_EXIT_CODE = 130
# Applied when --working-dir is given and the runtime env names no excludes: a virtualenv or
# run directory in the upload would blow Ray's package size limit.
DEFAULT_EXCLUDES = (".venv", "venv", ".git", "runs", "__pycache__", "*.parquet", "*.safetensors")


class JobClientError(RuntimeError):
    """The job server could not be reached, refused our token, or rejected a request."""


# -- address and token --------------------------------------------------------------------


def dashboard_address(address: str | None = None) -> str:
    """The job server URL: the flag, then RAY_DASHBOARD_ADDRESS, then an http(s) RAY_ADDRESS."""
    if address:
        candidate = address
    elif os.environ.get("RAY_DASHBOARD_ADDRESS"):
        candidate = os.environ["RAY_DASHBOARD_ADDRESS"]
    elif os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        candidate = os.environ["RAY_ADDRESS"]
    else:
        candidate = DEFAULT_ADDRESS
    if not candidate.startswith(("http://", "https://")):
        raise JobClientError(f"job server address {candidate!r} must start with http:// or https://")
    return candidate.rstrip("/")


def auth_headers() -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` by ``ray start``'s rule (module doc), else ``{}``."""
    mode = ray_auth.auth_mode()
    if mode == "disabled":
        return {}
    token = ray_auth.find_token()  # raises on an unreadable RAY_AUTH_TOKEN_PATH
    if token.value is None:
        if mode == "token":
            raise JobClientError(f"RAY_AUTH_MODE=token but {token.source}: set RAY_AUTH_TOKEN, point "
                                 "RAY_AUTH_TOKEN_PATH at a token file, or write ~/.ray/auth_token")
        return {}
    return {"authorization": f"Bearer {token.value}"}


@contextlib.contextmanager
def job_errors(address: str):
    """Turn the SDK's connection, HTTP and auth exceptions into one :class:`JobClientError`."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobClientError:
        raise
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise JobClientError(
            f"{address} refused the request ({first}); set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "to the cluster's token (docs/cluster.md)"
        ) from None
    except aiohttp.WSServerHandshakeError as exc:
        raise JobClientError(f"{address} refused the log stream (HTTP {exc.status}): check the token") from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientError, OSError) as exc:
        raise JobClientError(
            f"cannot reach the Ray job server at {address} ({exc}); is the cluster up and the port forwarded?"
        ) from None
    except RuntimeError as exc:  # the SDK's non-2xx answers, e.g. an unknown job id
        raise JobClientError(f"{address}: {exc}") from None


def connect_jobs(address: str | None = None):
    """A ``JobSubmissionClient`` for the resolved address, carrying the token header."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    headers = auth_headers()
    # The SDK replaces its address argument with RAY_API_SERVER_ADDRESS or RAY_ADDRESS when
    # either is set; pin the variable it reads first so --address means what it says.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        with job_errors(url):
            return JobSubmissionClient(url, headers=headers)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


# -- what gets submitted ------------------------------------------------------------------


def command_args(cai_args: list[str]) -> list[str]:
    """The ``cai`` arguments after ``--`` (argparse keeps the ``--`` in a REMAINDER), without a
    leading ``cai`` or ``/path/to/cai`` (``ray job submit -- <full command>`` habit)."""
    if cai_args and cai_args[0] == "--":
        cai_args = cai_args[1:]
    if cai_args and os.path.basename(cai_args[0]) == "cai":
        cai_args = cai_args[1:]
    if not cai_args:
        raise ConfigError("cai submit needs a command after '--', e.g. cai submit -- generate --config FILE")
    return list(cai_args)


def entrypoint(cai_args: list[str]) -> str:
    """The shell command the job runs: ``cai`` and the arguments, each quoted."""
    return shlex.join(["cai", *command_args(cai_args)])


def load_runtime_env(path: str | None, working_dir: str | None) -> dict[str, Any]:
    """The job's runtime env: a YAML mapping (safe_load) and/or a working_dir."""
    runtime_env: dict[str, Any] = {}
    if path:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--runtime-env {path}: expected a mapping of runtime_env fields, got {type(loaded).__name__}")
        runtime_env = dict(loaded or {})
    if working_dir:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = working_dir
        runtime_env.setdefault("excludes", list(DEFAULT_EXCLUDES))
    return runtime_env


def submit(client, cai_args: list[str], runtime_env: dict[str, Any], job_id: str | None = None) -> str:
    """Submit ``cai <args>``; returns the submission id."""
    args = command_args(cai_args)
    with job_errors(client.get_address()):
        return client.submit_job(
            entrypoint=entrypoint(args),
            submission_id=job_id,
            runtime_env=runtime_env or None,
            metadata={"cai_command": args[0]},
        )


# -- following a job ----------------------------------------------------------------------


def stream_logs(client, job_id: str, out: TextIO = sys.stdout) -> None:
    """Print the job's logs as they arrive, until the job ends."""

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with job_errors(client.get_address()):
        asyncio.run(follow())


def final_status(client, job_id: str, poll_s: float = 0.5) -> str:
    """Wait until the job is terminal (the log stream can close a moment before) and return it."""
    with job_errors(client.get_address()):
        while True:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                return status.value
            time.sleep(poll_s)


def exit_code(status: str) -> int:
    """SUCCEEDED 0, FAILED 1, STOPPED 130."""
    return EXIT_CODES[status]


def list_jobs(client) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first."""
    with job_errors(client.get_address()):
        jobs = client.list_jobs()
    return [job_summary(job) for job in sorted(jobs, key=lambda job: job.start_time or 0)]


def job_status(client, job_id: str) -> dict[str, Any]:
    with job_errors(client.get_address()):
        return job_summary(client.get_job_info(job_id))


def job_logs(client, job_id: str) -> str:
    with job_errors(client.get_address()):
        return client.get_job_logs(job_id)


def stop_job(client, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    with job_errors(client.get_address()):
        return client.stop_job(job_id)


def job_table(jobs: list[dict[str, Any]]) -> str:
    """``cai jobs list`` as aligned columns."""
    rows = [("SUBMISSION ID", "STATUS", "START (UTC)", "ENTRYPOINT")]
    rows += [(j["submission_id"] or "-", j["status"], j["start_time"] or "-", j["entrypoint"]) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)


def job_summary(info) -> dict[str, Any]:
    """The fields of a ``JobDetails``/``JobInfo`` worth printing."""
    return {
        "submission_id": getattr(info, "submission_id", None),
        "status": info.status.value,
        "entrypoint": info.entrypoint,
        "message": info.message,
        "error_type": info.error_type,
        "start_time": _utc(info.start_time),
        "end_time": _utc(info.end_time),
        "metadata": info.metadata or {},
    }


def _utc(millis: int | None) -> str | None:
    if not millis:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(millis / 1000))

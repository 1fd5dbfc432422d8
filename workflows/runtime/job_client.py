"""``cai submit`` and ``cai jobs``: run any ``cai`` command as a Ray Job on a cluster.

``cai submit [options] -- generate --config ...`` sends the entrypoint ``cai generate
--config ...`` (shell-quoted) to the cluster's job server through Ray's Jobs REST API
(:class:`JobServer`), streams the driver's logs, and exits with the job's final status:

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
runs with ``RAY_AUTH_MODE=token`` (``get_auth_headers_if_auth_enabled``). ``cai`` sends the token
it found (:class:`JobAuth`):

- with every request when ``RAY_AUTH_MODE=token``;
- when the mode is unset, only to a server that answered 401 to a request without it: the first
  request of each command is a small ``GET /api/version`` without the token, so a token file in
  ``~/.ray`` never goes to a cluster without auth, or to another cluster's server;
- never with ``RAY_AUTH_MODE=disabled``;
- never over plain ``http://`` to a host that is not the loopback (anyone on the path would read
  it) unless ``--allow-http-token``: use ``https://``, or a ``kubectl port-forward``/``ssh -L``
  tunnel to ``127.0.0.1``.

So ``export RAY_AUTH_TOKEN=...`` (or a token file) is all a client needs; the
other commands join a cluster's GCS with the same token (:mod:`workflows.runtime.ray_session`). On
KubeRay the token is the ``auth_token`` key of the cluster's Secret (docs/cluster.md).

**Why REST, not ``JobSubmissionClient``.** Ray's SDK (2.60) replaces the address it is
given with ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` whenever either is set
(``ray.dashboard.utils.get_address_for_submission_client``), so ``--address`` could not mean
what it says on a machine that exports ``RAY_ADDRESS=head:6379`` for the other commands.
The REST API (docs.ray.io, "Ray Jobs REST API") is the same server the SDK talks to:
``POST /api/jobs/``, ``GET /api/jobs/``, ``GET /api/jobs/{id}``, ``GET /api/jobs/{id}/logs``,
``POST /api/jobs/{id}/stop`` and the ``/api/jobs/{id}/logs/tail`` websocket. A local
``--working-dir`` is zipped here (files at the archive's top level, as Ray's own packages
are), uploaded once with ``PUT /api/packages/gcs/_ray_pkg_<sha1>.zip`` and named by that
``gcs://`` URI in the job's runtime env; a working_dir that is already a URI passes through.

A first word ``cai`` (or a path ending in ``/cai``) after ``--`` is dropped, so the Ray habit
``cai submit -- cai generate ...`` submits ``cai generate ...`` too.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import io
import ipaddress
import os
import shlex
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from core.config import ConfigError
from workflows.runtime import ray_auth

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
DETACHED_EXIT_CODE = 130
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MAX_PACKAGE_BYTES = 512 * 2**20  # Ray 2.60 refuses packages this large (runtime_env.packaging.GCS_STORAGE_MAX_SIZE)
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


def loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class JobAuth:
    """Which token a command may send to one job server, and when (the module doc's rule)."""

    token: str | None  # the token found; None: none found, or RAY_AUTH_MODE=disabled
    source: str  # where it was read from, for messages
    upfront: bool  # RAY_AUTH_MODE=token: every request carries it
    refused: str | None  # why it must not go to this server (plain HTTP to another host), else None

    @classmethod
    def for_server(cls, url: str, *, allow_http_token: bool = False) -> JobAuth:
        mode = ray_auth.auth_mode()
        if mode == "disabled":
            return cls(None, "RAY_AUTH_MODE=disabled", upfront=False, refused=None)
        found = ray_auth.find_token()  # raises on an unreadable RAY_AUTH_TOKEN_PATH
        if found.value is None and mode == "token":
            raise JobClientError(f"RAY_AUTH_MODE=token but {found.source}: set RAY_AUTH_TOKEN, point "
                                 "RAY_AUTH_TOKEN_PATH at a token file, or write ~/.ray/auth_token")
        refused = None
        if found.value is not None and url.startswith("http://") and not loopback(url) and not allow_http_token:
            refused = (f"{url} is plain http:// to another host, so the token from {found.source} would cross "
                       "the network unencrypted; use https://, or a tunnel to 127.0.0.1 (kubectl port-forward, "
                       "ssh -L), or pass --allow-http-token")
        if mode == "token" and refused:
            raise JobClientError(f"RAY_AUTH_MODE=token, but {refused}")
        return cls(found.value, found.source, upfront=mode == "token", refused=refused)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


class JobServer:
    """Ray's Jobs REST API at ``url``, every request carrying ``headers`` (the token)."""

    def __init__(self, url: str, auth: JobAuth, timeout_s: float = 30.0):
        self.url, self.auth, self.timeout_s = url, auth, timeout_s
        self.headers = auth.headers() if auth.upfront else {}  # the token once the server asked for it

    def get_address(self) -> str:
        return self.url

    def request(self, method: str, path: str, *, missing: str | None = None, **kwargs) -> Any:
        """One call; the JSON answer, or :class:`JobClientError` naming what went wrong. A 401
        to a request without the token is answered once more with it, where the token may go."""
        response = self._send(method, path, **kwargs)
        if response.status_code == 401 and not self.headers and self.auth.token:
            if self.auth.refused:
                raise JobClientError(f"{self.url} asks for a token, but {self.auth.refused}")
            self.headers = self.auth.headers()
            response = self._send(method, path, **kwargs)
        if response.status_code in (401, 403):
            raise JobClientError(
                f"{self.url} refused the request (HTTP {response.status_code}: "
                f"{'no token' if response.status_code == 401 else 'wrong token'}); set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH to the cluster's token (docs/cluster.md)")
        if response.status_code == 404 and missing:
            raise JobClientError(f"{self.url}: {missing}")
        if not response.ok:
            text = response.text.strip().splitlines()
            raise JobClientError(f"{self.url}: {method} {path} answered HTTP {response.status_code}"
                                 + (f": {text[-1]}" if text else ""))
        return response.json() if response.content else None

    def _send(self, method: str, path: str, **kwargs):
        import requests

        try:
            return requests.request(method, self.url + path, headers=self.headers, timeout=self.timeout_s, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise JobClientError(
                f"cannot reach the Ray job server at {self.url} ({exc}); is the cluster up and the port forwarded?"
            ) from None

    def submit_job(self, *, entrypoint: str, submission_id: str | None, runtime_env: dict[str, Any],
                   metadata: dict[str, str]) -> str:
        body = {"entrypoint": entrypoint, "submission_id": submission_id,
                "runtime_env": self.uploaded(runtime_env), "metadata": metadata}
        return self.request("POST", "/api/jobs/", json=body)["submission_id"]

    def get_job_info(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{job_id}", missing=f"no job {job_id!r}")

    def list_jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/jobs/")

    def get_job_logs(self, job_id: str) -> str:
        return self.request("GET", f"/api/jobs/{job_id}/logs", missing=f"no job {job_id!r}")["logs"]

    def stop_job(self, job_id: str) -> bool:
        return self.request("POST", f"/api/jobs/{job_id}/stop", missing=f"no job {job_id!r}")["stopped"]

    async def tail_job_logs(self, job_id: str):
        """The job's log text as it arrives, until the server closes the stream (the job ended)."""
        import aiohttp

        try:
            async with aiohttp.ClientSession(headers=self.headers) as session:
                async with session.ws_connect(f"{self.url}/api/jobs/{job_id}/logs/tail") as ws:
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            yield message.data
                        elif message.type == aiohttp.WSMsgType.ERROR:
                            raise JobClientError(f"{self.url}: the log stream of {job_id} broke ({ws.exception()})")
                    if ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:
                        raise JobClientError(f"{self.url}: the log stream of {job_id} closed before the job ended")
        except aiohttp.WSServerHandshakeError as exc:
            raise JobClientError(f"{self.url} refused the log stream of {job_id} (HTTP {exc.status}): "
                                 "check the token and the job id") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JobClientError(f"cannot reach the Ray job server at {self.url} ({exc})") from None

    def uploaded(self, runtime_env: dict[str, Any]) -> dict[str, Any]:
        """``runtime_env`` with a local working_dir replaced by the ``gcs://`` URI of its upload."""
        working_dir = runtime_env.get("working_dir")
        if not working_dir or "://" in working_dir:
            return runtime_env
        package = zip_directory(Path(working_dir), runtime_env.get("excludes", ()))
        name = f"_ray_pkg_{hashlib.sha1(package).hexdigest()}.zip"
        if len(package) >= MAX_PACKAGE_BYTES:
            raise ConfigError(f"--working-dir {working_dir}: {len(package) / 2**20:.0f} MiB zipped, over Ray's "
                              f"{MAX_PACKAGE_BYTES // 2**20} MiB package limit; add excludes to the runtime env")
        self.request("PUT", f"/api/packages/gcs/{name}", data=package)
        return {key: value for key, value in runtime_env.items() if key != "excludes"} | {"working_dir": f"gcs://{name}"}


def zip_directory(root: Path, excludes) -> bytes:
    """The files under ``root`` as one zip (paths relative to ``root``), leaving out ``excludes``:
    a pattern matches a path component (``*.parquet``, ``runs``, ``big/``) or, with an inner
    ``/``, the path from ``root`` (``data/raw/*``)."""
    def left_out(rel: PurePosixPath, is_dir: bool) -> bool:
        for pattern in excludes:
            dir_only = pattern.endswith("/")
            pattern = pattern.strip("/")
            if "/" in pattern:
                if fnmatch.fnmatch(str(rel), pattern):
                    return not dir_only or is_dir
            elif fnmatch.fnmatch(rel.name, pattern) and (is_dir or not dir_only):
                return True
        return False

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, dirs, files in os.walk(root):
            base = PurePosixPath(Path(folder).relative_to(root).as_posix())
            dirs[:] = sorted(d for d in dirs if not left_out(base / d, True))
            for name in sorted(files):
                if not left_out(base / name, False):
                    archive.write(Path(folder) / name, str(base / name))
    return buffer.getvalue()


def connect_jobs(address: str | None = None, *, allow_http_token: bool = False) -> JobServer:
    """The job server at the resolved address, reached once (``GET /api/version``), which
    settles whether it wants the token before anything large is sent."""
    url = dashboard_address(address)
    server = JobServer(url, JobAuth.for_server(url, allow_http_token=allow_http_token))
    server.request("GET", "/api/version")
    return server


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
    return client.submit_job(entrypoint=entrypoint(args), submission_id=job_id, runtime_env=runtime_env,
                             metadata={"cai_command": args[0]})


# -- following a job ----------------------------------------------------------------------


def stream_logs(client, job_id: str, out: TextIO = sys.stdout) -> None:
    """Print the job's logs as they arrive, until the job ends."""

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(follow())


def final_status(client, job_id: str, poll_s: float = 0.5) -> str:
    """Wait until the job is terminal (the log stream can close a moment before) and return it."""
    while True:
        status = client.get_job_info(job_id)["status"]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    """SUCCEEDED 0, FAILED 1, STOPPED 130."""
    return EXIT_CODES[status]


def list_jobs(client) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first."""
    jobs = client.list_jobs()
    return [job_summary(job) for job in sorted(jobs, key=lambda job: job.get("start_time") or 0)]


def job_status(client, job_id: str) -> dict[str, Any]:
    return job_summary(client.get_job_info(job_id))


def job_logs(client, job_id: str) -> str:
    return client.get_job_logs(job_id)


def stop_job(client, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return client.stop_job(job_id)


def job_table(jobs: list[dict[str, Any]]) -> str:
    """``cai jobs list`` as aligned columns."""
    rows = [("SUBMISSION ID", "STATUS", "START (UTC)", "ENTRYPOINT")]
    rows += [(j["submission_id"] or "-", j["status"], j["start_time"] or "-", j["entrypoint"]) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)


def job_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The fields of a job's ``JobDetails`` worth printing."""
    return {
        "submission_id": info.get("submission_id"),
        "status": info["status"],
        "entrypoint": info["entrypoint"],
        "message": info.get("message"),
        "error_type": info.get("error_type"),
        "start_time": _utc(info.get("start_time")),
        "end_time": _utc(info.get("end_time")),
        "metadata": info.get("metadata") or {},
    }


def _utc(millis: int | None) -> str | None:
    if not millis:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(millis / 1000))

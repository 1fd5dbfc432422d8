"""A real `ray start --head` for tests, isolated from every other Ray on the machine.

Free ports for every port Ray opens, a short temp dir of its own, its own process group
(stopped by that group: never `ray stop`, which stops every Ray on the machine), and an
environment without inherited ``RAY_*`` settings, so a test decides the token a process sees.
Used by test_submit.py (through cluster/start-local.sh) and test_join.py (plain `ray start`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 90


def free_ports(n: int) -> list[int]:
    """Ports free on every interface: Ray binds some on the node's IP, not only 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_port_flags() -> list[str]:
    """`ray start` flags giving every port but the GCS and dashboard ones a free number."""
    names = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")
    return [item for name, port in zip(names, free_ports(len(names))) for item in (name, str(port))]


def short_temp_dir(prefix: str) -> Path:
    """A fresh directory under /tmp: Ray's unix socket paths under it must stay under ~107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting, .venv/bin first.

    A head started with it stops at once on SIGTERM: Ray 2.60's `ray start --block` otherwise
    drains its node for up to 30 s first (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, for Serve
    replicas behind a proxy; a test head has none), and every teardown waited that out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_CAI_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):  # see conftest.py
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


def start_head(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `ray start ... --block` (or a script exec'ing it) in a new process group."""
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_head(proc: subprocess.Popen, log_path: Path, ready) -> None:
    """Poll ``ready()`` until it is true; raise with the log's tail when the head exits or stalls."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray head did not come up in {HEAD_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its node; then kill what is left of the process
    group it leads (started with start_new_session=True)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)

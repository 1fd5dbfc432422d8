"""Keep third-party start-up noise out of the user's terminal, not out of the Ray logs.

Ray streams each worker's ``worker-*.out``/``.err`` files (its stdout and stderr) to the
driver's terminal. A vLLM engine prints about a dozen warnings, progress bars and C++ notices
as it starts (and its engine-core child process inherits the same streams). An actor that
hosts one calls :func:`divert_output` first: its stdout and stderr (and its children's) then go
to ``cai-<label>-<pid>.log`` in the same Ray logs folder, visible in the dashboard's Logs view
and in ``ray logs``, but not forwarded to the driver. Errors still reach the caller as the
actor's exceptions.

A Ray Train worker must keep its own progress lines (``cai train ppo: step ...``) on the
terminal, so it diverts only the libraries: :func:`route_library_logs` sends the
``transformers`` logger and Python warnings to ``cai-<label>-<pid>.log`` and turns off
transformers' progress bars; Ray Train's own INFO lines stay in its ``ray-train-sys-worker``
log files (``RunConfig(logging_config=LoggingConfig(log_level=train_log_level()))``).

``RAY_CAI_LOG_LEVEL=debug`` (``cai --verbose``, which passes it to every worker of the job)
keeps everything on the terminal, as Ray would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_LEVEL_ENV = "RAY_CAI_LOG_LEVEL"


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").strip().lower() == "debug"


def with_log_level(runtime_env: dict | None) -> dict | None:
    """``runtime_env`` carrying ``RAY_CAI_LOG_LEVEL=debug`` to every worker when verbose (else as given)."""
    if not verbose():
        return runtime_env
    env = dict(runtime_env or {})
    return {**env, "env_vars": {**env.get("env_vars", {}), LOG_LEVEL_ENV: "debug"}}


def train_log_level() -> str:
    """Ray Train's console level: its INFO lines (each report's metrics, checkpoint paths) only
    in its own log files unless verbose."""
    return "DEBUG" if verbose() else "WARNING"


def worker_log_file(label: str) -> Path | None:
    """``cai-<label>-<pid>.log`` in this Ray worker's logs folder, or None when verbose or not
    inside a Ray worker (a terminal, a test process: left alone)."""
    if verbose():
        return None
    try:
        current = Path(os.readlink("/proc/self/fd/1"))  # Ray's worker-<id>-<job>-<pid>.out (Linux)
    except OSError:
        return None
    if not (current.name.startswith("worker-") and current.suffix == ".out"):
        return None
    return current.parent / f"cai-{label}-{os.getpid()}.log"


def divert_output(label: str) -> Path | None:
    """Point this Ray worker's stdout and stderr at :func:`worker_log_file`; returns that file."""
    target = worker_log_file(label)
    if target is None:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return target


def route_library_logs(label: str) -> Path | None:
    """Send the ``transformers`` logger and Python warnings to :func:`worker_log_file` and turn
    off transformers' progress bars (loading and writing weights); returns the file."""
    target = worker_log_file(label)
    if target is None:
        return None
    import logging

    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    hf_logging.disable_progress_bar()
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    return target

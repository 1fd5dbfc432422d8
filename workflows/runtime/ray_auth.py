"""Where a ``cai`` command finds a Ray cluster's token, and the one-line errors about it.

Ray 2.60's C++ ``AuthenticationTokenLoader`` (``src/ray/rpc/authentication/
authentication_token_loader.cc``) takes the first of, in order:

1. ``RAY_AUTH_TOKEN``: the value, whitespace stripped at both ends (set but blank: no token,
   and the later sources are not read);
2. ``RAY_AUTH_TOKEN_PATH``: the file's first line, stripped; unreadable or empty is an error;
3. ``$HOME/.ray/auth_token``: the same, but unreadable or empty just means no token.

(Ray also reads a Kubernetes service-account token when ``RAY_ENABLE_K8S_TOKEN_AUTH`` is on;
such pods export ``RAY_AUTH_MODE=token`` and leave finding the token to Ray, see
:func:`workflows.runtime.ray_session.connect_ray`.) :func:`find_token` reads the same sources in
plain Python, so that ``cai submit`` (an HTTP header) and ``connect_ray`` (the GCS) agree on
the token and every error can say which source it came from. Nothing here imports ``ray``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# std::isspace in the C locale: what Ray's TrimWhitespace strips (str.strip() strips more).
_WHITESPACE = " \t\n\r\f\v"
_FIX = ("set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head prints it), "
        "or put it in a file named by RAY_AUTH_TOKEN_PATH or in ~/.ray/auth_token")


class RayAuthError(RuntimeError):
    """No usable token for a Ray cluster, or the cluster refused the one this process sent."""


@dataclass(frozen=True)
class FoundToken:
    """A token and where it came from, or ``value=None`` and why there is none."""

    value: str | None
    # Where it came from ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH (/x)", "~/.ray/auth_token (/h/.ray/
    # auth_token)") or, without a value, why there is none ("none was found (...)"): for messages.
    source: str


def auth_mode(env: Mapping[str, str] | None = None) -> str | None:
    """``RAY_AUTH_MODE`` as Ray reads it: None when unset; any value but "token" means disabled."""
    mode = (os.environ if env is None else env).get(MODE_ENV)
    return None if mode is None else ("token" if mode.lower() == "token" else "disabled")


def default_token_file(env: Mapping[str, str] | None = None) -> Path:
    """``$HOME/.ray/auth_token``; Ray uses ``./.ray/auth_token`` when HOME is unset or empty."""
    home = (os.environ if env is None else env).get("HOME") or "."
    return Path(home) / ".ray" / "auth_token"


def find_token(env: Mapping[str, str] | None = None) -> FoundToken:
    """The token Ray's loader would use, from the first source that is set (see the module doc).

    Raises :class:`RayAuthError` when ``RAY_AUTH_TOKEN_PATH`` names a missing, unreadable or
    empty file: Ray's loader refuses that too (it aborts the process).
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        token = env[TOKEN_ENV].strip(_WHITESPACE)
        return FoundToken(token, TOKEN_ENV) if token else FoundToken(None, f"{TOKEN_ENV} is blank")
    if env.get(TOKEN_PATH_ENV):
        path = env[TOKEN_PATH_ENV]
        token = _first_line(Path(path))
        if not token:
            raise RayAuthError(f"{TOKEN_PATH_ENV}={path} is not a readable file with a token on its first line; "
                               f"point it at the cluster's token file, or unset it")
        return FoundToken(token, f"{TOKEN_PATH_ENV} ({path})")
    path = default_token_file(env)
    token = _first_line(path)
    if token:
        return FoundToken(token, f"~/.ray/auth_token ({path})")
    return FoundToken(None, f"none was found ({TOKEN_ENV} and {TOKEN_PATH_ENV} are unset and {path} "
                            "is missing or empty)")


def _first_line(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip(_WHITESPACE) or None


def token_error(address: str, token: FoundToken) -> RayAuthError:
    """The one-line error for a cluster that refused ``token``, or wanted one and got none."""
    if token.value is not None:
        return RayAuthError(f"the Ray cluster at {address} refused the token from {token.source}; {_FIX}")
    fix = f"unset {MODE_ENV}, then {_FIX}" if token.source.startswith(MODE_ENV) else _FIX
    return RayAuthError(f"the Ray cluster at {address} requires a token and {token.source}; {fix}")

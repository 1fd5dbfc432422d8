"""One way into Ray for every command: join ``RAY_ADDRESS`` or start a local instance.

Local instances bind the dashboard to 127.0.0.1 (never to the world) and keep Ray's default
token authentication (on for a new local cluster). Actors live in the ``cai`` namespace so
``ray list actors`` and the dashboard show them under their ``cai-<stage>-<run>-<i>`` names.

**Joining a cluster that enforces tokens (Ray 2.60).** ``ray start --head`` enforces tokens by
itself when a token exists, but a driver's ``ray.init(address=...)`` sends one only when the
process runs with ``RAY_AUTH_MODE=token``; without it the GCS answers ``InvalidAuthToken`` and
``ray.init`` retries for 20 s before raising a bare ``ConnectionError``. Nor can a driver turn
token mode on whenever it finds a token (``ray start``'s rule): in token mode its own gRPC
server refuses callers without one, and on a cluster without auth its actors then die before
they start (measured). So ``connect_ray`` asks the GCS first, before importing ``ray`` (Ray
reads ``RAY_AUTH_MODE`` once, at import): one gRPC call to its ``GetClusterId`` with grpcio's
public client, with or without the ``authorization: Bearer`` metadata Ray's own clients send.

    RAY_AUTH_MODE=token          send the token found (workflows.runtime.ray_auth.find_token);
                                 refused on a cluster without auth (its actors would die)
    RAY_AUTH_MODE=<other>        send none
    unset; GCS takes no token    send none: the cluster has no auth
    unset; GCS wants a token     turn this process's token mode on, send the token found
    unset; GCS not reachable     ``ray start``'s rule: token mode when a token is found

A refused token, or no token for a cluster that wants one, is a one-line
:class:`~workflows.runtime.ray_auth.RayAuthError` that names the token's source, raised in well under
a second. ``cai submit`` sends the same token over HTTP by ``ray start``'s rule alone.

**Reaping engine processes.** A vLLM engine's EngineCore and tensor-parallel workers are child
processes of its actor, not Ray workers. A local instance is started with
``RAY_process_group_cleanup_enabled=1`` (unless the environment sets it): its raylet then puts
every worker in a process group of its own and kills that group when the worker exits, however
it exits. Ray 2.60 has it on by default; setting it keeps the promise if that default changes.
A cluster that cai joins has its own raylets: docs/cluster.md says what to set there.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from actors.process_output import with_log_level
from core.run_identity import NAMESPACE
from workflows.runtime import ray_auth
from workflows.runtime.ray_auth import FoundToken

DASHBOARD_ENV = "RAY_CAI_DASHBOARD"
# read by each raylet when it starts (a RayConfig entry, Ray 2.60): see the module doc
REAP_CHILDREN_ENV = "RAY_process_group_cleanup_enabled"
PROBE_TIMEOUT_S = 3.0
_dashboard_url: str | None = None
_started_local = False


def connect_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Connect (or start) Ray once per process and describe the cluster.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster, sending its token when it needs
    one (see the module doc); without either, a local instance is sized to this machine (or to
    ``num_cpus``/``num_gpus``). The dashboard of a local instance is on unless
    ``include_dashboard=False`` or ``RAY_CAI_DASHBOARD=0``.
    """
    global _dashboard_url, _started_local
    if not _initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # with --verbose, every worker of the job keeps its third-party output on the terminal too
        common = {"namespace": NAMESPACE, "runtime_env": with_log_level(runtime_env), "log_to_driver": True}
        if address and address != "local":
            info = _join(address, common)
            _started_local = False
        else:
            import ray

            if include_dashboard is None:
                include_dashboard = os.environ.get(DASHBOARD_ENV, "1") != "0"
            os.environ.setdefault(REAP_CHILDREN_ENV, "1")  # the raylet that ray.init starts inherits it
            info = ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                dashboard_host="127.0.0.1",
                **common,
            )
            _started_local = True
        _dashboard_url = info.dashboard_url or None
    return describe_cluster()


def _initialized() -> bool:
    """Whether this process is connected, without importing ray (see :func:`_choose_token`)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def describe_cluster() -> dict[str, Any]:
    """The cluster this process is connected to; ``local`` is True when connect_ray started it."""
    import ray

    context = ray.get_runtime_context()
    resources = ray.cluster_resources()
    return {
        "address": context.gcs_address,
        "namespace": context.namespace,
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        "dashboard_url": _dashboard_url,
        "local": _started_local,
    }


# -- joining ------------------------------------------------------------------------------


def _join(address: str, common: dict[str, Any]):
    """``ray.init(address=...)`` with the token the cluster needs; auth failures as RayAuthError."""
    token = _choose_token(address)
    import ray

    try:
        return ray.init(address=address, **common)
    except Exception as exc:
        if _is_auth_failure(exc):  # e.g. RAY_AUTH_MODE=token and no token anywhere
            raise ray_auth.token_error(address, token) from None
        raise


def _choose_token(address: str) -> FoundToken:
    """Put this process in the auth mode the cluster needs and return the token it will send."""
    mode = ray_auth.auth_mode()
    if mode == "disabled":
        token = FoundToken(None, f"{ray_auth.MODE_ENV}={os.environ[ray_auth.MODE_ENV]} sends none")
        if _gcs_refuses(address, None):
            raise ray_auth.token_error(address, token)
        return token
    token = ray_auth.find_token()
    if mode == "token":
        if token.value and _gcs_refuses(address, token.value):  # without one, ray.init says so at once
            raise ray_auth.token_error(address, token)
        if _gcs_refuses(address, None) is False:
            raise ray_auth.RayAuthError(
                f"{ray_auth.MODE_ENV}=token, but the Ray cluster at {address} does not use tokens: its processes "
                "call this one without a token, which token mode refuses, so every actor started from here would "
                f"die before it runs. Unset {ray_auth.MODE_ENV} (Ray sets it in a process that started a local "
                "instance), or set it to disabled")
        return token
    refuses = _gcs_refuses(address, None)  # RAY_AUTH_MODE unset: does the cluster want a token at all?
    if refuses is False:
        return FoundToken(None, "not needed")
    if token.value is None:
        if refuses:
            raise ray_auth.token_error(address, token)
        return token
    if refuses and _gcs_refuses(address, token.value):
        raise ray_auth.token_error(address, token)
    _enable_token_mode(address)
    return token


def _enable_token_mode(address: str) -> None:
    """Send the token from now on (this process and the ones it starts), as ``ray start`` does."""
    os.environ[ray_auth.MODE_ENV] = "token"
    if "ray" in sys.modules:
        # Ray read RAY_AUTH_MODE into its config when it was imported and has no public call
        # to read it again, so it would still send no token.
        raise ray_auth.RayAuthError(
            f"the Ray cluster at {address} wants a token, and this process imported ray before it could turn "
            f"token mode on: export {ray_auth.MODE_ENV}=token before starting it"
        )


def _gcs_refuses(address: str, token: str | None) -> bool | None:
    """Whether the GCS at ``host:port`` refuses ``token`` (None: sending none).

    None when it cannot tell (another address form, TLS, nothing listening, any other error):
    then ``ray.init`` waits for the cluster and reports what it finds in its own words.
    """
    import grpc

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        # An empty message is a valid GetClusterIdRequest; the raw bytes need no generated stubs.
        get_cluster_id = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            get_cluster_id(b"", timeout=PROBE_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            return True if exc.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return False


def _is_auth_failure(exc: BaseException | None) -> bool:
    """ray.init's refusals: AuthenticationError, or a ConnectionError whose cause quotes one."""
    from ray.exceptions import AuthenticationError

    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False

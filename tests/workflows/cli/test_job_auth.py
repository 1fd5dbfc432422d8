"""Where ``cai submit``/``cai jobs`` send the cluster's token: a local HTTP listener records the
headers of every request it gets (no Ray).

The rule (``workflows/runtime/job_client.py``): every request carries the token under
``RAY_AUTH_MODE=token``; with the mode unset, only a server that answered 401 without it gets
it; never over plain ``http://`` to a host that is not the loopback without ``--allow-http-token``.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workflows.cli.main import main
from workflows.runtime import job_client

TOKEN = "the-cluster-token"


class Listener:
    """A job server stand-in on 0.0.0.0 that answers ``GET /api/version`` and ``GET /api/jobs/``,
    401 to requests without the token when ``wants_token``; ``seen`` holds each request's
    (method, path, Authorization header or None)."""

    def __init__(self, wants_token: bool):
        self.wants_token, self.seen = wants_token, []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                auth = self.headers.get("Authorization")
                listener.seen.append(("GET", self.path, auth))
                if listener.wants_token and auth != f"Bearer {TOKEN}":
                    self.send_response(401 if auth is None else 403)
                    self.end_headers()
                    return
                body = json.dumps({"version": "4", "ray_version": "2.60.0"} if self.path == "/api/version" else []).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tokens(self) -> list[str | None]:
        return [auth for _, _, auth in self.seen]


def this_machines_address() -> str:
    """An IPv4 address of this machine that is not the loopback: the source of the route to a
    documentation address (a UDP socket's connect sends nothing), else one the hostname has."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2
            candidates.append(probe.getsockname()[0])
        except OSError:
            pass
    candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    address = next((a for a in candidates if not a.startswith(("127.", "0."))), None)
    assert address, f"this machine has no IPv4 address beside the loopback ({candidates})"
    return address


@pytest.fixture
def token_in_home(monkeypatch, tmp_path):
    """A token in ~/.ray/auth_token and RAY_AUTH_MODE unset: what `ray start` leaves on a head."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN + "\n")


@pytest.fixture
def listeners():
    made: list[Listener] = []
    yield lambda wants_token: made.append(Listener(wants_token)) or made[-1]
    for listener in made:
        listener.server.shutdown()
        listener.server.server_close()


def test_a_server_without_auth_never_gets_the_token(token_in_home, listeners, capsys):
    server = listeners(wants_token=False)
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{server.port}"]) == 0
    assert [path for _, path, _ in server.seen] == ["/api/version", "/api/jobs/"]
    assert server.tokens() == [None, None], "a token file in ~/.ray must not go to another cluster"


def test_a_server_that_answers_401_gets_it_on_the_retry_and_after(token_in_home, listeners, capsys):
    server = listeners(wants_token=True)
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{server.port}"]) == 0, capsys.readouterr().err
    assert server.seen == [("GET", "/api/version", None), ("GET", "/api/version", f"Bearer {TOKEN}"),
                           ("GET", "/api/jobs/", f"Bearer {TOKEN}")]


def test_the_token_never_crosses_plain_http_to_another_host_unless_allowed(token_in_home, listeners, capsys):
    server = listeners(wants_token=True)
    url = f"http://{this_machines_address()}:{server.port}"
    assert main(["jobs", "list", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cai: error: {url} asks for a token, but {url} is plain http:// to another host")
    assert "--allow-http-token" in err and err.count("\n") == 1
    assert server.tokens() == [None], "the 401 was not answered with the token"

    assert main(["jobs", "list", "--address", url, "--allow-http-token"]) == 0
    assert server.tokens()[1:] == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


def test_auth_mode_token_sends_it_with_every_request_but_not_over_plain_http_to_another_host(
        token_in_home, listeners, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    server = listeners(wants_token=True)
    assert main(["jobs", "list", "--address", f"http://localhost:{server.port}"]) == 0
    assert server.tokens() == [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]

    other = listeners(wants_token=True)
    url = f"http://{this_machines_address()}:{other.port}"
    assert main(["jobs", "list", "--address", url]) == 2
    assert capsys.readouterr().err.startswith(f"cai: error: RAY_AUTH_MODE=token, but {url} is plain http://")
    assert other.seen == [], "refused before any request"


def test_auth_mode_disabled_never_sends_it(token_in_home, listeners, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    server = listeners(wants_token=True)
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{server.port}"]) == 2
    assert "refused the request (HTTP 401: no token)" in capsys.readouterr().err
    assert server.tokens() == [None]


@pytest.mark.parametrize("url, local", [("http://127.0.0.1:8265", True), ("http://127.3.2.1:1", True),
                                        ("http://localhost:8265", True), ("http://[::1]:8265", True),
                                        ("http://10.0.0.5:8265", False), ("http://ray-head.svc:8265", False),
                                        ("http://localhost.evil.com:80", False)])
def test_loopback_hosts(url, local):
    assert job_client.loopback(url) is local


def test_https_to_any_host_may_carry_the_token(token_in_home):
    auth = job_client.JobAuth.for_server("https://ray.example.com")
    assert auth.token == TOKEN and auth.refused is None and not auth.upfront

"""Joining a cluster: the token rule (fast, no Ray) and `cai generate` through RAY_ADDRESS.

The slow tests start plain `ray start --head` in a fresh HOME holding ``~/.ray/auth_token``
and no ``RAY_AUTH_MODE`` anywhere: Ray turns token auth on for the head by itself, and the
``cai`` driver, a subprocess with the same HOME, must work out that it has to send the token.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.workflows.runtime.ray_head import (
    BIN, clean_env, free_ports, node_port_flags, short_temp_dir, start_head, stop_head, wait_for_head,
)
from workflows.runtime import job_client
from workflows.runtime.ray_auth import TOKEN_ENV, TOKEN_PATH_ENV, FoundToken, RayAuthError, auth_mode, find_token, token_error

# -- the token rule, no Ray ---------------------------------------------------------------


def write_token(home: Path, token: str) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    return path


def test_token_sources_in_rays_order(tmp_path):
    home_file = write_token(tmp_path / "home", "  home-token \nsecond line\n")
    path_file = tmp_path / "token"
    path_file.write_text("\tpath-token\r\n")
    env = {"HOME": str(tmp_path / "home")}
    assert find_token(env) == FoundToken("home-token", f"~/.ray/auth_token ({home_file})")
    env[TOKEN_PATH_ENV] = str(path_file)
    assert find_token(env) == FoundToken("path-token", f"RAY_AUTH_TOKEN_PATH ({path_file})")
    env[TOKEN_ENV] = " env-token\n"
    assert find_token(env) == FoundToken("env-token", "RAY_AUTH_TOKEN")
    env[TOKEN_ENV] = " \t"  # blank: no token, and like Ray's loader it does not fall through
    assert find_token(env) == FoundToken(None, "RAY_AUTH_TOKEN is blank")
    env[TOKEN_ENV] = ""  # empty is unset
    assert find_token(env).value == "path-token"


def test_a_bad_token_path_is_an_error_and_no_token_says_where_it_looked(tmp_path, monkeypatch):
    empty_first_line = tmp_path / "two-lines"
    empty_first_line.write_text("\ntoken-on-line-two\n")  # Ray reads the first line only
    for bad in (tmp_path / "missing", tmp_path, empty_first_line):
        with pytest.raises(RayAuthError, match=f"RAY_AUTH_TOKEN_PATH={bad} is not a readable file"):
            find_token({"HOME": str(tmp_path), TOKEN_PATH_ENV: str(bad)})
    none = find_token({"HOME": str(tmp_path)})
    assert none.value is None and str(tmp_path / ".ray" / "auth_token") in none.source
    monkeypatch.chdir(tmp_path)
    write_token(tmp_path, "cwd-token")
    assert find_token({}).value == "cwd-token"  # no HOME: Ray reads ./.ray/auth_token


@pytest.mark.parametrize("value, mode", [(None, None), ("token", "token"), ("TOKEN", "token"),
                                         ("disabled", "disabled"), ("", "disabled"), ("k8s", "disabled")])
def test_auth_mode_reads_like_ray(value, mode):
    assert auth_mode({} if value is None else {"RAY_AUTH_MODE": value}) == mode


def test_jobs_find_the_token_by_ray_starts_rule(monkeypatch, tmp_path):
    """Which token `cai submit` holds for a job server; when it goes is test_job_auth.py."""
    for var in ("RAY_AUTH_MODE", TOKEN_ENV, TOKEN_PATH_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    url = "http://127.0.0.1:8265"
    assert job_client.JobAuth.for_server(url).headers() == {}  # unset, nothing found
    token_file = write_token(tmp_path, "home-token\n")
    found = job_client.JobAuth.for_server(url)  # unset, found: sent once the server answers 401
    assert found.headers() == {"authorization": "Bearer home-token"} and not found.upfront
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert job_client.JobAuth.for_server(url).headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert job_client.JobAuth.for_server(url).upfront
    token_file.unlink()
    with pytest.raises(job_client.JobClientError, match="RAY_AUTH_MODE=token but none was found"):
        job_client.JobAuth.for_server(url)


def test_token_errors_are_one_line_naming_the_source():
    address = "10.0.0.1:6379"
    refused = str(token_error(address, FoundToken("x", "RAY_AUTH_TOKEN_PATH (/etc/ray/token)")))
    missing = str(token_error(address, FoundToken(None, "none was found (...)")))
    disabled = str(token_error(address, FoundToken(None, "RAY_AUTH_MODE=disabled sends none")))
    assert refused.startswith(f"the Ray cluster at {address} refused the token from RAY_AUTH_TOKEN_PATH "
                              "(/etc/ray/token);")
    assert missing.startswith(f"the Ray cluster at {address} requires a token and none was found")
    assert "unset RAY_AUTH_MODE, then set RAY_AUTH_TOKEN" in disabled
    assert all("\n" not in m and "ray get-auth-token" in m for m in (refused, missing, disabled))


# -- a real head ----------------------------------------------------------------------------


@contextlib.contextmanager
def plain_head(home: Path, **env: str):
    """`ray start --head --block` with HOME=home; yields its GCS address."""
    temp_dir = short_temp_dir("cai-join-")
    gcs, dashboard = free_ports(2)
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--include-dashboard", "false", "--dashboard-port", str(dashboard), "--disable-usage-stats",
               "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir), *node_port_flags()]
    log_path = temp_dir / "head.log"
    proc = start_head(command, clean_env(HOME=str(home), **env), log_path)
    try:
        wait_for_head(proc, log_path, lambda: "Ray runtime started" in log_path.read_text())
        yield f"127.0.0.1:{gcs}"
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head whose HOME holds a token, started without RAY_AUTH_MODE: Ray enables token auth."""
    home = tmp_path_factory.mktemp("head-home")
    write_token(home, secrets.token_hex(32))
    with plain_head(home) as address:
        yield home, address


def cai_generate(model: str, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: how do I stay safe online?"})
                               + "\n" for i in range(4)))
    return subprocess.run(
        [str(BIN / "cai"), "generate", "--model", model, "--constitution", "harmless", "--prompts", str(prompts),
         "--out", str(work / "run"), "--workers", "1", "--revisions", "1", "--max-new-tokens", "16",
         "--shard-size", "4", "--enforce-eager", "--max-model-len", "1024"],
        env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"}, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_generate_joins_a_token_head_through_ray_address(token_head, tiny_model, tmp_path):
    home, address = token_head
    result = cai_generate(tiny_model, tmp_path, clean_env(HOME=str(home), RAY_ADDRESS=address))
    assert result.returncode == 0, result.stderr[-3000:]

    import pyarrow.parquet as pq

    rows = [r for p in sorted((tmp_path / "run" / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2", "q3"]
    assert all(r["final_response"] is not None for r in rows)


@pytest.mark.slow
def test_training_commands_join_a_token_head_through_ray_address(token_head, tiny_model, tmp_path):
    """The training commands import ray only after joining (ray reads RAY_AUTH_MODE once, at
    import): with RAY_AUTH_MODE unset they send the found token as `ray start` does. Here the
    job asks for more engines than the head has, so it stops at placement, having joined."""
    home, address = token_head
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something kind."}) + "\n")
    result = subprocess.run(
        [str(BIN / "cai"), "train", "ppo", "--policy", tiny_model, "--reward-fn", "core.rewards:brevity",
         "--prompts", str(prompts), "--out", str(tmp_path / "ppo"), "--rollout-batch", "2", "--minibatch", "2",
         "--rollout-workers", "3", "--placement-timeout", "3"],
        env=clean_env(HOME=str(home), RAY_ADDRESS=address), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "wants a token" not in result.stderr and "could not reserve 3 workers" in result.stderr, result.stderr[-3000:]
    # the same for Ray Train's learners, whose start timeout ends as one line too
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    result = subprocess.run(
        [str(BIN / "cai"), "train", "sft", "--model", tiny_model, "--data", str(data), "--out", str(tmp_path / "sft"),
         "--workers", "3", "--placement-timeout", "3"],
        env=clean_env(HOME=str(home), RAY_ADDRESS=address), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    # (Ray's own actors may still log below it while the driver shuts down)
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "cai: error: cai train sft: the learners (3 learner(s) x 1 CPU) did not all start within "
        "--placement-timeout 3 s"), result.stderr[-3000:]


@pytest.mark.slow
def test_wrong_or_missing_token_is_one_line_at_once(token_head, tiny_model, tmp_path):
    home, address = token_head
    other_home = tmp_path / "other-home"
    other_file = write_token(other_home, "not-the-cluster-token")
    cases = {
        "wrong-env": (clean_env(HOME=str(home), RAY_ADDRESS=address, RAY_AUTH_TOKEN="wrong"),
                      "refused the token from RAY_AUTH_TOKEN;"),
        "wrong-file": (clean_env(HOME=str(other_home), RAY_ADDRESS=address),
                       f"refused the token from ~/.ray/auth_token ({other_file});"),
        "missing": (clean_env(HOME=str(tmp_path / "empty-home"), RAY_ADDRESS=address),
                    "requires a token and none was found"),
    }
    for name, (env, expected) in cases.items():
        (tmp_path / name).mkdir()
        started = time.monotonic()
        result = cai_generate(tiny_model, tmp_path / name, env)
        elapsed = time.monotonic() - started
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-3000:])
        assert lines[0].startswith(f"cai: error: the Ray cluster at {address} ") and expected in lines[0], lines[0]
        # ray.init alone retries a refused GCS connection for 20 s before it gives up
        assert elapsed < 20, f"{name}: {elapsed:.1f} s"


@pytest.mark.slow
def test_a_found_token_is_not_forced_on_a_cluster_without_auth(tmp_path):
    """A token-mode driver refuses the cluster's token-less calls: its actors would die at birth.
    So a found token is not forced on such a cluster, and RAY_AUTH_MODE=token set for it (as Ray
    itself sets it in a process that started a local instance) is refused in one line."""
    home = tmp_path / "home"
    write_token(home, "a-token-from-some-earlier-local-ray")
    (tmp_path / "no-token-home").mkdir()
    script = textwrap.dedent("""
        import os, ray
        from workflows.runtime.ray_session import connect_ray

        @ray.remote(num_cpus=0)
        class Echo:
            def echo(self, x):
                return x

        info = connect_ray()
        print(info["local"], os.environ.get("RAY_AUTH_MODE"), ray.get(Echo.remote().echo.remote(7), timeout=60))
    """)
    with plain_head(tmp_path / "no-token-home") as address:  # no token at start: auth off
        result = subprocess.run([str(BIN / "python"), "-c", script], capture_output=True, text=True, timeout=180,
                                env=clean_env(HOME=str(home), RAY_ADDRESS=address))
        token_mode = subprocess.run([str(BIN / "python"), "-c", script], capture_output=True, text=True, timeout=60,
                                    env=clean_env(HOME=str(home), RAY_ADDRESS=address, RAY_AUTH_MODE="token"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "None", "7"]
    assert token_mode.returncode != 0 and not token_mode.stdout
    assert (f"RayAuthError: RAY_AUTH_MODE=token, but the Ray cluster at {address} does not use tokens"
            in token_mode.stderr), token_mode.stderr[-3000:]

"""`cai submit` / `cai jobs` against a real local Ray head with the dashboard and token auth on.

The head is ``cluster/start-local.sh --block`` (so the script is tested too), in its own
process group with its own ports, temp dir and token file, so it cannot collide with the session's ``ray_local`` instance or
anyone else's Ray on the machine; the fixture kills exactly that group. Every ``cai`` call
runs in a subprocess with a cleaned environment (no inherited ``RAY_*``), so the token a
command uses is the one the test gives it.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from core.config import ConfigError
from tests.workflows.runtime.ray_head import (
    BIN, clean_env, free_ports, node_port_flags, short_temp_dir, start_head, stop_head, wait_for_head,
)
from workflows.cli.main import main
from workflows.cli.registry import command_names
from workflows.runtime import job_client

START_LOCAL = Path(__file__).resolve().parents[3] / "cluster" / "start-local.sh"


# -- fast checks, no Ray ------------------------------------------------------------------


def test_entrypoint_quotes_every_argument():
    args = ["--", "generate", "--prompts", "my prompts.jsonl", "--out", "runs/$HOME;rm -rf /"]
    assert job_client.entrypoint(args) == "cai generate --prompts 'my prompts.jsonl' --out 'runs/$HOME;rm -rf /'"
    with pytest.raises(ConfigError, match="needs a command"):
        job_client.entrypoint(["--"])


def test_runtime_env_file_and_working_dir(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {VLLM_CPU_KVCACHE_SPACE: '1'}\nexcludes: [big/]\n")
    loaded = job_client.load_runtime_env(str(env_file), str(tmp_path))
    assert loaded == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "excludes": ["big/"], "working_dir": str(tmp_path)}
    assert ".venv" in job_client.load_runtime_env(None, str(tmp_path))["excludes"]

    env_file.write_text("- not\n- a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        job_client.load_runtime_env(str(env_file), None)
    env_file.write_text("!!python/object/apply:os.system ['true']\n")  # safe_load refuses tags
    with pytest.raises(Exception, match="could not determine a constructor"):
        job_client.load_runtime_env(str(env_file), None)


def test_working_dir_zip_leaves_out_the_excludes(tmp_path):
    import io
    import zipfile

    for rel in ("prompts.jsonl", "configs/a.yaml", "runs/x/data.parquet", "big/blob", "deep/big/keep",
                "deep/skip.parquet", "data/raw/one.jsonl", "data/keep.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    package = job_client.zip_directory(tmp_path, ["runs", "big/", "*.parquet", "data/raw/*"])
    names = sorted(zipfile.ZipFile(io.BytesIO(package)).namelist())
    assert names == ["configs/a.yaml", "data/keep.jsonl", "prompts.jsonl"]
    assert zipfile.ZipFile(io.BytesIO(package)).read("configs/a.yaml") == b"configs/a.yaml"
    assert job_client.zip_directory(tmp_path, ["runs", "big/", "*.parquet", "data/raw/*"]) == package  # one name per content


def test_status_exit_codes_and_address_resolution(monkeypatch):
    assert [job_client.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 130]
    for var in ("RAY_DASHBOARD_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert job_client.dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the job server
    assert job_client.dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert job_client.dashboard_address() == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "https://ray.internal:443")
    assert job_client.dashboard_address() == "https://ray.internal:443"
    assert job_client.dashboard_address("http://127.0.0.1:9999") == "http://127.0.0.1:9999"
    with pytest.raises(job_client.JobClientError, match="http://"):
        job_client.dashboard_address("127.0.0.1:6379")


def test_unreachable_address_is_a_clear_user_error(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    code = main(["jobs", "list", "--address", f"http://127.0.0.1:{free_ports(1)[0]}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cai: error: cannot reach the Ray job server") and "Traceback" not in err


def test_unreadable_token_file_is_a_clear_user_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert main(["jobs", "list", "--address", "http://127.0.0.1:1"]) == 2
    assert "RAY_AUTH_TOKEN_PATH" in capsys.readouterr().err


def test_submit_refuses_unknown_command(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "generte", "--model", "x"]) == 2
    assert "'generte' is not a cai command" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "cai", "generte"]) == 2
    assert "'generte' is not a cai command" in capsys.readouterr().err


def test_submit_accepts_a_leading_cai_like_ray_job_submit(monkeypatch, capsys):
    for words in (["cai"], ["/opt/venv/bin/cai"], []):
        assert job_client.entrypoint(["--", *words, "generate", "--out", "runs/a b"]) == "cai generate --out 'runs/a b'"
    assert job_client.command_args(["--", "cai", "prompts", "check", "cai"]) == ["prompts", "check", "cai"]
    with pytest.raises(ConfigError, match="needs a command"):
        job_client.command_args(["--", "cai"])
    assert {"generate", "label", "train", "submit", "jobs"} <= command_names()

    # accepted: it gets as far as the (absent) job server
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["submit", "--address", address, "--", "cai", "generate", "--model", "x"]) == 2
    assert capsys.readouterr().err.startswith("cai: error: cannot reach the Ray job server")


# -- a real head ---------------------------------------------------------------------------


@dataclass
class Head:
    url: str
    token_file: Path
    temp_dir: Path
    metrics_url: str  # the head's Prometheus endpoint (--metrics-export-port)

    def env(self, **extra: str) -> dict[str, str]:
        """A client environment: the token as a file, RAY_AUTH_MODE unset (cai sends a found token)."""
        return clean_env(RAY_AUTH_TOKEN_PATH=str(self.token_file), **extra)

    def cai(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "cai"), *args], env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def job(self, job_id: str) -> dict:
        headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        response = requests.get(f"{self.url}/api/jobs/{job_id}", headers=headers, timeout=10)
        return {"status": "NOT_SUBMITTED_YET"} if response.status_code == 404 else response.json()

    def job_server_up(self) -> bool:
        headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        try:
            return requests.get(f"{self.url}/api/jobs/", headers=headers, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.job(job_id)["status"]) not in statuses:
            assert time.monotonic() < deadline, f"job {job_id} still {status}"
            time.sleep(0.5)
        return status


@pytest.fixture(scope="module")
def ray_head():
    """cluster/start-local.sh --block, on free ports, with its own temp dir and token file."""
    temp_dir = short_temp_dir("cai-head-")
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dashboard = free_ports(2)
    ports = node_port_flags()
    metrics_port = ports[ports.index("--metrics-export-port") + 1]
    command = ["bash", str(START_LOCAL), "--block", "--temp-dir", str(temp_dir), "--num-cpus", "2", "--num-gpus", "0",
               *ports]
    # no RAY_AUTH_MODE here: the script must turn token auth on by itself. Metrics reach the
    # exporter every second (Ray's default is 10 s), so short runs show up while they run.
    env = clean_env(RAY=str(BIN / "ray"), RAY_AUTH_TOKEN_PATH=str(token_file), RAY_CAI_GCS_PORT=str(gcs),
                    RAY_CAI_DASHBOARD_PORT=str(dashboard), RAY_metrics_report_interval_ms="1000")
    log_path = temp_dir / "start-local.log"
    proc = start_head(command, env, log_path)
    head = Head(f"http://127.0.0.1:{dashboard}", token_file, temp_dir, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        wait_for_head(proc, log_path, head.job_server_up)
        yield head
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_prompts(path: Path, n: int) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"Question {i}: how do I keep my passwords safe?"} for i in range(n)]
    rows.append({"id": "blank", "prompt": "  "})  # rejected: every row must still be accounted for
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class MetricsScraper:
    """Reads the head's Prometheus endpoint every second while the module's jobs run, keeping
    every ``ray_cai_*`` sample seen: (series name, labels) -> last value."""

    SAMPLE = re.compile(r"^(ray_cai_\w+)\{([^}]*)\}\s+(\S+)", re.MULTILINE)

    def __init__(self, url: str):
        self.url, self.seen, self.stop = url, {}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = requests.get(self.url, timeout=5).text
            except requests.RequestException:
                text = ""
            for name, labels, value in self.SAMPLE.findall(text):
                tags = frozenset(re.findall(r'(\w+)="([^"]*)"', labels))
                self.seen[(name, tags)] = float(value)
            self.stop.wait(1.0)

    def series(self, name: str, **tags: str) -> list[float]:
        """Values of ``name`` whose labels include ``tags``."""
        return [value for (seen, labels), value in self.seen.items()
                if seen == name and set(tags.items()) <= set(labels)]


@pytest.fixture(scope="module")
def metrics(ray_head):
    scraper = MetricsScraper(ray_head.metrics_url)
    yield scraper
    scraper.stop.set()


@pytest.fixture(scope="module")
def generate_job(ray_head, tiny_model, tmp_path_factory, metrics):
    """One `cai submit -- generate ...` run on the head, shared by the checks below."""
    work = tmp_path_factory.mktemp("submit")
    prompts = write_prompts(work / "prompts.jsonl", 6)
    runtime_env = work / "runtime_env.yaml"
    runtime_env.write_text("env_vars:\n  VLLM_CPU_KVCACHE_SPACE: '1'\n  TOKENIZERS_PARALLELISM: 'false'\n")
    job_id = f"cai-test-generate-{secrets.token_hex(4)}"
    result = ray_head.cai(
        "submit", "--address", ray_head.url, "--runtime-env", str(runtime_env), "--job-id", job_id, "--",
        "generate", "--model", tiny_model, "--constitution", "harmless", "--prompts", str(prompts),
        "--out", str(work / "run"), "--workers", "1", "--revisions", "1", "--max-new-tokens", "16",
        "--shard-size", "4", "--enforce-eager", "--max-model-len", "1024", timeout=240,
    )
    return job_id, result, work / "run"


def driver_summary(logs: str) -> dict:
    """The JSON summary `cai generate` prints last, found among the other log lines."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, line in enumerate(logs.splitlines(keepends=True)) if line == "{\n"]):
        text = "".join(logs.splitlines(keepends=True)[start:])
        summary, _ = decoder.raw_decode(text)
        if "rows_in" in summary:
            return summary
    raise AssertionError(f"no run summary in the job's logs:\n{logs[-3000:]}")


@pytest.mark.slow
def test_submit_generate_streams_logs_and_succeeds(generate_job):
    job_id, result, out = generate_job
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"submitted {job_id}" in result.stderr and f"job {job_id} SUCCEEDED" in result.stderr
    summary = driver_summary(result.stdout)  # reached our stdout through the log stream
    assert summary["rows_in"] == 7 and summary["rows_out"] == 6 and summary["rejected"] == 1

    import pyarrow.parquet as pq

    assert (out / "manifest.json").is_file()
    rows = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejects = [line for p in (out / "rejects").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)]
    assert len(rows) + len(rejects) == 7 and all(r["final_response"] is not None for r in rows)


@pytest.mark.slow
def test_jobs_list_status_logs(ray_head, generate_job):
    job_id, _, _ = generate_job
    listing = ray_head.cai("jobs", "list", "--address", ray_head.url)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in line and "cai generate" in line

    status = ray_head.cai("jobs", "status", job_id, "--address", ray_head.url)
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["cai_command"] == "generate"

    logs = ray_head.cai("jobs", "logs", job_id, "--address", ray_head.url, env=ray_head.env(
        RAY_AUTH_TOKEN=ray_head.token_file.read_text().strip(), RAY_AUTH_MODE="token"))  # token as a value
    assert logs.returncode == 0 and '"rows_out": 6' in logs.stdout

    missing = ray_head.cai("jobs", "status", "no-such-job", "--address", ray_head.url)
    assert missing.returncode == 2 and missing.stderr.startswith("cai: error:")


@pytest.mark.slow
@pytest.mark.fault
def test_failed_and_stopped_jobs_map_to_exit_codes(ray_head, tiny_model, tmp_path):
    failed = ray_head.cai("submit", "--address", ray_head.url, "--", "prompts", "check", "/nonexistent.jsonl")
    assert failed.returncode == 1 and "FAILED" in failed.stderr
    assert "cai: error:" in failed.stdout  # the driver's own error line, streamed back

    # a job that cannot end by itself (so RUNNING is never missed): its one worker asks for more
    # CPUs than the head has, and --placement-timeout 0 waits for them forever, until stopped
    job_id = f"cai-test-stop-{secrets.token_hex(4)}"
    write_prompts(tmp_path / "prompts.jsonl", 2)
    follower = subprocess.Popen(
        [str(BIN / "cai"), "submit", "--address", ray_head.url, "--job-id", job_id, "--",
         "generate", "--model", tiny_model, "--constitution", "harmless", "--prompts", str(tmp_path / "prompts.jsonl"),
         "--out", str(tmp_path / "run"), "--workers", "1", "--cpus-per-worker", "512", "--placement-timeout", "0"],
        env=ray_head.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert ray_head.wait_status(job_id, {"RUNNING", "SUCCEEDED", "FAILED"}) == "RUNNING"
        stop = ray_head.cai("jobs", "stop", job_id, "--address", ray_head.url)
        assert stop.returncode == 0, stop.stderr
        _, err = follower.communicate(timeout=60)
        assert follower.returncode == 130 and f"job {job_id} STOPPED" in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


@pytest.mark.slow
def test_working_dir_is_uploaded_and_address_beats_ray_address(ray_head, tmp_path):
    """A local --working-dir reaches the job (a relative path resolves inside it), and --address
    wins over RAY_ADDRESS / RAY_API_SERVER_ADDRESS exported for other tools (Ray's SDK would not)."""
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "there"}\n')
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "huge.bin").write_bytes(b"x" * 1024)  # left out by the default excludes
    job_id = f"cai-test-workdir-{secrets.token_hex(4)}"
    env = ray_head.env(RAY_ADDRESS="127.0.0.1:1", RAY_API_SERVER_ADDRESS="http://127.0.0.1:1")
    result = ray_head.cai("submit", "--address", ray_head.url, "--working-dir", str(tmp_path), "--job-id", job_id,
                          "--", "prompts", "check", "prompts.jsonl", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"usable": 2' in result.stdout
    working_dir = ray_head.job(job_id)["runtime_env"]["working_dir"]
    assert working_dir.startswith("gcs://_ray_pkg_") and working_dir.endswith(".zip")


@pytest.mark.slow
def test_generate_and_ppo_metrics_reach_prometheus_with_their_run_tag(ray_head, generate_job, metrics, tiny_model,
                                                                   tmp_path):
    """The generation counters and PPO's per-step gauges, as Prometheus scrapes them from the
    head, tagged with each run's id; and only under names the dashboard may query."""
    from actors.metrics import exported_names

    _, result, out = generate_job
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((out / "manifest.json").read_text())["run_id"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about topic {i}."}) + "\n" for i in range(8)))
    ppo = ray_head.cai(
        "submit", "--address", ray_head.url, "--", "train", "ppo", "--policy", tiny_model, "--prompts", str(prompts),
        "--out", str(tmp_path / "ppo"), "--reward-fn", "vowel_share", "--steps", "2", "--rollout-batch", "4",
        "--minibatch", "2", "--ppo-epochs", "1", "--max-new-tokens", "8", "--learners", "1", "--rollout-workers", "1",
        "--enforce-eager", "--max-model-len", "512", "--storage-path", str(tmp_path / "storage"), timeout=420)
    assert ppo.returncode == 0, ppo.stderr[-3000:] + ppo.stdout[-3000:]
    ppo_run = json.loads((tmp_path / "ppo" / "run.json").read_text())["run_id"]
    deadline = time.monotonic() + 30  # one more scrape after the last report
    while max(metrics.series("ray_cai_ppo_step", run=ppo_run, stage="ppo") or [0]) < 2 and time.monotonic() < deadline:
        time.sleep(1)

    assert sum(metrics.series("ray_cai_prompts_completed_total", run=run, stage="generate")) >= 6
    assert sum(metrics.series("ray_cai_tokens_generated_total", run=run, stage="generate")) > 0
    assert metrics.series("ray_cai_shard_seconds_count", run=run, stage="generate")
    assert max(metrics.series("ray_cai_ppo_step", run=ppo_run, stage="ppo")) >= 2
    for name in ("ray_cai_ppo_reward_mean", "ray_cai_ppo_kl", "ray_cai_ppo_kl_coef", "ray_cai_ppo_response_length",
                 "ray_cai_ppo_step_seconds", "ray_cai_ppo_sync_logprob_diff", "ray_cai_ppo_staleness",
                 "ray_cai_ppo_overlap_seconds", "ray_cai_ppo_is_weight_mean", "ray_cai_ppo_is_clipped_frac",
                 "ray_cai_ppo_behaviour_gap"):
        assert metrics.series(name, run=ppo_run, stage="ppo"), name
    for phase in ("rollout", "scoring", "training", "sync"):
        assert metrics.series("ray_cai_ppo_phase_seconds", run=ppo_run, phase=phase), phase
    assert {name for name, _ in metrics.seen} <= exported_names()
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["step_seconds"] > 0 for row in rows)


@pytest.mark.slow
def test_missing_or_wrong_token_is_a_clear_user_error(ray_head, tmp_path):
    wrong = ray_head.cai("jobs", "list", "--address", ray_head.url,
                         env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and wrong.stderr.startswith("cai: error:")
    assert "refused" in wrong.stderr and "Traceback" not in wrong.stderr

    # no token anywhere: no env, and a HOME without ~/.ray/auth_token
    missing = ray_head.cai("jobs", "list", "--address", ray_head.url, env=clean_env(HOME=str(tmp_path)))
    assert missing.returncode == 2 and missing.stderr.startswith("cai: error:") and "refused" in missing.stderr

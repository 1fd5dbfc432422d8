"""The cluster/ configs: they parse, open with their launch command, and keep the promises
docs/cluster.md makes (token auth on every node, GPUs requested, /dev/shm sized, shared storage
on every pod, the dashboard never published). No Ray, no Kubernetes: milliseconds.

Dashboard rule: launcher heads bind it to 127.0.0.1 (reach it with `ray dashboard`/ssh -L).
KubeRay heads bind 0.0.0.0 inside the pod, because the operator and the RayJob submitter reach
it through the head Service, so that Service must be ClusterIP (kubectl port-forward) and
nothing in cluster/kuberay may be an Ingress, a LoadBalancer or a NodePort.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
SHARED_MOUNT = "/mnt/cai"

# file -> the command its first comment line must give
LAUNCH_COMMANDS = {
    "kuberay/raycluster.yaml": "kubectl apply -f cluster/kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml": "kubectl apply -f cluster/kuberay/rayjob.yaml",
    "kuberay/shared-storage.yaml": "kubectl apply -f cluster/kuberay/shared-storage.yaml",
    "launcher/aws.yaml": "ray up cluster/launcher/aws.yaml",
    "launcher/local.yaml": "ray up cluster/launcher/local.yaml",
    "runtime_env.yaml": "cai submit --runtime-env cluster/runtime_env.yaml",
    "start-local.sh": "cluster/start-local.sh",
    "Dockerfile": "docker build -f cluster/Dockerfile",
}


def load_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict:
    (doc,) = load_documents(path)
    return doc


def cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayClusterSpec) of the RayCluster and of the RayJob's cluster."""
    return [("raycluster", load_one(KUBERAY / "raycluster.yaml")["spec"]),
            ("rayjob", load_one(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"])]


def pod_groups(spec: dict) -> dict[str, dict]:
    """Group name -> pod spec, the head as 'head'."""
    groups = {"head": spec["headGroupSpec"]["template"]["spec"]}
    groups.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return groups


def mounts(pod: dict) -> dict[str, dict]:
    """Mount path -> the volume mounted there, for the Ray container (the first)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0].get("volumeMounts", [])}


def test_every_config_parses_and_opens_with_its_launch_command():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= set(LAUNCH_COMMANDS)
    for path in files:
        if path.suffix in {".yaml", ".yml"}:
            assert load_documents(path), f"{path} is empty"
        lines = path.read_text().splitlines()
        first = lines[1] if lines[0].startswith("#!") else lines[0]
        expected = LAUNCH_COMMANDS.get(path.relative_to(CLUSTER).as_posix(), path.relative_to(ROOT).as_posix())
        assert first.startswith("#") and expected in first, f"{path}: first comment should give `{expected}`"


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_cluster_has_gpus_shm_shared_storage_and_token_auth(name, spec):
    assert spec["rayVersion"] == "2.60.0"
    # KubeRay injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN into every Ray container (head and
    # workers, and a RayJob's submitter) from this setting; nothing may turn it off per pod.
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-cai-auth"}
    groups = pod_groups(spec)
    assert len(groups) >= 2, "a head and at least one worker group"
    for group, pod in groups.items():
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token", f"{name}/{group} turns token auth off"
        by_path = mounts(pod)
        assert by_path["/dev/shm"]["emptyDir"]["medium"] == "Memory", f"{name}/{group}: /dev/shm not in memory"
        assert by_path[SHARED_MOUNT]["persistentVolumeClaim"]["claimName"] == "ray-cai-shared", f"{name}/{group}"

    gpu_groups = [g for g, pod in groups.items() if g != "head"
                  and int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, f"{name}: no worker group requests nvidia.com/gpu"
    head_limits = groups["head"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, "the head is CPU-only"
    for group in gpu_groups:
        shm = mounts(groups[group])["/dev/shm"]["emptyDir"]
        assert shm["sizeLimit"].endswith("Gi") and int(shm["sizeLimit"][:-2]) >= 16, "vLLM TP needs a big /dev/shm"


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_dashboard_is_never_published(name, spec):
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"].get("dashboard-host") in {"0.0.0.0", "127.0.0.1"}
    assert not any(pod.get("hostNetwork") for pod in pod_groups(spec).values())
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_documents(path):
            assert doc["kind"] not in {"Ingress", "Route", "Gateway"}, f"{path.name} publishes the cluster"
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name} publishes a Service"


def test_shared_storage_is_read_write_many():
    pvc = load_one(KUBERAY / "shared-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "ray-cai-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kinds_and_api_version():
    assert [(d["apiVersion"], d["kind"]) for d in (load_one(KUBERAY / "raycluster.yaml"),
                                                   load_one(KUBERAY / "rayjob.yaml"))] == [
        ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")]


def test_rayjob_runs_a_real_cai_command_with_a_config_in_the_repo():
    """Fails until `cai run` and configs/cluster.yaml exist: the RayJob would fail the same way."""
    from workflows.submit import cai_subcommands

    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    words = shlex.split(job["entrypoint"])
    assert words[0] == "cai"
    assert words[1] in cai_subcommands(), f"`cai {words[1]}` is not a cai command"
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{config} is not in the repository"
    assert yaml.safe_load((ROOT / config).read_text()), f"{config} is empty"

    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/ray-cai"  # where cluster/Dockerfile puts the project
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/ray-cai" in dockerfile and f"COPY --chown=ray:users {config.split('/')[0]} " in dockerfile
    assert job["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_launcher_nodes_start_with_token_auth_and_a_private_dashboard(name):
    config = load_one(LAUNCHER / name)
    assert config["cluster_name"].startswith("ray-cai") and config["provider"]["type"] in {"aws", "local"}
    if config["provider"]["type"] == "local":
        # on-prem clusters take no node types: head_ip and worker_ips are the node list
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        assert "available_node_types" not in config
    else:
        types = config["available_node_types"]
        assert config["head_node_type"] in types
        assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
        assert any(t["resources"].get("GPU", 0) > 0 for n, t in types.items() if n != config["head_node_type"])
        ingress = config["provider"]["security_group"]["IpPermissions"]
        assert [(r["FromPort"], r["ToPort"]) for r in ingress] == [(22, 22)], "only SSH comes in"
        assert all(ip["CidrIp"] != "0.0.0.0/0" for r in ingress for ip in r["IpRanges"])

    head_start = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    worker_start = [c for c in config["worker_start_ray_commands"] if "ray start --address" in c]
    assert len(head_start) == 1 and len(worker_start) == 1
    for command in head_start + worker_start:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "--dashboard-host=127.0.0.1" in head_start[0]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, "every node gets the token"


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_launcher_config_passes_rays_own_validation(name):
    """What `ray up` does first: fill in defaults, then check against Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_one(LAUNCHER / name)))


def test_runtime_env_uploads_the_checkout_without_bulk_or_secrets():
    env = load_one(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env var values must be strings"
    secret_words = {"TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIALS"}
    secretish = [k for k in env["env_vars"] if secret_words & set(k.upper().split("_"))]
    assert not secretish, f"secrets do not belong in runtime_env.yaml: {secretish}"


def test_start_local_script_is_strict_private_and_authenticated():
    script = CLUSTER / "start-local.sh"
    assert os.access(script, os.X_OK), "start-local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text and "export RAY_AUTH_MODE=token" in text
    assert "--dashboard-host 127.0.0.1" in text and "0.0.0.0" not in text

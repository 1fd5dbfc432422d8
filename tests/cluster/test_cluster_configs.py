"""The cluster/ configs: they parse, open with their launch command, and keep the promises
docs/cluster.md makes (token auth on every node, whole 8-GPU nodes per KubeRay worker pod,
/dev/shm sized with the object store below it, local disk for what spills, shared storage and
the model cache on every node, pinned images, autoscaler, placement and RayJob deadlines that
agree, NCCL's interface set, every raylet reaping its workers' children, the Hugging Face token
from an optional Secret, only the cluster's own pods admitted by its NetworkPolicy, SSH only from
your network, least-privilege AWS roles, no world-writable shared folder, the dashboard never
published).
No Ray cluster, no Kubernetes, no cloud: milliseconds. Nothing here was applied to a real
Kubernetes cluster or cloud account; these are the parsers' and Ray's validator's word only.

Dashboard rule: launcher heads bind it to 127.0.0.1 (reach it with `ray dashboard`/ssh -L).
KubeRay heads bind 0.0.0.0 inside the pod, because the operator and the RayJob submitter reach
it through the head Service, so that Service must be ClusterIP (kubectl port-forward) and
nothing in cluster/kuberay may be an Ingress, a LoadBalancer or a NodePort.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
LAUNCHERS = ("aws.yaml", "gcp.yaml", "local.yaml")  # the `ray up` configs
GPUS_PER_NODE = 8  # KubeRay worker pods take a whole 8-GPU node
SHARED_MOUNT = "/mnt/cai"
MODEL_CACHE = "/mnt/cai/models"  # RAY_CAI_CACHE everywhere: a materialized model has one path on all nodes
GIB = 2**30
# How long a GPU node takes to join, as docs/cluster.md assumes: provisioning, GPU driver, and
# pulling the ~20 GB image. Idle timeouts must outlast it, placement timeouts two of it.
GPU_NODE_START_S = 12 * 60

# file -> the command its first comment line must give
LAUNCH_COMMANDS = {
    "kuberay/raycluster.yaml": "kubectl apply -f cluster/kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml": "kubectl apply -f cluster/kuberay/rayjob.yaml",
    "kuberay/shared-storage.yaml": "kubectl apply -f cluster/kuberay/shared-storage.yaml",
    "kuberay/networkpolicy.yaml": "kubectl apply -f cluster/kuberay/networkpolicy.yaml",
    "launcher/aws.yaml": "ray up cluster/launcher/aws.yaml",
    "launcher/gcp.yaml": "ray up cluster/launcher/gcp.yaml",
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


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes quantity ("24Gi", "500M", "1024") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity)).groups()
    return int(number) * (units[unit] if unit else 1)


def docker_bytes(size: str) -> int:
    """A `docker run --shm-size` value ("32g") in bytes; Docker's units are binary."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", size.lower()).groups()
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def flag(command: str, name: str) -> str | None:
    """The value of `--name=VALUE` in a command line, or None."""
    found = re.findall(rf"{name}=(\S+)", command)
    return found[-1] if found else None


def ray_cai_images() -> dict[str, tuple[str, str | None]]:
    """Where -> (image, pull policy) for every image a cluster config runs."""
    images = {}
    for name, spec in cluster_specs():
        for group, pod in pod_groups(spec).items():
            for c in pod["containers"]:
                images[f"{name}/{group}/{c['name']}"] = (c["image"], c.get("imagePullPolicy"))
    for name in LAUNCHERS:
        docker = load_one(LAUNCHER / name)["docker"]
        policy = "Always" if docker.get("pull_before_run") else "IfNotPresent"
        for key in ("image", "head_image", "worker_image"):
            if key in docker:
                images[f"{name}/{key}"] = (docker[key], policy)
    return images


def stage_placement_timeouts() -> list[float]:
    """placement_timeout of every stage of configs/cluster.yaml, the default where none is set."""
    from core.cluster_options import DEFAULT_PLACEMENT_TIMEOUT_S

    config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    everywhere = config.get("placement_timeout", DEFAULT_PLACEMENT_TIMEOUT_S)
    stages = [section for section in config.values() if isinstance(section, dict)]
    return [stage.get("placement_timeout", everywhere) for stage in stages] or [everywhere]


def test_every_config_parses_and_opens_with_its_launch_command():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= set(LAUNCH_COMMANDS)
    for path in files:
        if path.suffix == ".json":  # no comments in JSON: it must parse (the dashboard has its own test)
            assert json.loads(path.read_text()), f"{path} is empty"
            continue
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
    from workflows.cli.registry import command_names

    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    words = shlex.split(job["entrypoint"])
    assert words[0] == "cai"
    assert words[1] in command_names(), f"`cai {words[1]}` is not a cai command"
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{config} is not in the repository"
    assert yaml.safe_load((ROOT / config).read_text()), f"{config} is empty"

    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/ray-cai"  # where cluster/Dockerfile puts the project
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/ray-cai" in dockerfile and f"COPY --chown=ray:users {config.split('/')[0]} " in dockerfile
    assert job["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_start_with_token_auth_and_a_private_dashboard(name):
    config = load_one(LAUNCHER / name)
    assert config["cluster_name"].startswith("ray-cai") and config["provider"]["type"] in {"aws", "gcp", "local"}
    if config["provider"]["type"] == "local":
        # on-prem clusters take no node types: head_ip and worker_ips are the node list
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        assert "available_node_types" not in config
    else:
        types = config["available_node_types"]
        assert config["head_node_type"] in types
        assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
        assert any(t["resources"].get("GPU", 0) > 0 for n, t in types.items() if n != config["head_node_type"])
    if config["provider"]["type"] == "aws":
        # Ray's own group would admit SSH from 0.0.0.0/0 whatever IpPermissions say; every node
        # type must name the user's group instead (SSH from their CIDR only; see aws.yaml).
        assert "security_group" not in config["provider"], "Ray would add these rules to SSH from 0.0.0.0/0"
        for node_type, t in types.items():
            assert t["node_config"].get("SecurityGroupIds"), f"{node_type}: Ray would create a group open to SSH"
    if config["provider"]["type"] == "gcp":
        # The `default` network admits SSH from anywhere: every node sits in the cluster's own
        # subnetwork and carries the tag its firewall rules name (see gcp.yaml).
        for node_type, t in types.items():
            (interface,) = t["node_config"]["networkInterfaces"]
            assert interface["subnetwork"].endswith("/subnetworks/ray-cai"), f"{node_type}: not on ray-cai's network"
            assert t["node_config"]["tags"]["items"] == ["ray-cai"], f"{node_type}: no firewall tag"

    head_start = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    worker_start = [c for c in config["worker_start_ray_commands"] if "ray start --address" in c]
    assert len(head_start) == 1 and len(worker_start) == 1
    for command in head_start + worker_start:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "--dashboard-host=127.0.0.1" in head_start[0]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, "every node gets the token"


def test_rays_default_aws_security_group_still_opens_ssh_to_the_world():
    """What aws.yaml's header says, read from the installed Ray (its module needs boto3, so read
    the source): if Ray stops doing this, the header and docs/cluster.md need another look."""
    import ray

    source = (Path(ray.__file__).parent / "autoscaler/_private/aws/config.py").read_text()
    ssh_rules = source[source.index("def _create_default_ssh_inbound_rules"):][:400]
    assert '"FromPort": 22' in ssh_rules and '"CidrIp": "0.0.0.0/0"' in ssh_rules
    assert 'if "SecurityGroupIds" not in node_type["node_config"]' in source, "own groups skip Ray's"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_validation(name):
    """What `ray up` does first: fill in defaults, then check against Ray's JSON schema. For GCP,
    prepare_config only merges ray/autoscaler/gcp/defaults.yaml, so it needs no Google client;
    the bootstrap after it (service account, SSH key, subnet lookups) calls Google's APIs and is
    not run here."""
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


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_object_store_fits_in_dev_shm_and_memory_covers_both(name, spec):
    """Set in bytes on every group, at most 80% of the memory-backed /dev/shm (the rest is for vLLM
    tensor parallelism and NCCL); /dev/shm counts against the memory limit, so that covers it and
    leaves room for the Ray processes."""
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group, group_spec in groups.items():
        object_store = int(group_spec["rayStartParams"]["object-store-memory"])
        pod = group_spec["template"]["spec"]
        shm = k8s_bytes(mounts(pod)["/dev/shm"]["emptyDir"]["sizeLimit"])
        assert object_store <= 0.8 * shm, f"{name}/{group}: object store {object_store} vs /dev/shm {shm}"
        memory = k8s_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        assert memory >= shm + 16 * GIB, f"{name}/{group}: memory limit does not cover /dev/shm and the processes"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_object_store_fits_in_dev_shm(name):
    config = load_one(LAUNCHER / name)
    docker = config["docker"]
    for role, commands in (("head", config["head_start_ray_commands"]), ("worker", config["worker_start_ray_commands"])):
        run_options = " ".join(docker.get("run_options", []) + docker.get(f"{role}_run_options", []))
        shm = docker_bytes(flag(run_options, "--shm-size"))
        object_store = int(flag(" ".join(commands), "--object-store-memory"))
        assert object_store <= 0.8 * shm, f"{name} {role}: object store {object_store} vs /dev/shm {shm}"


def test_images_are_pinned_and_the_same_everywhere():
    """No :latest, no missing tag, no always-pull of a tag that can move; one image, the one
    cluster/Dockerfile's header builds; its base image pinned too."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    built = re.search(r"docker build .*?-t (\S+)", dockerfile.splitlines()[0]).group(1)
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    images = ray_cai_images()
    for where, (image, policy) in [*images.items(), ("Dockerfile FROM", (base, None))]:
        digest = "@sha256:" in image
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert digest or (tag and tag != "latest"), f"{where}: {image} is not pinned"
        assert digest or policy != "Always", f"{where}: always pulling a tag that can move"
    assert {image for image, _ in images.values()} == {built}


def test_autoscaler_idle_timeout_and_placement_timeout_agree():
    """The relation docs/cluster.md states: idle nodes outlast a GPU node's start (the first nodes of
    a placement group wait for the last; the next stage finds the last stage's nodes), and a stage
    waits for two starts (a second launch wave, or a failed launch retried). 0 waits forever."""
    idle = {name: spec["autoscalerOptions"]["idleTimeoutSeconds"] for name, spec in cluster_specs()
            if spec["enableInTreeAutoscaling"]}
    idle |= {name: load_one(LAUNCHER / name)["idle_timeout_minutes"] * 60 for name in LAUNCHERS}
    assert len(idle) == 5
    for name, seconds in idle.items():
        assert seconds >= GPU_NODE_START_S, f"{name}: idle nodes go before a GPU node has started"
    for timeout in stage_placement_timeouts():
        assert timeout == 0 or timeout >= 2 * GPU_NODE_START_S, f"placement_timeout {timeout}s is shorter than two GPU node starts"


def test_rayjob_retries_and_cleans_up_after_itself():
    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    assert job["backoffLimit"] >= 1, "a rerun resumes from the run folder, so a retry is worth it"
    assert job["shutdownAfterJobFinishes"] is True
    idle = job["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert 0 < job["ttlSecondsAfterFinished"] <= idle, "a finished run keeps its GPUs no longer than idle pods would"


def test_model_cache_and_shared_storage_on_every_node():
    """RAY_CAI_CACHE points into the shared volume in every Ray container and runtime env, so a
    materialized model is one path on all nodes; the `ray up` hosts really mount that volume."""
    for name, spec in cluster_specs():
        for group, pod in pod_groups(spec).items():
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("RAY_CAI_CACHE") == MODEL_CACHE, f"{name}/{group}/{container['name']}"
    job_env = yaml.safe_load(load_one(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert job_env["RAY_CAI_CACHE"] == MODEL_CACHE
    assert load_one(CLUSTER / "runtime_env.yaml")["env_vars"]["RAY_CAI_CACHE"] == MODEL_CACHE

    for name in LAUNCHERS:
        config = load_one(LAUNCHER / name)
        run_options = config["docker"]["run_options"]
        assert f"--env RAY_CAI_CACHE={MODEL_CACHE}" in run_options and f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options
        init = " ".join(config["initialization_commands"])
        assert f"mountpoint -q {SHARED_MOUNT}" in init, f"{name}: nothing checks that {SHARED_MOUNT} is mounted"
    aws_init = " ".join(load_one(LAUNCHER / "aws.yaml")["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .* fs-\S+\.efs\.\S+:/ {SHARED_MOUNT}", aws_init), "aws.yaml mounts EFS"
    gcp_init = " ".join(load_one(LAUNCHER / "gcp.yaml")["initialization_commands"])
    assert re.search(rf"mount -t nfs .* \S+:/\w+ {SHARED_MOUNT}", gcp_init), "gcp.yaml mounts the Filestore share"


# --- GPU clusters as platform engineers run them (issue #26) ---------------------------------


def ray_containers(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, group spec, Ray container) for the head and every worker group of a cluster spec."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group, group["template"]["spec"]["containers"][0]) for name, group in groups]


def env_entries(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_gpu_worker_pods_take_a_whole_8_gpu_node(name, spec):
    """One pod per node: all 8 GPUs on NVLink inside one pod (TP 8 fits, and NCCL between two
    pods on one node would lose NVLink). Requests equal limits (GPUs require it; for CPU and
    memory it makes the pod Guaranteed, the last to be evicted)."""
    for group, _, container in ray_containers(spec):
        if group == "head":
            continue
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == GPUS_PER_NODE, f"{name}/{group}: not a whole 8-GPU node"
        for resource in ("cpu", "memory", "nvidia.com/gpu"):
            assert requests[resource] == limits[resource], f"{name}/{group}: {resource} request != limit"
        assert int(limits["cpu"]) >= GPUS_PER_NODE * 8, f"{name}/{group}: too few CPUs for 8 engines or learners"


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_pods_reserve_local_disk_for_what_spills(name, spec):
    """Objects the store cannot hold (staged models, weight blobs) spill to the node's disk, next
    to Ray's logs and unpacked runtime envs: the request holds at least one full store, and the
    limit, past which the kubelet evicts the pod, is above the request."""
    for group, group_spec, container in ray_containers(spec):
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        request, limit = k8s_bytes(requests["ephemeral-storage"]), k8s_bytes(limits["ephemeral-storage"])
        object_store = int(group_spec["rayStartParams"]["object-store-memory"])
        assert object_store <= request <= limit, f"{name}/{group}: ephemeral-storage {request}/{limit}"


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_hugging_face_token_comes_from_an_optional_secret(name, spec):
    """HF_TOKEN in every Ray container, from the Secret `hf-token`, never a literal; optional, so
    a cluster that only uses public models starts without the Secret."""
    for group, _, container in ray_containers(spec):
        entry = env_entries(container).get("HF_TOKEN")
        assert entry and "value" not in entry, f"{name}/{group}: HF_TOKEN missing or a literal"
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token", "optional": True}


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_gpu_workers_name_the_interface_nccl_and_gloo_use(name, spec):
    for group, _, container in ray_containers(spec):
        if group == "head":
            continue
        env = {k: e.get("value") for k, e in env_entries(container).items()}
        assert env.get("NCCL_SOCKET_IFNAME") == "eth0" and env.get("GLOO_SOCKET_IFNAME") == "eth0", f"{name}/{group}"
    # The fast fabrics are left commented, with when to use them (raycluster.yaml).
    text = (KUBERAY / "raycluster.yaml").read_text()
    for setting in ("{name: NCCL_IB_HCA", "{name: FI_PROVIDER, value: efa}", "vpc.amazonaws.com/efa"):
        assert setting in text, f"raycluster.yaml does not mention {setting}"


def test_vllm_worker_multiproc_method_is_never_preset():
    """Inside a Ray actor vLLM picks spawn itself and exports RAY_ADDRESS to its workers; a preset
    VLLM_WORKER_MULTIPROC_METHOD skips that export (actors/engine.py)."""
    name = "VLLM_WORKER_MULTIPROC_METHOD"
    assert name not in load_one(CLUSTER / "runtime_env.yaml")["env_vars"]
    assert name not in yaml.safe_load(load_one(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    for cluster, spec in cluster_specs():
        for group, _, container in ray_containers(spec):
            assert name not in env_entries(container), f"{cluster}/{group}"
    for launcher in LAUNCHERS:
        config = load_one(LAUNCHER / launcher)
        commands = config["docker"].get("run_options", []) + config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert not any(name in command for command in commands), launcher


def test_every_raylet_reaps_its_workers_children():
    """Every Ray node starts its raylet with per-worker process groups, so a vLLM engine's
    EngineCore and tensor-parallel workers (not Ray workers) end with their actor, however it
    ends (workflows/runtime/engine_stop.py; docs/cluster.md, "Engines end cleanly")."""
    from workflows.runtime.ray_session import REAP_CHILDREN_ENV

    for cluster, spec in cluster_specs():
        for group, _, container in ray_containers(spec):
            assert env_entries(container).get(REAP_CHILDREN_ENV, {}).get("value") == "1", f"{cluster}/{group}"
    for launcher in LAUNCHERS:
        assert f"--env {REAP_CHILDREN_ENV}=1" in load_one(LAUNCHER / launcher)["docker"]["run_options"], launcher
    assert f'export {REAP_CHILDREN_ENV}="${{{REAP_CHILDREN_ENV}:-1}}"' in (CLUSTER / "start-local.sh").read_text()


def network_policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in load_documents(KUBERAY / "networkpolicy.yaml")}


def pod_labels(name: str, spec: dict) -> dict[str, dict]:
    """Group -> the labels KubeRay gives that group's pods: the template's plus ray.io/cluster.
    A RayJob's cluster is named <rayjob>-<5 random characters> (GenerateRayClusterName)."""
    cluster = "ray-cai" if name == "raycluster" else "ray-cai-run-x7k2q"
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {group: g["template"].get("metadata", {}).get("labels", {}) | {"ray.io/cluster": cluster, "ray.io/is-ray-node": "yes"}
            for group, g in groups.items()}


def selects(selector: dict, labels: dict) -> bool:
    return set(selector.get("matchLabels", {}).items()) <= set(labels.items()) and not selector.get("matchExpressions")


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_network_policy_admits_only_the_clusters_own_pods(name, spec):
    """ClusterIP keeps the head off the internet, not away from other pods. One NetworkPolicy
    selects every pod of each cluster (and no pod of the other), admits its own pods on every
    port (Ray picks most of its ports at run time), the operator and the RayJob's submitter on
    8265 only, Prometheus on the metrics ports only, and nothing from anywhere else."""
    labels = pod_labels(name, spec)
    other_name, other_spec = next((n, s) for n, s in cluster_specs() if n != name)
    other = pod_labels(other_name, other_spec)
    (policy,) = [p for p in network_policies().values()
                 if all(selects(p["spec"]["podSelector"], pod) for pod in labels.values())]
    assert not any(selects(policy["spec"]["podSelector"], pod) for pod in other.values()), "selects the other cluster"
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    admitted = []  # (peer is this cluster's own pods, peer as JSON, its ports or "all"), per peer of every rule
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        ports = frozenset(p["port"] for p in rule.get("ports", [])) or "all"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "an ipBlock admits by address, not by pod"
            assert "podSelector" in peer, "a namespaceSelector alone admits every pod of a namespace"
            own = "namespaceSelector" not in peer and all(selects(peer["podSelector"], pod) for pod in labels.values())
            admitted.append((own, json.dumps(peer, sort_keys=True), ports))
    assert [ports for own, _, ports in admitted if own] == ["all"], "the cluster's own pods reach each other on every port"
    for own, peer, ports in admitted:
        if own:
            continue
        assert ports != "all", f"{peer} may reach every port"
        assert ports <= {8265} or ports <= {8080, 44217, 44227}, f"{peer} reaches {sorted(ports)}"
    peers = " ".join(peer for _, peer, _ in admitted)
    assert "kuberay-operator" in peers, "the operator must reach the dashboard (job status, authOptions)"
    if name == "rayjob":
        assert '"batch.kubernetes.io/job-name": "ray-cai-run"' in peers, "the submitter must reach the job server"


def test_rayjob_deadlines_outlast_gpu_starts_and_placement_waits():
    """A RayJob must not wait forever for GPUs that never come (preRunningDeadlineSeconds: until
    the cluster is Ready and the job submitted), nor run forever (activeDeadlineSeconds, per
    attempt). They agree with the rest: the cluster may take two GPU node starts, as a stage's
    placement wait may; the whole attempt outlasts that plus every stage's placement_timeout."""
    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    pre_running, active = job["preRunningDeadlineSeconds"], job["activeDeadlineSeconds"]
    assert pre_running >= 2 * GPU_NODE_START_S, "the cluster's first GPU pod may take two node starts"
    waits = sum(t for t in stage_placement_timeouts() if t > 0)
    assert active >= pre_running + waits + 3600, "the deadline would cut a run that is still waiting for GPUs"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_shared_folder_is_not_world_writable(name):
    """/mnt/cai belongs to the containers' user (`ray`, uid 1000, gid 100 in Ray's images),
    group-writable; never chmod 777."""
    text = (LAUNCHER / name).read_text()
    assert not re.search(r"chmod\s+(-R\s+)?0?777|chmod\s+\S*[ao]\+\w*w", text), f"{name} makes a folder world-writable"
    init = " ".join(load_one(LAUNCHER / name)["initialization_commands"])
    assert f"sudo chown 1000:100 {SHARED_MOUNT} && sudo chmod 2775 {SHARED_MOUNT}" in init


def test_aws_nodes_name_their_ami_and_a_least_privilege_profile():
    """Every node type names an AMI (Ray's default is an Ubuntu 18.04 DLAMI) and an instance
    profile: the head's may do what the autoscaler does, the workers' is another."""
    config = load_one(LAUNCHER / "aws.yaml")
    types = config["available_node_types"]
    profiles = {}
    for node_type, t in types.items():
        assert t["node_config"]["ImageId"].startswith("ami-"), node_type
        profiles[node_type] = t["node_config"]["IamInstanceProfile"]["Name"]
    head = profiles.pop(config["head_node_type"])
    assert set(profiles.values()) == {"ray-cai-worker"} and head == "ray-cai-head"
    assert config["provider"]["cache_stopped_nodes"] is False, "the policy has no Stop/StartInstances"


def test_aws_iam_policy_allows_what_rays_autoscaler_calls_and_no_more():
    """cluster/launcher/aws-iam-policy.json against the installed Ray's AWS node provider (read as
    source: its module needs boto3). Each boto3 call the provider makes for a cluster that
    terminates idle nodes maps to one action; nothing else is allowed, and nothing with a
    wildcard. iam:PassRole only for the workers' role, only to EC2."""
    import ray

    provider = (Path(ray.__file__).parent / "autoscaler/_private/aws/node_provider.py").read_text()
    calls = {"instances.filter(": "ec2:DescribeInstances", "create_instances(": "ec2:RunInstances",
             "create_tags(": "ec2:CreateTags", "terminate_instances": "ec2:TerminateInstances"}
    for call in calls:
        assert call in provider, f"Ray's AWS node provider no longer calls {call}: review the policy"
    policy = json.loads((LAUNCHER / "aws-iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert actions == set(calls.values()) | {"iam:PassRole"}
    assert not any("*" in a for a in actions)
    (pass_role,) = [s for s in policy["Statement"] if s["Action"] == ["iam:PassRole"]]
    assert pass_role["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/ray-cai-worker"
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # Whatever touches instances is bound to this cluster's tag (or to the launch that sets it).
    this_cluster = ({"aws:RequestTag/ray-cluster-name": "ray-cai"}, {"aws:ResourceTag/ray-cluster-name": "ray-cai"},
                    {"ec2:CreateAction": "RunInstances"})
    for statement in policy["Statement"]:
        if statement["Resource"] == "arn:aws:ec2:us-west-2:ACCOUNT_ID:instance/*":
            assert statement["Condition"]["StringEquals"] in this_cluster, statement["Sid"]
        else:
            assert "instance/" not in json.dumps(statement["Resource"]), statement["Sid"]


def test_rays_own_cloud_defaults_are_what_the_docs_say():
    """What aws.yaml, gcp.yaml and docs/cluster.md say Ray does when left to itself, read from the
    installed Ray's sources (they import boto3 and Google's client): the head gets EC2 and S3
    full access on AWS, a project-wide compute.admin service account on GCP, and an Ubuntu 18.04
    AMI. If Ray changes this, the configs' headers and the docs need another look."""
    import ray

    aws = (Path(ray.__file__).parent / "autoscaler/_private/aws/config.py").read_text()
    assert "AmazonEC2FullAccess" in aws and "AmazonS3FullAccess" in aws
    assert 'if "IamInstanceProfile" in head_node_config' in aws, "a named profile skips Ray's role"
    assert 'DEFAULT_AMI_NAME = "AWS Deep Learning AMI (Ubuntu 18.04) V71.0"' in aws
    gcp = (Path(ray.__file__).parent / "autoscaler/_private/gcp/config.py").read_text()
    assert '"roles/compute.admin"' in gcp and "config = _configure_iam_role(config, crm, iam)" in gcp

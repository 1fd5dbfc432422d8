"""Models on every node: fingerprints, local checks and hub downloads without a cluster, then
staging and preflight on a fake two-node cluster whose nodes have separate local disks.

The cluster part runs ``model_preflight_scenario.py`` in a subprocess (see test_placement.py:
one process joins one cluster, and this pytest process may hold the session's ``ray_local``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.workflows.runtime.cluster_scenario import run_scenario

import actors.model_source as model_source_module
from actors.model_source import (
    REMEDY,
    STAGED_MARKER,
    STAGING_FOLDER,
    ModelNotOnNodeError,
    ModelSource,
    download_hub_model,
    model_files,
    model_fingerprint,
    resolve_on_node,
    staging_root,
)
from workflows.runtime.model_preflight import model_source
from workflows.runtime.models import ModelNotFoundError, cache_dir

pytestmark = pytest.mark.fault  # kills, restarts or races: `make flake-hunt`

SCENARIO = Path(__file__).with_name("model_preflight_scenario.py")

# --- fingerprints and local checks, no Ray -------------------------------------------------


@pytest.fixture
def fake_model(tmp_path) -> Path:
    folder = tmp_path / "fake"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def test_fingerprint_follows_sizes_and_config_not_times(fake_model):
    before = model_fingerprint(fake_model)
    os.utime(fake_model / "model.safetensors", (1, 1))
    assert model_fingerprint(fake_model) == before, "mtime must not matter"
    (fake_model / ".ray-cai-complete").write_text("marker")
    assert model_fingerprint(fake_model) == before, "dotfiles are bookkeeping, not the model"

    (fake_model / "model.safetensors").write_bytes(b"\0" * 101)
    resized = model_fingerprint(fake_model)
    assert resized != before
    (fake_model / "config.json").write_text('{"model_type": "mistral"}')
    assert model_fingerprint(fake_model) != resized


def test_fingerprint_reads_the_weight_index(fake_model):
    index = fake_model / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    before = model_fingerprint(fake_model)
    index.write_text('{"weight_map": {"b": "model-1.safetensors"}}')  # same size, other map
    assert model_fingerprint(fake_model) != before


def test_path_source_resolves_on_this_machine(fake_model):
    source = model_source(str(fake_model), spec="./fake", stage=False)
    assert (source.kind, source.fingerprint) == ("path", model_fingerprint(fake_model))
    assert source.local_path() == str(fake_model.resolve())
    assert source.local_path() == str(fake_model.resolve()), "cached second call"


def test_hub_ids_are_downloaded_into_the_hugging_face_cache_under_its_lock(monkeypatch, tmp_path):
    """No hub here: ``snapshot_download`` is replaced by a fake that records whether the lock
    file, in the cache it downloads into, is held while it runs."""
    import huggingface_hub
    from huggingface_hub import constants

    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lock = tmp_path / ".locks" / "ray-cai-HuggingFaceTB--SmolLM2-135M-Instruct.lock"
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    calls = []

    def fake_download(repo_id, cache_dir, ignore_patterns):
        calls.append((repo_id, Path(cache_dir), lock.is_file(), "*.bin" in ignore_patterns))
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "model.safetensors").write_bytes(b"")
        return str(snapshot)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(model_source_module, "_RESOLVED", {})  # no other test's resolutions
    source = model_source(repo, spec=repo, stage=True)
    assert (source.kind, source.fingerprint, source.blobs) == ("hub", "", ())
    assert source.local_path() == str(snapshot)
    assert calls == [(repo, tmp_path, True, True)], "safetensors found: no *.bin fetched"
    assert not lock.exists(), "released"
    source.local_path()
    assert len(calls) == 1, "cached per process"


def test_a_hub_repo_without_safetensors_gets_its_bin_weights(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    skipped = []

    def fake_download(repo_id, cache_dir, ignore_patterns):
        skipped.append(ignore_patterns)
        return str(tmp_path)  # no *.safetensors in it

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert download_hub_model("org/old-model") == str(tmp_path)
    assert ["*.bin" in patterns for patterns in skipped] == [True, False]
    assert all("original/*" in patterns for patterns in skipped)


def test_a_missing_local_folder_is_refused_on_the_driver(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        model_source(str(tmp_path / "no-such-model"), spec="./no-such-model", stage=False)


def test_missing_folder_on_a_node_names_the_path_and_remedies(tmp_path):
    missing = tmp_path / "gone"
    source = ModelSource(spec="./gone", path=str(missing), kind="path", fingerprint="0" * 64)
    with pytest.raises(ModelNotOnNodeError) as raised:
        source.local_path()
    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError), "the CLI prints FileNotFoundError as a user error"
    assert str(missing) in message and "does not exist here" in message
    assert REMEDY in message and "RAY_CAI_CACHE" in message and "--stage-model" in message and "hub id" in message


def test_changed_folder_is_refused_with_both_fingerprints(fake_model):
    source = model_source(str(fake_model), spec="./fake", stage=False)
    (fake_model / "model.safetensors").write_bytes(b"\0" * 5)
    with pytest.raises(ModelNotOnNodeError, match="different files"):
        source.local_path()


def test_cache_dir_is_still_importable_from_models(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_CAI_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_staging_goes_to_the_nodes_temp_folder_or_the_stage_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what gettempdir() answers
    assert staging_root() == tmp_path / STAGING_FOLDER
    assert staging_root("/local/nvme/cai") == Path("/local/nvme/cai")


def test_staging_refuses_to_write_into_the_shared_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_CAI_CACHE", str(tmp_path / "shared"))
    source = ModelSource(spec="./m", path="/models/m", kind="staged", fingerprint="f" * 64,
                         stage_dir=str(tmp_path / "shared" / "staged"))
    with pytest.raises(ModelNotOnNodeError, match="inside the shared model cache"):
        source.local_path()
    assert not (tmp_path / "shared").exists(), "nothing written there"


def test_staging_copies_into_the_nodes_temp_folder_once_and_clears_a_dead_writers_partial(
        monkeypatch, tmp_path, fake_model):
    """``_stage_here`` without a cluster: the "object refs" are the chunks themselves."""
    import ray

    from tests.actors.test_atomic_files import dead_pid, tag_of

    monkeypatch.setattr(ray, "get", lambda chunk: chunk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    monkeypatch.setenv("RAY_CAI_CACHE", str(tmp_path / "shared"))
    monkeypatch.setattr(model_source_module, "_RESOLVED", {})
    fingerprint = model_fingerprint(fake_model)
    blobs = tuple((name, (path.read_bytes()[:50], path.read_bytes()[50:])) for name, path in model_files(fake_model))
    source = ModelSource(spec="./fake", path=str(fake_model), kind="staged", fingerprint=fingerprint, blobs=blobs)
    root = tmp_path / "node-tmp" / STAGING_FOLDER
    left_by_dead_writer = root / f".fake-{fingerprint[:12]}.partial-{tag_of(dead_pid())}"
    left_by_dead_writer.mkdir(parents=True)

    path, copied = resolve_on_node(source)
    assert Path(path) == root / f"fake-{fingerprint[:12]}"
    assert copied == sum(file.stat().st_size for _, file in model_files(fake_model))
    assert model_fingerprint(path) == fingerprint and (Path(path) / STAGED_MARKER).is_file()
    assert sorted(p.name for p in root.iterdir()) == [f"fake-{fingerprint[:12]}"], "no partial, no lock left"
    assert not (tmp_path / "shared").exists(), "the shared cache is never written"
    monkeypatch.setattr(model_source_module, "_RESOLVED", {})  # as another worker process
    assert resolve_on_node(source) == (path, 0)


def test_stage_dir_must_be_absolute():
    from core.cluster_options import ClusterOptions

    assert ClusterOptions(stage_dir="/mnt/nvme/cai").problems() == []
    assert [str(p) for p in ClusterOptions(stage_dir="relative/dir").problems()] == [
        "--stage-dir: 'relative/dir' (an absolute path, or empty)"]


# --- a fake cluster: two worker nodes with their own caches, in a subprocess --------------


@pytest.fixture(scope="module")
def scenario(tiny_model) -> dict:
    return run_scenario(SCENARIO, tiny_model, timeout=240)[0]


@pytest.mark.slow
def test_each_node_sees_its_own_cache(scenario):
    assert scenario["node_cache"] == scenario["caches"]


@pytest.mark.slow
def test_nodes_of_a_placement_group(scenario):
    assert sorted(scenario["pg_nodes"]) == sorted(scenario["ids"].values())


@pytest.mark.slow
def test_a_shared_folder_passes_on_every_node(scenario):
    paths = scenario["path_ok"]["paths"]
    assert paths["a"] == paths["b"] and len(paths["a"]) == 1
    assert scenario["path_ok"]["log"] == [f"model tiny present on 2 node(s) at {paths['a'][0]}"]


@pytest.mark.slow
def test_a_missing_folder_is_reported_for_every_node_at_once(scenario):
    missing = scenario["path_missing"]
    assert missing["raised"]
    message = missing["message"]
    assert message.startswith("model preflight failed on 2 of 2 node(s)")
    for node_id in scenario["ids"].values():
        assert f"node {node_id[:12]} (" in message
    assert message.count(f"{missing['path']} does not exist here") == 2
    assert "--stage-model" in message


@pytest.mark.slow
def test_a_worker_without_preflight_names_its_node_in_the_error(scenario):
    message = scenario["staged"]["error_in_actor_b"]
    assert f"is not usable on node {scenario['ids']['b'][:12]} (" in message
    assert scenario["path_missing"]["path"] in message and "--stage-model" in message


@pytest.mark.slow
def test_a_failure_on_one_node_names_only_that_node(scenario):
    broken = scenario["stage_b_broken"]
    assert broken["raised"] and broken["message"].startswith("model preflight failed on 1 of 2 node(s)")
    assert f"node {scenario['ids']['b'][:12]} (" in broken["message"]
    assert scenario["ids"]["a"][:12] not in broken["message"]
    assert scenario["caches"]["b"] in broken["message"]
    assert any("/tiny-other-" in marker for marker in scenario["markers_after_broken"]["a"]), "A staged it"


@pytest.mark.slow
def test_staging_copies_once_per_node_into_that_nodes_cache(scenario):
    staged = scenario["staged"]
    assert scenario["n_chunks"] > 2, "weights travel in several chunks"
    for node in ("a", "b"):
        first, second = staged["first"][node], staged["second"][node]
        (path,) = first["paths"]
        assert path.startswith(f"{scenario['caches'][node]}/{STAGING_FOLDER}/"), "the node's own temp folder"
        assert first["copied_bytes"][0] > 0 and second["copied_bytes"] == [0]
        assert second["paths"] == [path]
        assert staged["markers_after"][node] == staged["markers_first"][node], "no second copy"
        loaded = staged["loaded"][node]
        assert (loaded["node_id"], loaded["path"], loaded["model_type"]) == (scenario["ids"][node], path, "llama")
    assert staged["log_first"][0].startswith("staged model tiny to 2 node(s) in ")
    assert staged["log_second"] == ["staged model tiny already on 2 node(s)"]


@pytest.mark.slow
def test_concurrent_workers_on_one_node_copy_once(scenario):
    race = scenario["race"]
    assert [call["arrived"] for call in race] == [3, 3, 3], "all three asked at the same time"
    assert len({call["path"] for call in race}) == 1
    assert sorted(call["copied_bytes"] > 0 for call in race) == [False, False, True]


@pytest.mark.slow
def test_a_node_that_does_not_answer_is_reported_after_the_timeout(scenario):
    hung = scenario["hung_node"]
    assert hung["raised"] and 5 <= hung["seconds"] < 15
    assert f"node {scenario['ids']['b'][:12]} (" in hung["message"] and "no answer within 5 s" in hung["message"]
    assert scenario["ids"]["a"][:12] not in hung["message"]


@pytest.mark.slow
def test_a_removed_node_is_reported_not_waited_on(scenario):
    dead = scenario["dead_node"]
    assert dead["raised"] and dead["seconds"] < 15, "reported by the timeout at the latest"
    assert f"node {scenario['ids']['b'][:12]} (" in dead["message"]
    assert scenario["ids"]["a"][:12] not in dead["message"]


def test_the_preflight_gives_each_node_at_least_a_minute_and_forever_with_no_placement_timeout():
    """A short --placement-timeout (how long to wait for nodes) must not cut short a busy node's
    answer (test_join.py's 3 s saw "no answer within 3 s" on a loaded machine)."""
    from core.cluster_options import PREFLIGHT_MIN_TIMEOUT_S, ClusterOptions

    assert ClusterOptions(placement_timeout=3).preflight_timeout == PREFLIGHT_MIN_TIMEOUT_S
    assert ClusterOptions(placement_timeout=1800).preflight_timeout == 1800
    assert ClusterOptions(placement_timeout=0).preflight_timeout is None

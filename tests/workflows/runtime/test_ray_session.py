import os

import pytest
import ray

from workflows.runtime.ray_session import NAMESPACE, REAP_CHILDREN_ENV, connect_ray


def test_connect_starts_local_ray_once_in_the_cai_namespace(ray_local):
    assert ray.is_initialized()
    assert ray_local["namespace"] == NAMESPACE
    assert ray_local["nodes"] == 1 and ray_local["cpus"] == 4
    assert ray_local["local"] is True, "this process started the instance"
    again = connect_ray()
    assert again["address"] == ray_local["address"], "a second call reuses the running instance"

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]


def test_the_local_instance_reaps_its_workers_children(ray_local):
    """connect_ray starts the raylet with per-worker process groups: each worker leads a group of
    its own, the group the raylet kills when the worker exits (a vLLM engine's processes with it)."""

    @ray.remote(num_cpus=0)
    def process_group() -> tuple[int, int]:
        return os.getpid(), os.getpgid(0)

    pid, group = ray.get(process_group.remote())
    assert group == pid, f"the worker is not its own process group: is {REAP_CHILDREN_ENV} off?"


@pytest.mark.parametrize(("exported", "raylet_gets"), [(None, "1"), ("0", "0")])
def test_a_local_instance_starts_its_raylet_with_child_reaping_unless_told_otherwise(monkeypatch, exported,
                                                                                      raylet_gets):
    """The raylet that ray.init starts inherits this process's environment; what the user exported wins."""
    monkeypatch.setenv(REAP_CHILDREN_ENV, "unset by the test")  # restored (to absent) afterwards
    monkeypatch.delenv(REAP_CHILDREN_ENV)
    if exported is not None:
        monkeypatch.setenv(REAP_CHILDREN_ENV, exported)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = []

    class Started(Exception):
        pass

    def init(**kwargs):
        seen.append(os.environ.get(REAP_CHILDREN_ENV))
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Started):
        connect_ray()
    assert seen == [raylet_gets]

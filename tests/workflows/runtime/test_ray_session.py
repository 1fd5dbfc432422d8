import ray

from workflows.runtime.ray_session import NAMESPACE, connect_ray


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

"""An engine server that could not bind its port (uvicorn exits 3: another process took the port
between choosing and binding, seen on a loaded CI machine) is started again on another port; any
other early exit is raised at once."""
import pytest

from miles_ray.rollout.http import launch
from miles_ray.rollout.sglang.client import ServerExited


def _fake(monkeypatch, codes: list):
    ports = []

    def launch_server(backend, model_path, port, host, extra=None, **kwargs):
        ports.append(port)
        if codes:
            raise ServerExited(codes.pop(0))
        return "process", "client"

    monkeypatch.setattr(launch, "launch_server", launch_server)
    return ports


def test_a_port_taken_before_binding_is_retried(monkeypatch):
    ports = _fake(monkeypatch, [launch.BIND_FAILED, launch.BIND_FAILED])
    assert launch.launch_on_free_port("native", "m", "127.0.0.1") == ("process", "client")
    assert len(ports) == 3


@pytest.mark.parametrize("codes", [[1], [3, 3, 3]])
def test_other_failures_and_exhausted_tries_raise(monkeypatch, codes):
    ports = _fake(monkeypatch, list(codes))
    with pytest.raises(ServerExited):
        launch.launch_on_free_port("native", "m", "127.0.0.1")
    assert len(ports) == len(codes)

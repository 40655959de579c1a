"""An engine server that cannot bind its port (uvicorn exits 3: another process took the port
between choosing and binding, seen on a loaded CI machine) is started again on another port, for
real: a bound socket holds the first port (not listening, so nothing answers there), the native
server exits 3 there and serves on the next."""
import os
import signal
import socket

from miles_ray.rollout.http import launch


def test_a_taken_port_is_retried_on_another(tiny_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc, client = launch.launch_on_free_port("native", tiny_dir, "127.0.0.1", first_port=port,
                                                  log_path=str(tmp_path / "server.log"))
        try:
            assert not client.url.endswith(f":{port}")
            assert client.health() is not None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)

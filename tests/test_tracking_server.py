"""Against a real ``mlflow server`` on 127.0.0.1: concurrent runs are all recorded (slow suite).

The server is started by the test in its own process group and stopped by that group's id, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtbench.leaderboard import load_runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_concurrent_runs_against_a_real_tracking_server(server: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MTBENCH_HOME": str(tmp_path / "home")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "mtbench.cli", "run", "--method", "lora", "--task", "glue", "--seed",
                          str(seed), "--tracking-uri", server, "--set", "trainer.max_steps=3",
                          "--set", "task.synthetic_size=8", "--no-progress"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed in range(4)
    ]
    for proc in procs:
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-3000:]
    runs = load_runs(server)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}

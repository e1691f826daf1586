"""A process killed with SIGKILL leaves a RUNNING run; `mtbench runs` and the leaderboard recognise it as dead."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtbench.cli import main
from mtbench.tracking import STALE_AFTER_S, liveness


def test_liveness_rules() -> None:
    here, now = socket.gethostname(), time.time()
    assert liveness("FINISHED", here, "1", None, now) == "FINISHED"
    assert liveness("RUNNING", here, str(os.getpid()), None, now) == "RUNNING"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    assert liveness("RUNNING", here, dead_pid, None, now) == "DEAD"
    assert liveness("RUNNING", "elsewhere", "1", str(now - 60), now) == "RUNNING"
    assert liveness("RUNNING", "elsewhere", "1", str(now - STALE_AFTER_S - 1), now) == "DEAD"


def test_sigkilled_run_is_dead_and_excluded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    proc = subprocess.Popen([sys.executable, "-m", "mtbench.cli", "run", "--method", "lora", "--task", "glue",
                             "--tracking-uri", uri, "--set", "trainer.max_steps=100000", "--no-progress"],
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:
        try:
            with sqlite3.connect(db) as conn:
                if conn.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]:
                    break
        except sqlite3.OperationalError:
            pass
        assert proc.poll() is None and time.time() < deadline, "run never started"
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert main(["runs", "--tracking-uri", uri]) == 0
    assert " DEAD " in capsys.readouterr().out
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(tmp_path / "board")]) == 0
    markdown = (tmp_path / "board" / "LEADERBOARD.md").read_text()
    assert "1 DEAD" in markdown

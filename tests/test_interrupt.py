"""Ctrl-C and SIGTERM during training leave the run recorded as KILLED, with its result file."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _status(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select run_uuid, status from runs").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_marks_run_killed(sig: signal.Signals, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    command = [sys.executable, "-m", "mtbench.cli", "run", "--method", "lora", "--task", "glue", "--profile", "smoke",
               "--tracking-uri", f"sqlite:///{db}", "--set", "trainer.max_steps=100000", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while not any(s == "RUNNING" for _, s in _status(db)):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.time() < deadline, "run never started"
            time.sleep(0.5)
        time.sleep(4)  # inside the training loop
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert [s for _, s in _status(db)] == ["KILLED"]
    assert "KILLED" in out
    assert list(tmp_path.rglob("result.json")), "no result.json for the killed run"

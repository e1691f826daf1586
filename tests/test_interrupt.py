"""Ctrl-C and SIGTERM during training: the run is KILLED with a checkpoint, and ``--resume`` finishes it exactly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtbench.cli import main
from mtbench.leaderboard import load_runs


STEPS = ["--set", "trainer.max_steps=120", "--set", "trainer.val_check_interval=100000", "--no-progress"]


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def _mtbench(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtbench.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _interrupt_mid_training(sig: signal.Signals, tmp_path: Path) -> tuple[Path, str]:
    db = tmp_path / "m.db"
    proc = _mtbench("run", "--method", "lora", "--task", "glue", "--profile", "smoke", "--tracking-uri",
                    f"sqlite:///{db}", *STEPS, cwd=tmp_path)
    try:
        deadline = time.time() + 180
        # Wait until training has logged a few steps, so the signal lands inside the training loop.
        while not _query(db, "select 1 from metrics where key = 'train/loss' and step >= 20"):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.time() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    return db, out


@pytest.mark.slow  # the SIGTERM test below covers the same path (KILLED, checkpoint, result) in the default run
def test_sigint_marks_run_killed_with_checkpoint_and_result(tmp_path: Path) -> None:
    db, out = _interrupt_mid_training(signal.SIGINT, tmp_path)
    (run_id, status), = _query(db, "select run_uuid, status from runs")
    assert status == "KILLED" and "KILLED" in out
    assert (tmp_path / "checkpoints" / run_id / "last.ckpt").is_file()
    assert list(tmp_path.rglob("result.json")), "no result.json for the killed run"


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    db, _ = _interrupt_mid_training(signal.SIGTERM, tmp_path)
    (run_id, status), = _query(db, "select run_uuid, status from runs")
    stopped_at = _query(db, f"select max(step) from metrics where run_uuid = '{run_id}' and key = 'train/loss'")[0][0]
    assert status == "KILLED" and stopped_at < 119
    assert main(["run", "--resume", run_id, "--tracking-uri", f"sqlite:///{db}", "--no-progress"]) == 0
    reference_uri = f"sqlite:///{tmp_path / 'ref.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", reference_uri, *STEPS]) == 0
    resumed, reference = load_runs(f"sqlite:///{db}").iloc[0], load_runs(reference_uri).iloc[0]
    assert resumed["run_id"] == run_id and resumed["status"] == "FINISHED"
    keys = [c for c in reference.index if c.startswith("metrics.val/")]
    assert len(keys) > 15
    for key in keys:
        # Same seed, same batches, same optimizer state: the tolerance only absorbs float reordering.
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    assert not (tmp_path / "checkpoints" / run_id / "last.ckpt").exists(), "checkpoint kept after FINISHED"


def test_resume_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--set", "trainer.max_steps=2",
                 "--no-progress"]) == 0
    run_id = load_runs(uri).iloc[0]["run_id"]
    capsys.readouterr()
    assert main(["run", "--resume", run_id, "--tracking-uri", uri]) == 2
    assert "already FINISHED" in capsys.readouterr().err
    assert main(["run", "--resume", "0" * 32, "--tracking-uri", uri]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["run", "--resume", run_id, "--method", "lora", "--tracking-uri", uri]) == 2

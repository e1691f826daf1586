"""``mtbench run`` processes started together against one sqlite store all finish and are all recorded.

The default run starts 4 processes on a new store (the migration race); the slow suite 8 on an existing one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtbench.leaderboard import load_runs


def _launch(db: Path, seed: int, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mtbench.cli", "run", "--method", "lora", "--task", "glue", "--seed", str(seed),
               "--tracking-uri", f"sqlite:///{db}", "--set", "trainer.max_steps=3", "--set", "task.synthetic_size=8",
               "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize(
    "fresh_store, count",
    [(True, 4), pytest.param(False, 8, marks=pytest.mark.slow)],
    ids=["4_on_new_store", "8_on_existing_store"],
)
def test_concurrent_runs_on_one_sqlite_store(fresh_store: bool, count: int, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    if not fresh_store:
        assert _launch(db, 99, tmp_path).wait(timeout=300) == 0
    procs = [_launch(db, seed, tmp_path) for seed in range(count)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    runs = load_runs(f"sqlite:///{db}")
    assert len(runs) == count + (0 if fresh_store else 1)
    assert set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["tags.mtbench.seed"].astype(int))[:count] == list(range(count))

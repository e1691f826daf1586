"""A run's status is mtbench's own: a process killed with SIGKILL leaves a RUNNING run that `mtbench runs` and the
leaderboard recognise as dead; a run whose outcome cannot be recorded is FAILED; sweeps re-run cells without a
result."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtbench.cli import main
from mtbench.leaderboard import load_runs
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


READY_PLUGIN = """
import signal

import lightning.pytorch as pl

from mtbench import register_method
from mtbench.methods.lora import LoRA


class Ready(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        if trainer.global_step == 2:
            print("READY", flush=True)
            signal.pause()  # wait here for the test's SIGKILL


@register_method("lora_wait")
class LoRAWait(LoRA):
    def callbacks(self):
        return [Ready()]
"""


def test_sigkilled_run_is_dead_and_excluded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plugin = tmp_path / "wait_plugin.py"
    plugin.write_text(READY_PLUGIN)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "mtbench.cli", "run", "--plugin", str(plugin), "--method",
                             "lora_wait", "--task", "glue", "--tracking-uri", uri, "--no-progress"],
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        # Blocks until the run is training (an event, not a clock); EOF if it died first.
        assert any(line.strip() == "READY" for line in proc.stdout), "the run ended before training"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert main(["runs", "--tracking-uri", uri]) == 0
    assert " DEAD " in capsys.readouterr().out
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(tmp_path / "board")]) == 0
    markdown = (tmp_path / "board" / "LEADERBOARD.md").read_text()
    assert "1 DEAD" in markdown


def test_recording_failure_is_failed_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A full disk when the result is written: FAILED with the reason in one line, never FINISHED without a
    result, and no traceback."""
    from mtbench import execute

    def full_disk(path: object, result: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(execute, "write_result", full_disk)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--no-progress",
                 "--set", "trainer.max_steps=2"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    line = captured.out.strip().splitlines()[-1]
    assert line.endswith("FAILED: recording the outcome failed (OSError: [Errno 28] No space left on device); the run "
                         "had ended FINISHED")
    run = load_runs(uri).iloc[0]
    assert run["status"] == "FAILED" and "No space left on device" in run["tags.mtbench.error"]


def test_sweep_reruns_a_finished_run_without_its_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A FINISHED run whose result.json is missing (recorded by an older version before it had evaluated) does not
    count as done."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sweep = ["sweep", "--methods", "lora", "--tasks", "glue", "--tracking-uri", uri, "--set", "trainer.max_steps=2"]
    assert main(sweep) == 0
    assert main(sweep) == 0
    assert "0 finished, 1 skipped" in capsys.readouterr().out
    (result,) = tmp_path.rglob("result.json")
    result.unlink()
    assert main(sweep) == 0
    assert "1 finished, 0 skipped" in capsys.readouterr().out

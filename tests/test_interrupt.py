"""Ctrl-C and SIGTERM in every window of a run: KILLED with a checkpoint, and ``--resume`` finishes it exactly.

The signals are sent from inside the run, by a callback that fires at a chosen hook and step, so each test hits its
window every time and waits on events (the callback, the process's own output), never on a clock.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from mtbench.cli import main
from mtbench.leaderboard import load_runs
from mtbench.methods.lora import LoRA


# Two subtasks of 32 generated examples in batches of 16: an epoch is 4 batches.
COMMON = ["--method", "lora", "--task", "glue", "--no-progress", "--set", "task.subtasks=[rte,sst2]",
          "--set", "trainer.log_every_n_steps=1"]
BASE = [*COMMON, "--set", "trainer.max_steps=12"]
PERIODIC = [*BASE, "--set", "trainer.val_check_interval=5"]
ACCUMULATE = [*COMMON, "--set", "trainer.accumulate_grad_batches=2", "--set", "trainer.max_steps=6",
              "--set", "trainer.val_check_interval=3"]


class SignalAt(pl.Callback):
    """Sends ``sig`` to this process once, in ``hook`` when ``when(trainer)`` holds (listed after mtbench's own
    callbacks, so ``train_batch_end`` fires after theirs)."""

    def __init__(self, hook: str, when: Callable[[Any], bool], sig: int = signal.SIGTERM) -> None:
        self.hook, self.when, self.sig, self.fired = hook, when, sig, False

    def _maybe(self, trainer: Any, hook: str) -> None:
        if not self.fired and hook == self.hook and self.when(trainer):
            self.fired = True
            os.kill(os.getpid(), self.sig)  # the Python handler runs before the next bytecode

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._maybe(trainer, "train_batch_start")

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._maybe(trainer, "train_batch_end")

    def on_validation_batch_start(self, trainer: Any, *args: Any) -> None:
        self._maybe(trainer, "val_batch_start" if trainer.state.fn == "fit" else "final_eval")


def _signal_at(monkeypatch: pytest.MonkeyPatch, callback: SignalAt) -> None:
    monkeypatch.setattr(LoRA, "callbacks", lambda self: [callback])


def _history(db: Path, run_id: str) -> dict[tuple[str, int], list[float]]:
    """Every training and validation value the run logged, by (key, step)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select key, step, value from metrics where run_uuid = ? and "
                            "(key like 'train/%' or key like 'val/%')", (run_id,)).fetchall()
    out: dict[tuple[str, int], list[float]] = {}
    for key, step, value in rows:
        out.setdefault((key, step), []).append(value)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Uninterrupted runs of each configuration, keyed by name."""
    out = {}
    for name, args in (("periodic", PERIODIC), ("accumulate", ACCUMULATE)):
        db = tmp_path_factory.mktemp(name) / "ref.db"
        assert main(["run", *args, "--tracking-uri", f"sqlite:///{db}"]) == 0
        out[name] = (db, load_runs(f"sqlite:///{db}").iloc[0]["run_id"])
    return out


def _interrupt_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                          callback: SignalAt) -> tuple[Path, str, str]:
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    _signal_at(monkeypatch, callback)
    assert main(["run", *args, "--tracking-uri", uri]) == 130
    assert callback.fired
    run = load_runs(uri).iloc[0]
    run_id = run["run_id"]
    assert run["status"] == "KILLED"
    error = run["tags.mtbench.error"]
    assert "checkpoint saved at step" in error, error
    assert (tmp_path / "checkpoints" / run_id / "last.ckpt").is_file()
    assert list(tmp_path.rglob("result.json")), "no result.json for the killed run"
    assert main(["run", "--resume", run_id, "--tracking-uri", uri, "--no-progress"]) == 0
    resumed = load_runs(uri).iloc[0]
    assert resumed["status"] == "FINISHED"
    assert "tags.mtbench.error" not in resumed or resumed["tags.mtbench.error"] in (None, ""), "stale error tag"
    assert not (tmp_path / "checkpoints" / run_id / "last.ckpt").exists(), "checkpoint kept after FINISHED"
    assert not list((tmp_path / "checkpoints").iterdir()), "resume files (folder, lock) kept after FINISHED"
    return db, run_id, error


def _assert_same_history(db: Path, run_id: str, reference: tuple[Path, str]) -> None:
    resumed, expected = _history(db, run_id), _history(*reference)
    assert set(resumed) == set(expected), sorted(set(resumed) ^ set(expected))[:10]
    assert sum(k[0].startswith("val/") for k in expected) >= 6  # 3 keys, validated at least twice
    for key, values in expected.items():
        # Same seed, batches, optimizer and dropout stream: the tolerance only absorbs float reordering.
        assert resumed[key] == pytest.approx(values, abs=1e-6), key


WINDOWS = {
    # name: (configuration, hook, condition, step the checkpoint must hold)
    "during_step": ("periodic", "train_batch_start", lambda t: t.global_step == 6, 7),
    "after_batch_end": ("periodic", "train_batch_end", lambda t: t.global_step == 6, 7),
    "after_batch_end_before_validation": ("periodic", "train_batch_end", lambda t: t.global_step == 5, 5),
    "periodic_validation": ("periodic", "val_batch_start", lambda t: t.global_step == 5, 5),
    "epoch_boundary": ("periodic", "train_batch_start", lambda t: t.global_step == 3, 4),
    "final_evaluation": ("periodic", "final_eval", lambda t: True, 12),
    "mid_accumulation_window": ("accumulate", "train_batch_start",
                                lambda t: t.fit_loop.epoch_loop.total_batch_idx == 4, 3),
}
DEFAULT_RUN = {"after_batch_end", "final_evaluation", "mid_accumulation_window"}


@pytest.mark.parametrize("window", [pytest.param(w, marks=() if w in DEFAULT_RUN else pytest.mark.slow)
                                    for w in WINDOWS])
def test_sigterm_in_every_window_resumes_to_the_uninterrupted_run(
        window: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, references: dict[str, tuple[Path, str]]
) -> None:
    config, hook, when, step = WINDOWS[window]
    args = PERIODIC if config == "periodic" else ACCUMULATE
    db, run_id, error = _interrupt_and_resume(tmp_path, monkeypatch, args, SignalAt(hook, when))
    assert f"checkpoint saved at step {step}" in error
    _assert_same_history(db, run_id, references[config])


def test_validation_interval_counts_optimizer_steps(references: dict[str, tuple[Path, str]]) -> None:
    """accumulate_grad_batches=2, val_check_interval=3, max_steps=6: validated after optimizer steps 3 and 6, logged
    (like train/loss) at the 0-based index of that step, 2 and 5. Lightning alone counts batches: it validated after
    batches 3, 6, 9 and 12, logged at 1, 2, 4 and 5 (measured by running without the conversion)."""
    steps = sorted(step for key, step in _history(*references["accumulate"]) if key == "val/avg")
    assert steps == [2, 5]


def test_sigint_marks_run_killed_with_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callback = SignalAt("train_batch_start", lambda t: t.global_step == 2, signal.SIGINT)
    _signal_at(monkeypatch, callback)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    run = load_runs(uri).iloc[0]
    assert run["status"] == "KILLED" and "checkpoint saved at step 3" in run["tags.mtbench.error"]
    assert signal.getsignal(signal.SIGINT) is before, "Ctrl-C handler not restored"


def test_second_resume_of_a_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """While a resume trains, a second ``--resume`` of the same run refuses in one line and changes nothing."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _signal_at(monkeypatch, SignalAt("train_batch_start", lambda t: t.global_step == 2))
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    run_id = load_runs(uri).iloc[0]["run_id"]
    answers = []

    class ResumeAgain(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if not answers:
                capsys.readouterr()
                answers.append(main(["run", "--resume", run_id, "--tracking-uri", uri]))
                answers.append(capsys.readouterr().err)

    monkeypatch.setattr(LoRA, "callbacks", lambda self: [ResumeAgain()])
    assert main(["run", "--resume", run_id, "--tracking-uri", uri, "--no-progress"]) == 0
    assert answers[0] == 2 and "being trained or resumed by another process" in answers[1]
    assert answers[1].count("\n") == 1
    assert load_runs(uri).iloc[0]["status"] == "FINISHED"


def test_truncated_checkpoint_is_refused_and_the_record_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _signal_at(monkeypatch, SignalAt("train_batch_start", lambda t: t.global_step == 2))
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    before = load_runs(uri).iloc[0]
    checkpoint = tmp_path / "checkpoints" / before["run_id"] / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    capsys.readouterr()
    assert main(["run", "--resume", before["run_id"], "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err and "last.ckpt" in err
    after = load_runs(uri).iloc[0]
    assert after["status"] == "KILLED" and after["tags.mtbench.error"] == before["tags.mtbench.error"]


def test_full_disk_at_checkpoint_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint write that fails half-way (ENOSPC after creating the file) leaves neither a 0-byte temporary
    file nor a checkpoint, and the run is KILLED saying it cannot be resumed."""
    import errno

    import lightning.pytorch as lp

    def full_disk(self: Any, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(lp.plugins.io.TorchCheckpointIO, "save_checkpoint", full_disk)
    _signal_at(monkeypatch, SignalAt("train_batch_start", lambda t: t.global_step == 2))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    run = load_runs(uri).iloc[0]
    assert run["status"] == "KILLED"
    assert "could not be saved" in run["tags.mtbench.error"] and "No space left" in run["tags.mtbench.error"]
    folder = tmp_path / "checkpoints" / run["run_id"]
    assert not list(folder.iterdir()) if folder.exists() else True, list(folder.iterdir())


def test_sigterm_while_the_model_is_built_gives_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    original = LoRA.apply

    def apply_then_signal(self: Any, backbone: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, backbone)

    monkeypatch.setattr(LoRA, "apply", apply_then_signal)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    err = capsys.readouterr().err
    assert err == "mtbench: interrupted\n"
    assert load_runs(uri).empty


def test_ctrl_c_lost_in_a_finaliser_before_training_still_stops_the_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C whose KeyboardInterrupt is raised while a finaliser runs (SQLAlchemy's garbage-collection callback
    does, as MLflow's store is set up) is printed as "Exception ignored" and lost. The noted signal still stops the
    run, at its first resumable point, KILLED with a checkpoint, instead of letting it train to FINISHED."""
    original = LoRA.apply

    class SignalsWhenCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs inside the finaliser, which swallows its raise

    def apply_after_a_lost_signal(self: Any, backbone: Any) -> Any:
        SignalsWhenCollected()  # collected at once
        return original(self, backbone)

    monkeypatch.setattr(LoRA, "apply", apply_after_a_lost_signal)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", *BASE, "--tracking-uri", uri]) == 130
    run = load_runs(uri).iloc[0]
    assert run["status"] == "KILLED" and "checkpoint saved at step 1" in run["tags.mtbench.error"], \
        run["tags.mtbench.error"]


def test_sigterm_before_the_run_is_built_gives_one_line_too(tmp_path: Path) -> None:
    """A SIGTERM that arrives while mtbench is still loading (here: while it imports a plugin, before any
    configuration or model) ends the process the same way: one line, exit status 130, nothing recorded."""
    plugin = tmp_path / "stop_on_import.py"
    plugin.write_text("import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGTERM)\n")
    db = tmp_path / "m.db"
    done = subprocess.run([sys.executable, "-m", "mtbench.cli", "run", "--plugin", str(plugin), *BASE,
                           "--tracking-uri", f"sqlite:///{db}"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert (done.returncode, done.stderr) == (130, "mtbench: interrupted\n")
    assert not db.exists()


def _subprocess(plugin: Path, db: Path, sets: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtbench.cli", "run", "--plugin", str(plugin), "--method",
                             "lora_ready", "--task", "glue", "--tracking-uri", f"sqlite:///{db}", "--no-progress",
                             *sets], cwd=db.parent, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


READY_PLUGIN = '''
import os
import signal
import time

import lightning.pytorch as pl

from mtbench import register_method
from mtbench.methods.lora import LoRA


class Ready(pl.Callback):
    """Prints READY at step 20 and waits for a signal; with `final`, SIGKILLs itself in the final evaluation."""

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        if trainer.global_step == 20 and not os.environ.get("READY_FINAL"):
            print("READY", flush=True)
            handler = signal.getsignal(signal.SIGTERM)  # mtbench's stop handler; wait until it has the signal
            while handler.__self__.received is None:
                time.sleep(0.01)

    def on_validation_batch_start(self, trainer, *args):
        if trainer.state.fn == "validate" and os.environ.get("READY_FINAL"):
            os.kill(os.getpid(), signal.SIGKILL)


@register_method("lora_ready")
class LoRAReady(LoRA):
    def callbacks(self):
        return [Ready()]
'''


def _ready_plugin(tmp_path: Path) -> Path:
    plugin = tmp_path / "ready_plugin.py"
    plugin.write_text(textwrap.dedent(READY_PLUGIN))
    return plugin


def test_external_sigterm_kills_with_checkpoint(tmp_path: Path) -> None:
    """A real SIGTERM from another process: sent once the run says it is mid-training (no clock involved)."""
    db = tmp_path / "m.db"
    proc = _subprocess(_ready_plugin(tmp_path), db, ["--set", "trainer.max_steps=40"])
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # blocks until the run prints; ends at EOF if it dies first
            lines.append(line)
            if line.strip() == "READY":
                break
        else:
            pytest.fail("the run ended before training started:\n" + "".join(lines)[-2000:])
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    run = load_runs(f"sqlite:///{db}").iloc[0]
    assert run["status"] == "KILLED" and "checkpoint saved at step 21" in run["tags.mtbench.error"]
    assert "Traceback" not in out


def test_sigkill_during_final_evaluation_leaves_a_dead_run_that_a_sweep_reruns(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Lightning's logger would mark the run FINISHED when fit returns; mtbench's status stays RUNNING until it has
    recorded, so a run killed in the final evaluation is DEAD, excluded, and run again by a sweep."""
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    plugin = _ready_plugin(tmp_path)
    sets = ["--set", "trainer.max_steps=4", "--set", "task.subtasks=[rte,sst2]"]
    proc = _subprocess(plugin, db, sets, READY_FINAL="1")
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    (run_id, status), = sqlite3.connect(db).execute("select run_uuid, status from runs").fetchall()
    assert status == "RUNNING"
    assert main(["runs", "--tracking-uri", uri]) == 0
    assert " DEAD " in capsys.readouterr().out
    assert main(["sweep", "--plugin", str(plugin), "--methods", "lora_ready", "--tasks", "glue",
                 "--tracking-uri", uri, *sets]) == 0
    out = capsys.readouterr().out
    assert "1 finished, 0 skipped" in out, out

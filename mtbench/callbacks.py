"""Measurement callbacks, identical for every method and task: parameters, throughput, peak memory, wall time.

Also the stop-on-signal logic (:class:`GracefulStop`) and the heartbeat that tells a live run from a dead one.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from .errors import take_pending_signal
from .interfaces import adapter_roles


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Adapter-only, all trainable (incl. heads and unfrozen backbone parts) and total parameter counts.

    Trainable means ``requires_grad``; the runner freezes what no gradient reaches before training
    (:func:`mtbench.runner.freeze_unused`), so on a fitted module it counts exactly what trains.
    """
    params = dict(model.named_parameters())
    adapter = sum(params[n].numel() for n in adapter_roles(model) if n in params)
    return {
        "adapter": adapter,
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "total": sum(p.numel() for p in params.values()),
    }


def device_name(device: torch.device) -> str:
    """A human-readable device name (GPU model, or the CPU with its thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


BATCH_SIZE_KEY = "_mtbench_batch_size"
"""Batch key under which the runner leaves ``Task.batch_size`` of the batch, counted on the host before the batch
moves to the device (``BenchModule.on_before_batch_transfer``): counting device tensors would wait for the
device once per step."""


def _batch_size(pl_module: Any, batch: Any) -> tuple[int, int]:
    """(examples, tokens) of ``batch``: as counted on the host, else from the batch itself."""
    counted = batch.get(BATCH_SIZE_KEY) if isinstance(batch, dict) else None
    return counted if counted is not None else pl_module.task.batch_size(batch)


class _Clock:
    """Time stamps on the device's own timeline, without stopping the host.

    On CUDA a stamp is an event recorded on the current stream (``torch.cuda.Event(enable_timing=True)``): the time
    between two stamps is the time the GPU took from one to the other, read once the later one has completed, so
    timing a step never waits for the GPU. On CPU a stamp is ``time.perf_counter()``.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, stamp: Any) -> bool:
        """Whether ``stamp`` can be read without waiting (a CUDA event the stream has passed)."""
        return not self.cuda or stamp.query()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from ``start`` to ``end``; on CUDA this waits for ``end`` if the stream has not reached it."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


class Measurements(pl.Callback):
    """Training throughput (end to end and compute only), evaluation throughput, peak memory, and what the run ran on.

    Everything that describes the run (device, precision, world size, parameter counts) is captured in
    ``on_fit_start``, when Lightning has put the model on its device; after ``fit`` its teardown moves the module
    back to the CPU, so nothing is read from the module then. :meth:`summary` gives the figures logged under
    ``perf/``:

    - ``train_samples_per_s`` (headline, end to end): samples of the timed steps over the wall time from the end of
      the last warm-up step to the end of the last step, validation excluded; it includes waiting for the data
      loader, so it is the rate a run actually trains at.
    - ``train_compute_samples_per_s``: the same samples over the time spent inside the steps (``on_train_batch_start``
      to ``on_train_batch_end``: forward, backward, optimizer step), i.e. without data waiting.
    - ``train_data_wait_share``: ``1 - compute / end-to-end`` time, the share of step time spent waiting for data
      (and in the loop's own between-step work).
    - ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` since the model was put on the device (reset then;
      ``memory_kind = cuda_max_allocated``), plus ``peak_reserved_mb`` (``max_memory_reserved``, what the caching
      allocator held); on CPU the process's peak resident set (``cpu_peak_rss``; interpreter and libraries included).

    On CUDA the steps are timed with CUDA events, so timing adds no host-device synchronisation per step; the clock
    is synchronised only where validation starts and ends (to exclude it) and at the end. Lightning's
    ``ThroughputMonitor`` logs rolling per-step windows; a leaderboard needs one figure per run measured the same way
    everywhere (after a warm-up, summed over ranks), hence this callback.
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.values: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self._clock = _Clock(self.device)
        self._fit_start = time.perf_counter()
        self._open: Any = None  # stamp where the timed window opened (end of the last warm-up step)
        self._last_end: Any = None  # stamp at the end of the last timed step
        self._step_start: Any = None
        self._pending: list[tuple[Any, Any]] = []  # (start, end) stamps of steps not yet read
        self._compute_s = self._excluded_s = self._val_s = 0.0
        self._samples = self._tokens = self._timed_steps = 0
        self._val_start: Any = None
        self._eval_start: Any = None
        self._eval_s = 0.0
        self._eval_samples = self._eval_batch_samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.device = pl_module.device
        self._clock = _Clock(self.device)
        first = next(iter(pl_module.parameters()), None)
        self.values.update(
            params=count_parameters(pl_module), device=device_name(self.device), device_type=self.device.type,
            precision=str(trainer.precision), world_size=trainer.world_size,
            param_dtype=str(first.dtype).removeprefix("torch.") if first is not None else "none",
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._open is not None:
            self._step_start = self._clock.stamp()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self._step_start is not None:
            end = self._clock.stamp()
            self._pending.append((self._step_start, end))
            self._last_end, self._step_start = end, None
            # A validation since the last step ended lies inside the window: not training time.
            self._excluded_s, self._val_s = self._excluded_s + self._val_s, 0.0
            samples, tokens = _batch_size(pl_module, batch)
            self._samples += samples
            self._tokens += tokens
            self._timed_steps += 1
            # Read the steps the device has already finished; never wait for one.
            while self._pending and self._clock.ready(self._pending[0][1]):
                self._compute_s += self._clock.seconds(*self._pending.pop(0))
        elif self._open is None and trainer.global_step >= self.warmup_steps:
            self._open = self._last_end = self._clock.stamp()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # periodic validation, not the evaluation after fit
            self._val_start = self._clock.stamp()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start = self._clock.stamp()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dl: int = 0
    ) -> None:
        self._eval_batch_samples += _batch_size(pl_module, batch)[0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks run before the module's hook, so the metrics' compute at epoch end is not counted.
        self._eval_s += self._clock.seconds(self._eval_start, self._clock.stamp())
        self._eval_samples += self._eval_batch_samples
        self._eval_batch_samples = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open is not None and self._val_start is not None:
            # Excluded once a timed step follows it (one after the last step is outside the window anyway).
            self._val_s += self._clock.seconds(self._val_start, self._clock.stamp())
        self._val_start = None

    def summary(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """Final figures (summed over ranks), peak memory and wall time; reads nothing from the module."""
        world = int(self.values.get("world_size", 1))
        perf: dict[str, Any] = {"wall_s": time.perf_counter() - self._fit_start, "timed_steps": self._timed_steps}
        for start, end in self._pending:
            self._compute_s += self._clock.seconds(start, end)
        self._pending.clear()
        end_to_end = (self._clock.seconds(self._open, self._last_end) - self._excluded_s
                      if self._timed_steps else 0.0)
        if end_to_end > 0 and self._compute_s > 0:
            # Every rank processes its own batch in the same wall time, so global throughput is the per-rank rate
            # times the number of ranks.
            perf["train_samples_per_s"] = world * self._samples / end_to_end
            perf["train_compute_samples_per_s"] = world * self._samples / self._compute_s
            perf["train_data_wait_share"] = max(0.0, 1.0 - self._compute_s / end_to_end)
            if self._tokens:
                perf["train_tokens_per_s"] = world * self._tokens / end_to_end
                perf["train_compute_tokens_per_s"] = world * self._tokens / self._compute_s
        if self._eval_s > 0:
            perf["eval_samples_per_s"] = world * self._eval_samples / self._eval_s
        if self.device.type == "cuda":
            perf["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            perf["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
            perf["memory_kind"] = "cuda_max_allocated"
        else:
            perf["peak_mem_mb"] = _peak_rss_mb()
            perf["memory_kind"] = "cpu_peak_rss"
        return perf


_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (Linux), so each run in one process is measured alone."""
    # Not Linux, or not permitted: the process-lifetime peak is reported instead.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    """Peak resident set size since the last reset (``VmHWM``), else since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary name beside ``path``, then rename: never a truncated file.

    If writing fails (a full disk, say), the temporary file is removed and the error raised; ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunInterrupted(BaseException):
    """Ends ``fit`` or ``validate`` at once after a stop signal, once the checkpoint is handled.

    A ``BaseException``, so no ``except Exception`` in a plugin swallows it, and not a ``KeyboardInterrupt``, which
    Lightning turns into ``sys.exit(1)`` after setting Ctrl-C to be ignored for the rest of the process.
    """


def _validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs periodic validation right after the current training batch.

    Mirrors the batch-count rule of Lightning's training epoch loop (``val_check_batch`` counted over all epochs when
    ``check_val_every_n_epoch`` is None, within the epoch otherwise; or the epoch's last batch), from public
    attributes. Time-based ``val_check_interval`` is not used by mtbench.
    """
    loop = trainer.fit_loop.epoch_loop
    every_epochs = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or every_epochs is not None and (trainer.current_epoch + 1) % every_epochs:
        return False
    every = trainer.val_check_batch
    if every is None or every == float("inf"):
        return bool(loop.batch_progress.is_last_batch)
    index = loop.total_batch_idx if every_epochs is None else loop.batch_idx
    return (index + 1) % int(every) == 0


class GracefulStop(pl.Callback):
    """Ctrl-C or SIGTERM: stop at the next point where the run can be resumed exactly, save a checkpoint, end KILLED.

    Where the signal lands decides where the run stops (``mtbench run --resume`` then continues bit for bit):

    - during a training step: at the end of that optimizer step; inside a gradient-accumulation window, at the end
      of the window (a checkpoint in the middle would lose the accumulated gradients);
    - between steps, or during periodic validation: that validation (if the step has one) finishes and is logged,
      then the checkpoint is saved in ``on_validation_end``; otherwise at the end of the next optimizer step;
    - after the last step or during the final evaluation: the evaluation stops at the next batch and the checkpoint
      holds the trained model, so the resumed run only evaluates.

    Lightning registers its own SIGTERM handler when ``fit``/``validate`` starts (after ``on_fit_start``) and would
    raise ``SIGTERMException`` at the next step end, before a deferred stop can save; this callback reinstalls its
    handler in ``on_train_start`` and ``on_validation_start`` so that it alone decides. A second Ctrl-C interrupts at
    once (no checkpoint). Handlers can only be installed from the main thread; elsewhere nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.saved_step: int | None = None
        self.save_error: str | None = None
        self._installed = False
        self._last_step = -1
        self._stop_next = False

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler: note the first signal; a second Ctrl-C interrupts at once."""
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Any:
        """Handle SIGINT and SIGTERM with :meth:`handle` inside the block; restore the previous handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        self._installed = True
        # A stop signal that arrived before, while its KeyboardInterrupt was swallowed (raised inside a finaliser or
        # a garbage-collection callback while the store was set up), stops the run at its first resumable point.
        if (pending := take_pending_signal()) is not None and self.received is None:
            self.received = pending
        try:
            yield
        finally:
            self._installed = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _reinstall(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self.handle)

    def save(self, trainer: pl.Trainer) -> None:
        """Save the resumable checkpoint (atomically); a failed write is noted, not raised."""
        try:
            save_checkpoint_atomic(trainer, self.checkpoint)
            self.saved_step = trainer.global_step
        except OSError as exc:
            self.save_error = f"{exc.__class__.__name__}: {exc.strerror or exc}"

    def save_and_stop(self, trainer: pl.Trainer) -> None:
        """Save the checkpoint and end the Lightning call at once with :class:`RunInterrupted`."""
        self.save(trainer)
        raise RunInterrupted(self.describe(trainer.global_step))

    def _stop_if_saved(self, trainer: pl.Trainer) -> None:
        if self._stop_next:
            raise RunInterrupted(self.describe(trainer.global_step))

    def describe(self, step: int) -> str:
        """One line: the signal and what was saved."""
        what = f"signal {self.received}"
        if self.save_error:
            return f"{what}; the checkpoint at step {step} could not be saved ({self.save_error}), so the run " \
                   "cannot be resumed"
        return f"{what}; checkpoint saved at step {step}" if self.saved_step is not None else what

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reinstall()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if self.received is None or not stepped:
            return  # no signal, or inside a gradient-accumulation window: stop at the window's end
        if _validates_after_this_batch(trainer):
            return  # Lightning would skip this step's validation on resume: save after it, in on_validation_end
        # Saved now, stopped at the next hook: Lightning sends this step's logged values to the logger after
        # on_train_batch_end, and the resumed run starts after this step.
        self.save(trainer)
        self._stop_next = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)  # before epoch-end work (a method's stage fold) the checkpoint does not hold

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)
        if self.received is not None:  # after the last step: save the trained model before the final evaluation
            self.save_and_stop(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reinstall()
        if self.received is not None and trainer.state.fn != "fit":
            raise RunInterrupted(self.describe(trainer.global_step))

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dl: int = 0
    ) -> None:
        if self.received is not None and trainer.state.fn != "fit":
            raise RunInterrupted(self.describe(trainer.global_step))  # the final evaluation: stop at once

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save_and_stop(trainer)


class Heartbeat(pl.Callback):
    """Calls ``beat()`` at most every ``every_s`` seconds while training, so a crashed process can be told apart
    from a live one by the age of its last beat."""

    def __init__(self, beat: Any, every_s: float = 30.0) -> None:
        self.beat, self.every_s, self._last = beat, every_s, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self._maybe_beat(trainer)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dl: int = 0
    ) -> None:
        self._maybe_beat(trainer)  # a long evaluation is not a dead run

    def _maybe_beat(self, trainer: pl.Trainer) -> None:
        now = time.time()
        if trainer.is_global_zero and now - self._last >= self.every_s:
            self._last = now
            self.beat()

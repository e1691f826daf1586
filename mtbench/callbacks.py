"""Measurement callbacks, identical for every method and task: parameters, throughput, peak memory, wall time.

Lightning's ``ThroughputMonitor`` logs rolling per-step windows; a leaderboard needs one figure per run measured the
same way everywhere (timed steps after a warm-up, synchronised on GPU, summed over ranks), so the timing is here.
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Measurements(pl.Callback):
    """Times training steps after ``warmup_steps`` and evaluation batches, and records peak memory.

    Results land in :attr:`values` (also logged under ``perf/`` and ``params/``). Peak memory is
    ``torch.cuda.max_memory_allocated`` (reset once the model is on the device) on CUDA, and the process's peak
    resident set size on CPU (which includes the interpreter and libraries; tagged ``memory_kind``).
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.values: dict[str, Any] = {}
        self._train_time = 0.0
        self._train_samples = self._train_tokens = self._timed_steps = 0
        self._eval_time = 0.0
        self._eval_samples = 0
        self._t0 = self._fit_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.values["params"] = count_parameters(pl_module)
        self.values["device"] = device_name(pl_module.device)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            _reset_peak_rss()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step >= self.warmup_steps:
            _sync(pl_module.device)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self._t0:
            _sync(pl_module.device)
            self._train_time += time.perf_counter() - self._t0
            samples, tokens = pl_module.task.batch_size(batch)
            self._train_samples += samples
            self._train_tokens += tokens
            self._timed_steps += 1
            self._t0 = 0.0

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int, dl: int = 0
    ) -> None:
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dl: int = 0
    ) -> None:
        _sync(pl_module.device)
        self._eval_time += time.perf_counter() - self._t0
        self._eval_samples += pl_module.task.batch_size(batch)[0]
        self._t0 = 0.0

    def summary(self, trainer: pl.Trainer, device: torch.device) -> dict[str, Any]:
        """Final figures: throughput summed over ranks, peak memory, wall time."""
        world = trainer.world_size
        perf: dict[str, Any] = {"wall_s": time.perf_counter() - self._fit_start, "timed_steps": self._timed_steps}
        if self._train_time > 0:
            # Every rank processes its own batch in the same wall time, so global throughput is the per-rank rate
            # times the number of ranks.
            perf["train_samples_per_s"] = world * self._train_samples / self._train_time
            if self._train_tokens:
                perf["train_tokens_per_s"] = world * self._train_tokens / self._train_time
        if self._eval_time > 0:
            perf["eval_samples_per_s"] = world * self._eval_samples / self._eval_time
        if device.type == "cuda":
            perf["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
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
    """``trainer.save_checkpoint`` to a temporary name beside ``path``, then rename: never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        os.replace(tmp, path)


class GracefulStop(pl.Callback):
    """Ctrl-C or SIGTERM during training: finish the current step, save a resumable checkpoint, stop.

    Stopping at a step boundary keeps optimizer, scheduler, loop and sampler state consistent, so ``mtbench run
    --resume`` continues exactly where the run stopped. A second Ctrl-C interrupts at once (no checkpoint).
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self.received is not None and not trainer.should_stop:
            save_checkpoint_atomic(trainer, self.checkpoint)
            trainer.should_stop = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Heartbeat(pl.Callback):
    """Calls ``beat()`` at most every ``every_s`` seconds while training, so a crashed process can be told apart
    from a live one by the age of its last beat."""

    def __init__(self, beat: Any, every_s: float = 30.0) -> None:
        self.beat, self.every_s, self._last = beat, every_s, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        now = time.time()
        if trainer.is_global_zero and now - self._last >= self.every_s:
            self._last = now
            self.beat()

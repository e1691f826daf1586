"""Every method on every task: a training step (forward, losses, the runner's weighting, backward) never makes the host
wait for the device. On a GPU each such wait stalls the step pipeline once per step; on a CPU they are invisible to a
timer, so ``no_host_sync`` looks for them operation by operation (tests/conftest.py)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from mtbench import registry
from mtbench.config import resolve
from mtbench.runner import build_module


BACKBONE_LIBRARIES = ("transformers",)
"""Their own checks are theirs, not mtbench's: BERT's and LLaMA's mask code asks whether any token is padded."""


@pytest.mark.parametrize("task", registry.tasks.names())
@pytest.mark.parametrize("method", registry.methods.names())
def test_training_step_never_waits_for_the_device(method: str, task: str, no_host_sync: Any) -> None:
    module = build_module(resolve(method, task, "smoke"))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    module.train()
    loader = iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader())
    # What Lightning does to every batch before the transfer: host-side counts.
    first, second = (module.on_before_batch_transfer(next(loader), 0) for _ in range(2))
    module.training_step(first, 0).backward()  # warm-up: one-time constants may be put on the device here

    with no_host_sync(f"{method} on {task}", allow=BACKBONE_LIBRARIES):
        total = module.training_step(second, 1)
        total.backward()
    assert torch.isfinite(total.detach()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", registry.tasks.names())
@pytest.mark.parametrize("method", registry.methods.names())
def test_cuda_training_step_does_not_synchronise(method: str, task: str) -> None:
    """The same step on a GPU under torch's sync debug mode, which warns at the Python line of every synchronising
    call; the lines outside the backbone libraries fail the test."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    device = torch.device("cuda")
    module = build_module(resolve(method, task, "smoke")).to(device)
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    module.train()
    loader = iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader())
    first, second = (move_data_to_device(module.on_before_batch_transfer(next(loader), 0), device) for _ in range(2))
    module.training_step(first, 0).backward()  # warm-up: one-time constants may be put on the device here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            total = module.training_step(second, 1)
            total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
            and not any(f"/{library}/" in w.filename for library in BACKBONE_LIBRARIES)]
    assert not ours, f"{method} on {task} synchronised at {ours}"
    assert torch.isfinite(total.detach()).all()

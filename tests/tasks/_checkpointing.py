"""Shared check for the tasks' activation-checkpointing tests: the same gradients with and without recomputation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def assert_same_gradients_with_checkpointing(method: str, task: str, sets: Sequence[str],
                                             check: Callable[[Any, dict, bool], None] | None = None) -> None:
    """Build ``method`` on ``task``'s smoke profile without and with ``train.activation_checkpointing``, take one
    training step on the same first batch from the same seed, and require equal gradients (rtol 1e-4, atol 1e-6).

    Each build must have its transformers layers checkpointed exactly when asked; ``check(module, batch,
    checkpointing)`` adds a test's own assertions on each build.
    """
    from mtbench.config import resolve
    from mtbench.runner import build_module

    grads = []
    for checkpointing in (False, True):
        exp = resolve(method, task, "smoke", sets=[*sets, f"train.activation_checkpointing={checkpointing}"])
        module = build_module(exp)
        layers = [m for m in module.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(m.gradient_checkpointing for m in layers) == checkpointing
        batch = next(iter(module.task.datamodule(exp.train, seed=0).train_dataloader()))
        if check is not None:
            check(module, batch, checkpointing)
        module.train()
        torch.manual_seed(0)
        module.training_step(module.on_before_batch_transfer(batch, 0), 0).backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)

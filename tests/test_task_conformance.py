"""Every registered task on its smoke profile: batches, heads, losses and metrics behave (no edits per task)."""

from __future__ import annotations

import math

import pytest
import torch

from mtbench import registry
from mtbench.config import resolve
from mtbench.runner import build_module


@pytest.fixture(scope="module", params=registry.tasks.names())
def built(request: pytest.FixtureRequest) -> tuple:
    exp = resolve("lora", request.param, "smoke")
    module = build_module(exp)
    datamodule = module.task.datamodule(exp.train, seed=0)
    return module, datamodule


def test_metrics_declare_direction_version_and_one_primary(built: tuple) -> None:
    module, _ = built
    specs = module.task.metrics()
    assert set(specs) == set(module.task.subtasks)
    for sub, metrics in specs.items():
        assert metrics, sub
        assert sum(s.primary for s in metrics.values()) == 1, f"{sub} needs exactly one primary metric"
        for name, spec in metrics.items():
            assert isinstance(spec.higher_is_better, bool) and isinstance(spec.version, str), (sub, name)


def test_training_batch_forward_and_finite_losses(built: tuple) -> None:
    module, datamodule = built
    batch = next(iter(datamodule.train_dataloader()))
    assert "task_ids" in batch and batch["task_ids"].dtype == torch.long
    assert int(batch["task_ids"].max()) < len(module.task.subtasks)
    module.train()
    outputs = module(batch)
    present = {module.task.subtasks[i] for i in batch["task_ids"].unique().tolist()}
    assert set(outputs) == present
    losses = module.task.loss(outputs, batch)
    assert set(losses) == present
    for sub, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), sub
    total = module.training_step(module.on_before_batch_transfer(batch, 0), 0)
    total.backward()
    # Heads may be empty (a language model's own output layer is part of the frozen backbone): then the adapters
    # must get the gradient.
    assert any(p.grad is not None for p in module.model.parameters() if p.requires_grad)


def test_one_eval_loader_per_subtask_and_metrics_compute(built: tuple) -> None:
    module, datamodule = built
    loaders = datamodule.val_dataloader()
    assert len(loaders) == len(module.task.subtasks)
    module.eval()
    with torch.no_grad():
        for i, loader in enumerate(loaders):
            batch = next(iter(loader))
            assert set(batch["task_ids"].tolist()) == {i}
            module.validation_step(batch, 0, i)
    module.log = lambda *args, **kwargs: None  # outside a Trainer: collect values without Lightning's logger
    module.on_validation_epoch_end()
    for sub in module.task.subtasks:
        values = [v for k, v in module.final_metrics.items() if k.startswith(f"val/{sub}/")]
        assert values and all(math.isfinite(v) for v in values), sub
    # val/avg is the task's headline (Task.headline) exactly when it has one (else Δm, if the task has baselines,
    # summarises it).
    headline = module.task.headline(module.final_metrics)
    assert ("val/avg" in module.final_metrics) == (headline is not None)
    summary = [module.final_metrics[k] for k in ("val/avg", "val/delta_m") if k in module.final_metrics]
    assert all(math.isfinite(v) for v in summary)


def test_every_task_declares_a_headline_quality(built: tuple) -> None:
    """A task's runs must be rankable: a higher-is-better headline (``val/avg``) from its metrics, or Δm against
    single-task baselines where the headline metrics point different ways."""
    module, _ = built
    task = module.task
    values = {f"val/{sub}/{name}": 0.5 for sub, group in task.metrics().items() for name in group}
    headline = task.headline(values)
    assert (headline is not None and math.isfinite(headline)) or task.baselines() is not None, type(task).__name__
    assert task.headline_version is None or isinstance(task.headline_version, str)

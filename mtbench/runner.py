"""The one LightningModule: any method on any task.

``training_step`` routes the batch's per-example task ids to the method, sums the weighted per-subtask losses (plus a
method's auxiliary loss) and logs each; ``validation_step`` updates the task's metrics; ``configure_optimizers`` builds
AdamW from the method's parameter groups with linear warm-up and cosine/linear/constant decay.
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from .backbones import enable_activation_checkpointing
from .callbacks import BATCH_SIZE_KEY
from .config import Experiment, TrainConfig
from .errors import ConfigError
from .interfaces import Method, MultiTaskModel, Task, adapter_roles
from .metrics import delta_m_metrics


SUBTASK_EXAMPLES_KEY = "_mtbench_subtask_examples"
"""Batch key of ``Task.subtask_examples`` as a host-side list, counted before the batch moves to the device: the
loss weights of a mixed batch read it every step."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


MAX_SKIPPED_SHARE = 0.1
"""With ``train.on_nonfinite_loss=skip``, a run that skipped more than this share of its training batches has
diverged: it ends FAILED with the count instead of being scored with a barely trained model."""


class BenchModule(pl.LightningModule):
    """Trains ``model`` (adapted backbone + heads) on ``task`` with ``method``'s parameter groups."""

    def __init__(self, task: Task, method: Method, model: MultiTaskModel, train: TrainConfig) -> None:
        super().__init__()
        self.task, self.method, self.model, self.train_cfg = task, method, model, train
        self.specs = task.metrics()
        self.metrics = nn.ModuleDict({
            sub: nn.ModuleDict({name: spec.factory() for name, spec in specs.items()})
            for sub, specs in self.specs.items()
        })
        self.weights = task.loss_weights()
        self.final_metrics: dict[str, float] = {}
        self.predictions: list[dict[str, Any]] = []
        """Per-example records of the last complete evaluation (:meth:`Task.example_records`), every rank's."""
        self._examples: list[dict[str, Any]] = []
        self.metrics_step = -1
        self.skipped_batches = 0
        self.train_batches = 0
        self._first_bad: Tensor | None = None  # step of the first non-finite loss (-1: none), kept on the device
        self._bad_loss: Tensor | None = None
        self._checked_step = -1
        self.unused_params: list[str] = []
        """Parameters frozen because a real training step gives them no gradient (see :func:`freeze_unused`)."""
        self._resume_rng: dict[str, Any] | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the batch's examples and tokens while it is still on the host, for the throughput figures: the same
        count on device tensors would make the host wait for the device once per step."""
        if isinstance(batch, dict):
            batch = {**batch, BATCH_SIZE_KEY: self.task.batch_size(batch)}
            if batch.get("task_ids") is not None:
                batch[SUBTASK_EXAMPLES_KEY] = self.task.subtask_examples(batch).tolist()
        return batch

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.method.set_task(self.model, batch.get("task_ids"))
        return self.task.forward(self.model, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.task.loss(self(batch), batch)
        # In a mixed batch a subtask's mean loss counts in proportion to its share of the examples (not of the rows:
        # a COPA example is two choice rows), so the sum equals the per-example mean a homogeneous batch would give.
        # The counts come from the host (``on_before_batch_transfer``): counting on the device (a bincount) would
        # make the host wait for it once per step.
        examples = batch[SUBTASK_EXAMPLES_KEY] if batch.get("task_ids") is not None else None
        total = torch.zeros((), device=self.device)
        for sub, loss in losses.items():
            share = examples[self.task.subtasks.index(sub)] / max(sum(examples), 1) if examples is not None else 1.0
            total = total + self.weights.get(sub, 1.0) * share * loss
            self.log(f"train/{sub}/loss", loss.detach(), on_step=True, batch_size=1)
        aux = self.method.aux_loss(self.model)
        if aux is not None:
            total = total + aux
            self.log("train/aux_loss", aux.detach(), on_step=True, batch_size=1)
        self.train_batches += 1
        if self.train_cfg.on_nonfinite_loss == "skip":
            # Skipping means the host decides now whether to step: one host-device synchronisation per step, the
            # price of this option (the default, "fail", has none).
            skip = not torch.isfinite(total)
            self.skipped_batches += skip
            # The running count, every step, so each step Lightning sends to the logger carries it.
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, batch_size=1)
            if skip:
                return None
        else:
            self._note_nonfinite(total.detach())
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True, batch_size=1)
        return total

    def _note_nonfinite(self, total: Tensor) -> None:
        """Remember the first step whose loss is NaN/Inf, on the device: no synchronisation per step."""
        if self._first_bad is None or self._bad_loss is None or self._first_bad.device != total.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=total.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=total.device)
        first = (~torch.isfinite(total)) & (self._first_bad < 0)
        self._first_bad = torch.where(first, self.global_step, self._first_bad)
        self._bad_loss = torch.where(first, total.float(), self._bad_loss)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` naming the first step whose loss was NaN/Inf (synchronises once).

        Called every ``trainer.log_every_n_steps`` optimizer steps (when Lightning reads the logged values anyway),
        before validation, before a checkpoint and at the end of training; the error names the first bad step, not
        the step at which it was noticed.
        """
        if self._first_bad is not None and self._bad_loss is not None and int(self._first_bad) >= 0:
            raise NonFiniteLossError(f"non-finite loss {float(self._bad_loss)} at step {int(self._first_bad)}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        if self.global_step != self._checked_step and self.global_step % every == 0:
            self._checked_step = self.global_step
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def on_validation_start(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()
        # Dropout and DropConnect draw from the global generators; resuming with their state reproduces the run.
        checkpoint["mtbench_rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["mtbench_cuda_rng"] = torch.cuda.get_rng_state_all()
        # After an epoch's last batch the next thing to draw from the generator is the next epoch's data iterator.
        checkpoint["mtbench_rng_at_epoch_end"] = bool(self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        checkpoint["mtbench_batches"] = {"train": self.train_batches, "skipped": self.skipped_batches}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng: dict[str, Any] = {k: checkpoint[k] for k in ("mtbench_rng", "mtbench_cuda_rng") if k in checkpoint}
        counts = checkpoint.get("mtbench_batches", {})
        self.train_batches, self.skipped_batches = counts.get("train", 0), counts.get("skipped", 0)
        if checkpoint.get("mtbench_rng_at_epoch_end"):
            # The uninterrupted run drew the next epoch's iterator seed from this state: restore it now, before
            # Lightning creates that iterator.
            _set_rng(rng)
        else:
            # Mid-epoch the iterator had drawn its seed long before; the resumed run's new iterator draws one too, so
            # the state is restored after it, at the first batch.
            self._resume_rng = rng

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            _set_rng(self._resume_rng)
            self._resume_rng = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        outputs = self(batch)
        self.task.update_metrics(self.metrics, self.model, batch, outputs)  # type: ignore[arg-type]
        self._examples += self.task.example_records(batch, outputs)

    def on_validation_epoch_start(self) -> None:
        self._examples = []

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float] = {}
        for sub, metrics in self.metrics.items():
            for name, metric in metrics.items():  # type: ignore[operator]
                if metric.update_count == 0:
                    continue
                values[f"val/{sub}/{name}"] = float(metric.compute())
                metric.reset()
        headline = self.task.headline(values)
        if headline is not None:
            values["val/avg"] = headline
        baselines = self.task.baselines()
        if baselines is not None:
            values.update(delta_m_metrics(values, self.specs, baselines))
        for key, value in values.items():
            self.log(key, value, sync_dist=False, batch_size=1)
        self.final_metrics = values
        self.predictions, self._examples = gather_records(self._examples), []
        self.metrics_step = self.global_step

    def primary_keys(self) -> list[str]:
        """``val/<subtask>/<metric>`` of each subtask's headline metric."""
        return [f"val/{sub}/{name}" for sub, specs in self.specs.items() for name, s in specs.items() if s.primary]

    def configure_optimizers(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and (candidates := _fixed_path_params(self.model)):
            # Before the optimizer is built (the model is on its device by now): what no gradient reaches is frozen,
            # so it is neither counted as trainable nor handed to AdamW.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                batch = self.transfer_batch_to_device(next(iter(datamodule.train_dataloader())), self.device, 0)
                with self.trainer.precision_plugin.train_step_context():
                    self.unused_params = freeze_unused(self, batch, candidates)
        cfg = self.train_cfg
        lr = cfg.lr if self.method.cfg.lr is None else self.method.cfg.lr
        groups = self.method.param_groups(self.model, lr, cfg.weight_decay)
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
        schedule = lr_lambda(cfg.schedule, warmup, total, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _set_rng(state: dict[str, Any]) -> None:
    if "mtbench_rng" in state:
        torch.set_rng_state(state["mtbench_rng"])
    if "mtbench_cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["mtbench_cuda_rng"])


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's per-example records (one process: ``records`` itself)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [record for part in gathered for record in part]


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Any:
    """Multiplier of the base rate at a step: linear warm-up, then cosine, linear or constant decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def set_trainable(model: MultiTaskModel, method: Method, task: Task) -> list[str]:
    """Freeze everything, then unfreeze the method's parameters, the heads and the task's PEFT extras.

    Core, not the method, does this, so every method is counted and frozen the same way. Returns the names of the
    backbone parameters unfrozen because of ``task.unfrozen_with_peft`` (recorded with the run).
    """
    keep = method.trainable(model)
    keep |= {f"heads.{n}" for n, _ in model.heads.named_parameters()}
    extras = []
    if task.unfrozen_with_peft:
        pattern = re.compile(task.unfrozen_with_peft)
        extras = [n for n, _ in model.backbone.named_parameters() if pattern.search(n)]
        keep |= {f"backbone.{n}" for n in extras}
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return extras


def _plugin_result(value: Any, expected: type, kind: str, name: str, call: str) -> Any:
    """``value`` if a plugin's ``call`` returned an ``expected``; else a RegistryError naming the plugin and call
    (instead of a failure at the first forward pass that names neither)."""
    if not isinstance(value, expected):
        from .registry import RegistryError, methods, tasks

        origin = (methods if kind == "method" else tasks).origin(name)
        raise RegistryError(f"{kind} '{name}' ({origin}): {call} returned {type(value).__name__}, "
                            f"expected an nn.{expected.__name__}")
    return value


def _fixed_path_params(model: MultiTaskModel) -> list[str]:
    """Trainable parameters outside the adapters and heads: backbone weights, whose use does not depend on which
    subtask or expert a batch routes to (adapters and heads are left alone: a routed expert or a subtask's head can
    miss one batch and still train)."""
    adapters = set(adapter_roles(model))
    return [n for n, p in model.named_parameters()
            if p.requires_grad and n not in adapters and not n.startswith("heads.")]


def freeze_unused(module: BenchModule, batch: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Freeze the parameters (of ``names``, default :func:`_fixed_path_params`) that a real training step on
    ``batch`` gives no gradient, and return their names.

    "Trainable" means "receives a gradient": a BERT encoder's pooler (147,840 parameters in MiniLM-L6) is unused when
    the task pools the hidden states itself; left trainable such parameters would inflate the trainable-parameter
    column and move Pareto fronts. Detected by one backward pass
    through the task's loss (``torch.autograd.grad`` with ``allow_unused``): a parameter outside the graph gets
    ``None``, one inside it a tensor, even of zeros.
    """
    params = dict(module.model.named_parameters())
    names = _fixed_path_params(module.model) if names is None else names
    if not names:
        return []
    losses = module.task.loss(module(batch), batch)
    total = sum(losses.values(), torch.zeros((), device=module.device))
    aux = module.method.aux_loss(module.model)
    if aux is not None:
        total = total + aux
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    unused = [n for n, g in zip(names, grads) if g is None]
    for name in unused:
        params[name].requires_grad_(False)
    return unused


def build_module(exp: Experiment) -> BenchModule:
    """Task -> backbone -> method.apply -> heads -> freezing -> :class:`BenchModule`."""
    pl.seed_everything(exp.seed, workers=True, verbose=False)
    task = exp.task_cls(exp.task)
    backbone = _plugin_result(task.backbone(), nn.Module, "task", exp.task_name, "backbone()")
    method = exp.method_cls(exp.method, task.subtasks)
    backbone = _plugin_result(method.apply(backbone), nn.Module, "method", exp.method_name, "apply()")
    if exp.train.activation_checkpointing:  # after apply, so the recomputed layers hold the adapters
        if not method.checkpointable:
            raise ConfigError(f"train.activation_checkpointing: method '{exp.method_name}' does not support it; "
                              "set it to false")
        enable_activation_checkpointing(backbone, exclude=method.checkpoint_exclusions(backbone))
    model = MultiTaskModel(backbone, _plugin_result(task.heads(backbone), nn.ModuleDict, "task", exp.task_name,
                                                    "heads()"))
    set_trainable(model, method, task)
    # transformers loads pretrained models in eval mode, and Lightning (since 2.2) keeps each submodule's mode when
    # fitting: without this the backbone would train with its dropout off and its layers never checkpointed.
    model.train()
    return BenchModule(task, method, model, exp.train)

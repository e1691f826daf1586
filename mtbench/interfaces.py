"""The contracts every method and task implements, and the small records they exchange with core.

A **method** rewrites a backbone's linear layers in place (adapters), says which of its parameters play which role
(so optimizer grouping, freezing and counting never depend on parameter-name substrings), routes per-task adapters
from per-example task ids, and may contribute callbacks and an auxiliary loss.

A **task** owns data (one datamodule per profile), heads, per-subtask losses and versioned metrics with a direction.
Core owns everything else: backbone-family knowledge (:mod:`mtbench.backbones`), the training loop, measurement and
tracking. Methods never import tasks and tasks never import methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from .errors import ConfigError, did_you_mean


if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torchmetrics


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Base of every method and task config: frozen, keyword-only, every field typed and defaulted.

    Each field carries an attribute docstring; ``mtbench ls`` shows fields and defaults. Each field declares its
    constraints (``r: Annotated[int, Gt(0)] = 8``, ``annotated_types`` markers); construction checks every field's type
    and constraints with pydantic (strict types, finite floats; :func:`mtbench.schema.validate_fields`) and raises
    :class:`~mtbench.errors.ConfigError` naming the CLI key. Cross-field checks go in ``__post_init__`` after
    ``super().__post_init__()`` and raise ``ConfigError`` naming the key (``"method.r must be divisible by ..."``).
    """

    _section: ClassVar[str] = ""
    """The experiment section the fields belong to (``method``, ``task``), for error messages."""

    def __post_init__(self) -> None:
        from .schema import validate_fields  # pydantic loads on the first config built, not on import

        validate_fields(self, self._section)


@dataclass(frozen=True, kw_only=True)
class MethodConfig(ConfigBase):
    """Fields shared by every method."""

    _section: ClassVar[str] = "method"
    target_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    """Linear layers to adapt: backbone roles (q, k, v, qkv, proj, fc1, fc2), exact module names, or one regex."""
    lr: Annotated[float, Gt(0)] | None = None
    """This method's base learning rate, replacing ``train.lr`` (None: use ``train.lr``). Profiles set adapter
    rates; full fine-tuning usually needs 10-50x less. Being a method field, it tells leaderboard rows apart."""


@dataclass(frozen=True, kw_only=True)
class TaskConfig(ConfigBase):
    """Fields shared by every task."""

    _section: ClassVar[str] = "task"
    subtasks: tuple[str, ...] = ()
    """Subtasks to train and evaluate; empty means the task's default list."""
    backbone: str = ""
    """Backbone: a registered backbone name, a hub id, or a local directory / checkpoint."""
    data_root: str = ""
    """Local data folder; empty means $MTBENCH_DATA, then the hub (when online)."""


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How training batches are drawn from the subtasks (fields validated as in :class:`ConfigBase`)."""

    _section: ClassVar[str] = "train"
    batch_size: Annotated[int, Gt(0)] = 32
    """Training examples per batch (per device)."""
    eval_batch_size: Annotated[int, Gt(0)] = 64
    """Evaluation examples per batch."""
    sampler: Literal["proportional", "temperature", "round_robin"] = "proportional"
    """Task sampler: by dataset size, by size^(1/temperature), or cycling through the subtasks."""
    temperature: Annotated[float, Gt(0)] = 2.0
    """Temperature of the ``temperature`` sampler (1 = proportional, large = uniform)."""
    batch_mode: Literal["mixed", "homogeneous"] = "mixed"
    """``mixed``: the task is drawn per example (a batch mixes tasks); ``homogeneous``: one task per batch."""
    num_workers: Annotated[int, Ge(0)] = 0
    """DataLoader worker processes."""
    length_grouping: Annotated[int, Ge(0)] = 0
    """Length bucketing: regroup each window of this many batches so rows of similar length share a batch (padding
    shrinks; the examples drawn and each task's share are unchanged). 0 = off; needs a task that gives lengths."""
    task_weights: tuple[str, ...] = ()
    """``subtask=weight`` entries (others 1) multiplying each subtask's share under any sampler: ``rte=2`` draws RTE
    twice as often as the sampler alone would (weighted round robin keeps a fixed, interleaved order)."""

    def __post_init__(self) -> None:
        from .schema import validate_fields  # pydantic loads on the first config built, not on import

        validate_fields(self, self._section)
        self.parsed_task_weights()

    def parsed_task_weights(self) -> dict[str, float]:
        """``task_weights`` as ``{subtask: weight}``.

        Raises:
            ConfigError: an entry is not ``name=positive number``, or a name repeats.
        """
        parsed: dict[str, float] = {}
        for entry in self.task_weights:
            name, sep, raw = str(entry).partition("=")
            name = name.strip()
            try:
                value = float(raw) if sep and name else -1.0
            except ValueError:
                value = -1.0
            if not 0 < value < float("inf"):
                raise ConfigError(f"train.task_weights: {entry!r} is not subtask=weight with a positive weight")
            if name in parsed:
                raise ConfigError(f"train.task_weights: {name} is given twice")
            parsed[name] = value
        return parsed

    def weights_of(self, subtasks: Sequence[str]) -> list[float]:
        """One ``task_weights`` weight per subtask, in that order (1 where not given).

        Raises:
            ConfigError: a weighted name is not one of ``subtasks``.
        """
        parsed = self.parsed_task_weights()
        if unknown := [n for n in parsed if n not in subtasks]:
            raise ConfigError("train.task_weights: " + did_you_mean(unknown[0], subtasks, "subtask of this run"))
        return [parsed.get(n, 1.0) for n in subtasks]


RoleKind = Literal["A", "B", "scale", "router", "other"]


@dataclass(frozen=True)
class ParamRole:
    """What an adapter parameter is, declared by the layer that owns it.

    ``kind`` drives optimizer grouping (LoRA+ multiplies the learning rate of every ``B``, whatever the method);
    ``task`` is set for task-specific tensors (MTLoRA's per-task factors).
    """

    kind: RoleKind
    task: str | None = None


@runtime_checkable
class AdapterModule(Protocol):
    """An adapter layer: it names its own trainable parameters and their roles (relative names)."""

    def adapter_params(self) -> dict[str, ParamRole]:
        """Map each adapter parameter's name (relative to this module) to its role."""
        ...


class DeltaMergeable:
    """Mixin for an adapter layer whose whole update is a dense ``delta_weight()`` added to ``self.base.weight``.

    It gives the ``merge`` / ``unmerge`` pair every such layer needs and the ``merged`` flag its forward checks
    (merged: return ``base(x)`` alone). :meth:`Method.merge` folds every instance in a model.

    Exact to the weight's precision, whatever its dtype: :meth:`merge` adds the update at fp32 (or wider) precision and
    rounds once, ``W ← round(W + ΔW)``, so a bf16 weight is not first rounded to the update's size (adding ``ΔW``
    cast to bf16 loses most of an update that is small beside ``W``); it keeps the unmerged weight (one copy per
    layer, in the weight's dtype, until :meth:`unmerge`), so the round trip restores every weight bit for bit.
    Subtracting ``ΔW`` again cannot: a rounded sum does not determine its summands.
    """

    base: nn.Linear
    merged: bool = False
    unmerged_weight: Tensor | None
    """The base weight as it was before :meth:`merge` (a non-persistent buffer while merged, else None)."""

    def delta_weight(self) -> Tensor:
        """The dense update (out × in), at fp32 precision or wider (not rounded to a half-precision weight's dtype)."""
        raise NotImplementedError

    def exact_weight(self) -> Tensor:
        """The base weight at fp32 precision or wider, to which :meth:`merge` adds the update before rounding."""
        weight = self.base.weight
        return weight.to(torch.promote_types(weight.dtype, torch.float32))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight, ``W ← round(W + ΔW)``; a no-op when already merged."""
        if self.merged:
            return
        weight = self.base.weight
        saved = weight.detach().clone()
        total = self.exact_weight() + self.delta_weight().to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_(total)
        self.register_buffer("unmerged_weight", saved, persistent=False)  # type: ignore[attr-defined]
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (the weight saved by it is put back); a no-op when not merged.

        A layer marked merged without a saved weight (LoRASC after its last fold, whose update is zero) only clears
        the flag.
        """
        if not self.merged:
            return
        saved = getattr(self, "unmerged_weight", None)
        if saved is not None:
            self.base.weight.copy_(saved)
            self.unmerged_weight = None
        self.merged = False


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Each :class:`DeltaMergeable` layer whose base weight is also another module's parameter (tied input and output
    embeddings), mapped to those other parameter names; empty when no merged update could leak into another module."""
    def key(param: Tensor) -> int:
        # The same Parameter object (how transformers ties weights), or another tensor starting at the same memory.
        return param.data_ptr() if param.device.type != "meta" and param.numel() else id(param)

    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(key(param), []).append(name)
    shared: dict[str, list[str]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, DeltaMergeable):
            own = f"{prefix}.base.weight" if prefix else "base.weight"
            others = [n for n in owners.get(key(module.base.weight), []) if n != own]
            if others:
                shared[prefix] = others
    return shared


def refuse_shared_weights(model: nn.Module) -> None:
    """Raise when a mergeable adapter layer's base weight is shared with another module (see :func:`shared_weights`).

    A merge (or LoRASC's stage fold) writes into the base weight; with tied embeddings that tensor is also the input
    embedding, which would then change too (the tiny LLaMA's logits moved by up to 3.3 after a merge of ``lm_head``).

    Raises:
        ConfigError: naming the layer and the parameter it shares its weight with.
    """
    for layer, others in shared_weights(model).items():
        raise ConfigError(
            f"method.target_modules selects {layer}, whose weight is shared with {others[0]} (tied input and output "
            f"embeddings): merging into it would change that module too; leave {layer} out of method.target_modules"
        )


def task_rows(task_ids: Sequence[int]) -> dict[int, Tensor]:
    """Where each task's rows are in a batch, for a collate function to put in the batch (key ``task_rows``).

    Args:
        task_ids: the task index of every row, in row order.

    Returns:
        task index -> its rows' positions, ascending, int64 ``(n_t,)``; tasks in ascending order, absent tasks
        left out. Built on the host: a task selecting its rows with these (``index_select``) runs no operation
        whose result size depends on tensor values, as ``x[task_ids == t]`` or ``task_ids.unique()`` do, each of
        which makes the host wait for a GPU once per step.
    """
    rows: dict[int, list[int]] = {}
    for position, task in enumerate(task_ids):
        rows.setdefault(int(task), []).append(position)
    return {task: torch.tensor(rows[task], dtype=torch.long) for task in sorted(rows)}


class TaskRouting:
    """Per-example task ids shared by a method's adapter layers (set by the runner before every forward).

    A batch may mix tasks; layers read :meth:`ids_for` to pick each example's task adapter without a Python loop.
    Inputs whose leading dimension is a multiple of the batch (for example Swin's windows, batch-major) are handled
    by repeating each id.

    Stacked task streams (methods.md §7.4, where one image yields a feature per task): while :attr:`stacked` is
    ``k > 0``, the block being run receives its rows as ``k + 1`` equal batch-major parts
    ``[shared; stream_1; ...; stream_k]``, and either :attr:`task_ids` names the task of every stream row (``k·n``
    ids, stream-major) or :attr:`stream_tasks` that of every stream (``k`` task indices as Python ints: stream ``j``
    serves one task on all its rows, so layers may group their work by stream without reading the device). Layers
    with per-task adapters (:class:`StreamAdapter`) compute their frozen part on the shared rows and add their task
    corrections on the stream rows; every other module acts row by row, so each stream flows through the block
    beside the shared one. While :attr:`shared_input` is also set, the streams have not diverged yet: a stream layer
    receives the shared rows alone, takes them as every stream's input and returns all ``k + 1`` parts (so work
    before the first task-specific layer, such as attention, runs once). Core's all-tasks feature extractor
    (``backbones.swin_stage_features``) sets it around the blocks it wants per-task outputs from (:meth:`stack`); a
    method may use it for its own mixed-batch forward (one stream).
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.task_ids: Tensor | None = None
        self.stream_tasks: tuple[int, ...] | None = None
        self.stacked = 0
        self.shared_input = False

    @contextmanager
    def stack(self, task_ids: Tensor | tuple[int, ...] | None, streams: int, shared_input: bool = False
              ) -> Iterator[None]:
        """Within the block: ``streams`` task streams stacked after the shared rows, with ``task_ids`` per stream row
        (a tensor) or per stream (a tuple of task indices); ``shared_input``: stream layers receive the shared rows
        alone and return every stream.

        ``stack(None, 0)`` clears the routing (plain rows, no task), for a forward whose examples have no task of
        their own. The previous state is restored on exit.
        """
        saved = self.task_ids, self.stream_tasks, self.stacked, self.shared_input
        if isinstance(task_ids, tuple):
            self.task_ids, self.stream_tasks = None, task_ids
        else:
            self.task_ids, self.stream_tasks = task_ids, None
        self.stacked, self.shared_input = streams, shared_input and streams > 0
        try:
            yield
        finally:
            self.task_ids, self.stream_tasks, self.stacked, self.shared_input = saved

    def set(self, task_ids: Tensor | str | None) -> None:
        """Route every example to ``task_ids`` (per-example ids, a task name, or ``None`` for 'no task')."""
        if isinstance(task_ids, str):
            task_ids = torch.tensor([self.tasks.index(task_ids)])
        self.task_ids = task_ids

    def ids_for(self, x: Tensor) -> Tensor | None:
        """Task ids aligned with ``x``'s leading dimension, or ``None`` when no task is set."""
        ids = self.task_ids
        if ids is None:
            return None
        n = x.shape[0]
        if ids.numel() == 1:
            return ids.to(x.device).expand(n)
        if n % ids.numel():
            raise ValueError(f"cannot align {ids.numel()} task ids with a leading dimension of {n}")
        return ids.to(x.device).repeat_interleave(n // ids.numel())


@runtime_checkable
class StreamAdapter(Protocol):
    """An adapter layer with per-task adapters that follows stacked task streams (see :class:`TaskRouting`)."""

    def stream_routing(self) -> TaskRouting | None:
        """The routing whose ``stacked`` and ``task_ids`` this layer follows; ``None`` without per-task adapters."""
        ...


@runtime_checkable
class StreamMLP(Protocol):
    """A :class:`StreamAdapter` in the first layer of a two-layer MLP that can run the whole MLP on stacked streams.

    Between the two layers every task stream is as wide as the hidden layer (4·C in Swin) but feeds the second
    layer's task correction only; a layer that knows its streams' maths can avoid keeping those activations.
    """

    def stream_mlp(self, act: nn.Module, fc2: nn.Module, x: Tensor) -> Tensor | None:
        """``fc2(act(self(x)))`` for stacked rows ``x``, or ``None`` where this layer cannot (the caller then runs
        the layers one by one)."""
        ...


def stream_routings(module: nn.Module) -> list[TaskRouting]:
    """The distinct routings followed by the :class:`StreamAdapter` layers inside ``module`` (empty: none)."""
    found: dict[int, TaskRouting] = {}
    for sub in module.modules():
        if isinstance(sub, StreamAdapter) and not isinstance(sub, type):
            routing = sub.stream_routing()
            if routing is not None:
                found.setdefault(id(routing), routing)
    return list(found.values())


class Method(ABC):
    """A fine-tuning method. Subclasses set ``config_cls`` and implement :meth:`apply`."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    """Whether :meth:`merge` folds the adapters into the base weights exactly."""
    checkpointable: ClassVar[bool] = True
    """Whether the adapted layers give the same gradients when recomputed in the backward pass
    (``train.activation_checkpointing``)."""

    def __init__(self, cfg: MethodConfig, tasks: Sequence[str]) -> None:
        self.cfg = cfg
        self.tasks = tuple(tasks)
        self.routing = TaskRouting(self.tasks)

    def checkpoint_exclusions(self, model: nn.Module) -> list[str]:
        """Module paths of the blocks that activation checkpointing must leave alone (kept, not recomputed), for
        example a block whose hooks change its inputs, which a recomputation would not replay; every other layer is
        still recomputed. Called after :meth:`apply`."""
        return []

    @abstractmethod
    def apply(self, backbone: nn.Module) -> nn.Module:
        """Wrap the backbone's target layers in place with adapter layers and return the model."""

    def trainable(self, model: nn.Module) -> set[str]:
        """Names of parameters to train (before heads and task-declared extras); default: adapter parameters."""
        return set(adapter_roles(model))

    def set_task(self, model: nn.Module, task_ids: Tensor | str | None) -> None:
        """Route the next forward pass: per-example task ids ``(B,)``, one task name, or ``None``."""
        self.routing.set(task_ids)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups over every trainable parameter, each exactly once.

        Default: 2-D+ tensors decay, biases and norms (1-D) do not.
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"}]
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"})
        return [g for g in groups if g["params"]]

    def callbacks(self) -> list[pl.Callback]:
        """Lightning callbacks the method needs (schedules such as LoRASC's stages)."""
        return []

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        """An auxiliary loss gathered during the last forward (MoSLD's balance loss), added by the runner."""
        return None

    def merge(self, model: nn.Module) -> None:
        """Fold every :class:`DeltaMergeable` layer into its base weight (mergeable methods only).

        Raises:
            ConfigError: a layer's base weight is shared with another module (:func:`refuse_shared_weights`).
        """
        self._fold(model, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` exactly."""
        self._fold(model, merge=False)

    def _fold(self, model: nn.Module, merge: bool) -> None:
        if not self.mergeable:
            raise NotImplementedError(f"{type(self).__name__} is not mergeable")
        if merge:
            refuse_shared_weights(model)
        for module in model.modules():
            if isinstance(module, DeltaMergeable):
                module.merge() if merge else module.unmerge()


def adapter_roles(model: nn.Module) -> dict[str, ParamRole]:
    """Full parameter name -> role for every adapter parameter in ``model``."""
    roles: dict[str, ParamRole] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, AdapterModule) and not isinstance(module, type):
            for name, role in module.adapter_params().items():
                roles[f"{prefix}.{name}" if prefix else name] = role
    return roles


@dataclass(frozen=True)
class MetricSpec:
    """A metric: a torchmetrics factory, its direction, whether it is the subtask's headline, and its version.

    Runs whose metric versions differ are never merged into one leaderboard row.
    """

    factory: Callable[[], torchmetrics.Metric]
    higher_is_better: bool
    primary: bool = False
    version: str = "1"


class MultiTaskModel(nn.Module):
    """The trained model: an adapted backbone plus one head per subtask (heads may be empty, e.g. an LM)."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads if heads is not None else nn.ModuleDict()


class Task(ABC):
    """A task family (GLUE, PASCAL-Context, an LLM mixture): data, heads, losses and metrics of its subtasks.

    Subclasses set ``config_cls``, ``version`` (bump it whenever preprocessing, splits or metrics change) and
    ``profiles`` (``smoke``, ``cpu``, ``paper``), each a dict of experiment overrides (``method``, ``task``,
    ``train``, ``trainer`` sections) plus optionally ``methods``: method name -> sections applied on top for that
    method only (the budget each method's paper compared it at; a config file and ``--set`` still override).
    """

    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    version: ClassVar[str]
    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_subtasks: ClassVar[tuple[str, ...]] = ()
    headline_version: ClassVar[str | None] = None
    """Version of :meth:`headline`'s definition, the version of ``val/avg`` (``None``: the task's version)."""
    unfrozen_with_peft: ClassVar[str | None] = None
    """Regex of backbone parameters that train beside the adapters for every PEFT method (recorded in the config)."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.subtasks: tuple[str, ...] = self.selected_subtasks(cfg)

    @classmethod
    def selected_subtasks(cls, cfg: TaskConfig) -> tuple[str, ...]:
        """The subtasks a config runs: ``task.subtasks``, else :attr:`default_subtasks`."""
        return tuple(cfg.subtasks) or cls.default_subtasks

    @abstractmethod
    def backbone(self) -> nn.Module:
        """Build the (pretrained or config-built) backbone; core's backbone registry knows the families."""

    @abstractmethod
    def datamodule(self, loader: LoaderConfig, seed: int = 0) -> pl.LightningDataModule:
        """Batches are dicts with ``task_ids`` (B,) indexing :attr:`subtasks`, plus the task's inputs.

        ``seed`` seeds the task sampler and any subsampling, so a run is reproducible from its seed.
        """

    @abstractmethod
    def heads(self, backbone: nn.Module) -> nn.ModuleDict:
        """One head per subtask, keyed by subtask name."""

    @abstractmethod
    def forward(self, model: MultiTaskModel, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Outputs per subtask present in the batch."""

    @abstractmethod
    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """One mean loss per subtask present in the batch."""

    @abstractmethod
    def metrics(self) -> dict[str, dict[str, MetricSpec]]:
        """Subtask -> metric name -> spec; exactly one primary metric per subtask."""

    @abstractmethod
    def update_metrics(
        self,
        metrics: Mapping[str, Mapping[str, torchmetrics.Metric]],
        model: MultiTaskModel,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
    ) -> None:
        """Update the metrics of the subtasks present in an evaluation batch."""

    def headline(self, values: Mapping[str, float]) -> float | None:
        """The task's headline quality, higher is better: logged as ``val/avg``, what the leaderboard ranks, compares
        and puts on Pareto fronts (unless every run of a comparison group carries Δm).

        ``values`` maps ``val/<subtask>/<metric>`` to one evaluation's numbers. Default: the mean of the subtasks'
        primary metrics when every one is higher-is-better; ``None`` when their directions are mixed (a task such as
        PASCAL-Context, mIoU with an angle in degrees, is then summarised by Δm against single-task baselines).
        A task with its own definition overrides this and sets :attr:`headline_version`.
        """
        specs = self.metrics()
        keys = [f"val/{sub}/{name}" for sub, group in specs.items() for name, s in group.items() if s.primary]
        directions = {s.higher_is_better for group in specs.values() for s in group.values() if s.primary}
        found = [values[k] for k in keys if k in values]
        return sum(found) / len(found) if found and directions == {True} else None

    def example_records(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One record per evaluated example of an evaluation batch, for the run's ``predictions.parquet``
        (schema :data:`mtbench.predictions.SCHEMA`; columns described there): ``subtask``, a stable ``example_id``,
        ``prediction``, ``target``, ``correct`` (1/0, NaN where not an accuracy), ``score`` (the example's value of
        the statistic the subtask's headline metric aggregates), ``loss`` and ``aggregate`` (how ``score`` or
        ``prediction``/``target`` combine into the headline metric: ``mean``, ``mcc``, ``f1`` or ``none``).
        Default: no records (the leaderboard then falls back to seed-level tests for the task)."""
        return []

    def loss_weights(self) -> dict[str, float]:
        """Per-subtask loss weights (default 1)."""
        return dict.fromkeys(self.subtasks, 1.0)

    def baselines(self) -> dict[str, dict[str, float]] | None:
        """Single-task reference scores for Δm, ``{subtask: {metric: value}}``, or ``None``."""
        return None

    def prefetch(self, root: Path | None = None) -> str:
        """Download and verify the task's data into ``root`` (``None``: the task's configured data root) for
        ``mtbench prefetch``; returns a one-line summary. Default: nothing to fetch.

        Raises:
            DataError: offline, or the download does not verify; the message says where to put the data by hand.
        """
        return ("nothing to prefetch: its data comes from task.data_root, or, where it reads the hub, from the "
                "datasets library's cache on first use")

    def subtask_examples(self, batch: Mapping[str, Any]) -> Tensor:
        """Examples of each subtask in a batch, ``(len(subtasks),)`` int64: what every per-subtask share counts (the
        runner's loss weighting, throughput). Default: one example per ``task_ids`` entry; a task whose examples span
        several rows (GLUE COPA: one row per choice) counts each example once."""
        return torch.bincount(batch["task_ids"].flatten(), minlength=len(self.subtasks))

    def batch_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        """(examples, tokens) in a batch, for throughput; tokens is 0 for non-text tasks."""
        n = int(self.subtask_examples(batch).sum())
        mask = batch.get("attention_mask")
        return n, int(mask.sum()) if isinstance(mask, Tensor) else 0

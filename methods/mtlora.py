"""MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task Learning (Agiza, Neseem, Reda, CVPR 2024),
https://arxiv.org/abs/2403.20320.

Every target linear layer of every block keeps its pretrained weight frozen and learns a task-agnostic LoRA (TA-LoRA,
shared by all tasks). In the last ``task_blocks`` blocks of each stage, ``proj``, ``fc1`` and ``fc2`` also carry one
task-specific LoRA per task (TS-LoRA, never on ``qkv``: attention maps stay shared). A TS layer returns the shared
output and one output per task; the frozen matmul of a task output always sees the *shared* activations, only the
rank-``task_r`` correction sees the task stream, and task streams never feed back into the shared one (methods.md
§7.3-7.4). ``plus=True`` is MTLoRA+: a TA-LoRA on Swin's PatchMerging reductions, whose base weights then stay frozen.

Update rule: ``y = W0 x + b + s·B_sh A_sh drop(x)``, ``y_t = W0 x + b + s·B_t A_t u_t`` (``u_t = x_t`` or ``drop(x)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from annotated_types import Gt, Interval
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from mtbench.backbones import (
    blocks,
    closing_module,
    downsamplers,
    find_linears,
    gelu_form,
    get_submodule_parent,
    stages,
)
from mtbench.errors import ConfigError
from mtbench.interfaces import DeltaMergeable, Method, MethodConfig, ParamRole, TaskRouting, refuse_shared_weights
from mtbench.registry import register_method


_QKV_ROLES = ("q", "k", "v", "qkv")


@dataclass(frozen=True, kw_only=True)
class MTLoRAConfig(MethodConfig):
    """MTLoRA hyperparameters (official config keys in brackets; defaults: ``mtlora_tiny_448_r64_scale4_pertask``)."""

    r: Annotated[int, Gt(0)] = 64
    """Shared (TA-LoRA) rank [R]; the paper's headline model is r=64 (Δm +2.55 %, 8.34 M params), also 16 and 32."""
    task_r: Annotated[int, Gt(0)] = 4
    """Rank of each task-specific (TS-LoRA) update [R_PER_TASK]."""
    scale: Annotated[float, Gt(0)] = 4.0
    """Fixed multiplier of the shared and task branches [SHARED_SCALE = SCALE_PER_TASK]; not alpha / r."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.05
    """Dropout on the shared LoRA input (and on the task input of ``proj``-style calls); never on task inputs."""
    task_blocks: Annotated[int, Gt(0)] = 1
    """TS-LoRA sits in the last ``task_blocks`` blocks of each stage (1 = paper; all = INTERMEDIATE_SPECIALIZATION)."""
    task_targets: tuple[str, ...] = ("proj", "fc1", "fc2")
    """Layers with TS-LoRA, among target_modules (roles or names, never qkv); empty = TA-LoRA only."""
    plus: bool = False
    """MTLoRA+: also a TA-LoRA (rank r) on Swin PatchMerging reductions, whose base weights then stay frozen."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(t in _QKV_ROLES for t in self.task_targets):
            raise ConfigError(f"method.task_targets must be a list without q/k/v/qkv, got {self.task_targets!r}")


class _TwoStreams:
    """Forward hooks that run one block on ``[shared rows; task rows]`` so its TS layers see both streams.

    The block's input (and every batch-aligned tensor argument, e.g. the attention mask) is repeated along the batch,
    the block's TS layers read the first half as the shared stream and the second as the task stream (methods.md
    §7.4), every other module acts row-wise and so computes both streams unchanged, and the block returns the task
    half: the per-example task stream is what the heads get. Shared modules (norms, dropout, DropPath) draw independent
    masks per stream, as in the paper. Assumes (true for BERT, LLaMA and timm Swin blocks) that the hidden state is the
    block's first argument and first output, batch-major; other arguments of rank ≥ 2 whose leading dimension is the
    batch are taken as batch-aligned and repeated too.

    The attention module (the parent of the block's q/k/v layers) is shared by both streams (§7.4: qkv and the
    attention map are shared), so it runs on the shared half only: :meth:`attention_pre` hands it the first half of
    its batch-aligned inputs under ``TaskRouting.shared_input`` (a ``proj`` inside it, as in LLaMA and Swin, then
    returns both streams), and :meth:`attention_post` repeats an output that still has the shared rows only (BERT,
    whose ``proj`` comes after), whose task copy the ``proj`` layer does not read.

    The block's shared output is discarded, so where the block ends in a module that adds the last residual itself
    (``backbones.closing_module``: BERT's ``output``, fc2 → dropout → ``LayerNorm(h + input)``), that module runs on
    the task rows only (:meth:`closing_pre`): its TS layers read both streams and return the task rows
    (:attr:`MTLoRALinear.streams_only`), and its other batch-aligned arguments (the residual) are cut to their task
    half. Its dropout, residual and norm then skip the shared rows, and so do the TS layers' shared updates, whose
    factors take no part in a mixed batch (no gradient) as their rows would be discarded anyway. Interleaved on
    MiniLM-L6 (32 × 128 tokens, CPU, one thread, 8 rounds) the mixed step went from 1.058 × LoRA's to 1.037 ×.
    Hooks on that module see the task rows only.

    Between the block's ``fc1`` and that module's ``fc2`` (where both have TS-LoRA and ``fc1``'s module is
    ``GELU(fc1(x))``, as BERT's ``intermediate``; :attr:`MTLoRALinear.hand_to`), the task rows' hidden activation,
    as wide as the hidden layer, feeds nothing but ``fc2``'s task down-projection. ``fc1`` then returns the shared
    rows only and hands ``fc2`` its frozen output and the task rows' rank-space input; ``fc2`` computes the task
    rows' hidden activation block by block with :class:`_StreamHidden` (the same maths). No tensor holds both
    streams at the hidden width: on MiniLM-L6 those were 48 MiB each, above glibc's mmap ceiling, so every step
    mapped and faulted them in afresh. Interleaved (8 rounds): 1.054 → 1.045 × LoRA, kernel time 54 → 14 ms a step.
    Hooks on ``fc1``'s module and its activation see the shared rows only, and a mixed batch cannot be
    differentiated twice (``_StreamHidden``'s backward is not differentiable; ``hand_to = None`` on ``fc1`` turns
    the hand-over off).
    """

    def __init__(self, routing: TaskRouting) -> None:
        self.routing = routing
        self.active = False
        self.batch = 0
        self.rows = 0

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # A caller that already stacks task streams (core's all-tasks forward) owns the rows: do not stack again.
        self.active = self.routing.task_ids is not None and not self.routing.stacked
        if not self.active:
            return None
        self.routing.stacked = 1
        hidden = args[0] if args else kwargs["hidden_states"]
        self.batch = n = hidden.shape[0]
        return tuple(_twice(a, n) for a in args), {k: _twice(v, n) for k, v in kwargs.items()}

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.active:
            return None
        self.active = False
        for layer in _task_layers(module):  # nothing handed over outlives the block, also after an error
            layer.handed = None
        self.routing.stacked = 0
        self.routing.shared_input = False
        n = self.batch

        def task_half(t: Any) -> Any:
            return t[n:] if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == 2 * n else t

        return tuple(task_half(o) for o in output) if isinstance(output, tuple) else task_half(output)

    def attention_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.active:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        self.rows = rows = hidden.shape[0]
        self.routing.shared_input = True
        return tuple(_first_half(a, rows) for a in args), {k: _first_half(v, rows) for k, v in kwargs.items()}

    def attention_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.active:
            return None
        self.routing.shared_input = False
        half = self.rows // 2

        def both(t: Any) -> Any:
            return torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == half else t

        # Only the hidden rows (the first output) go on through the block; the attention weights that may follow
        # are the shared map of each example, one per example, as the caller expects.
        return (both(output[0]), *output[1:]) if isinstance(output, tuple) else both(output)

    def closing_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.active:
            return None
        rows = 2 * self.batch
        layers = _task_layers(module)  # found in the module called: one method may serve several models
        if not layers:  # nothing in it reads the shared rows: every argument takes its task half
            return tuple(_second_half(a, rows) for a in args), {k: _second_half(v, rows) for k, v in kwargs.items()}
        for layer in layers:
            layer.streams_only = True
        # The hidden states (first argument) keep both streams for the TS layers; everything else takes its task half.
        first = "hidden_states" if not args and "hidden_states" in kwargs else None
        return ((*args[:1], *(_second_half(a, rows) for a in args[1:])),
                {k: v if k == first else _second_half(v, rows) for k, v in kwargs.items()})

    def closing_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for layer in _task_layers(module):
            layer.streams_only = False


def _task_layers(module: nn.Module) -> list[MTLoRALinear]:
    """The :class:`MTLoRALinear` layers with task LoRA in ``module``."""
    return [m for m in module.modules() if isinstance(m, MTLoRALinear) and m.tasks]


def _second_half(value: Any, rows: int) -> Any:
    """The task half of ``value`` when it is row-aligned with a ``rows``-row stacked input (tensors of rank ≥ 2)."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == rows:
        return value[rows // 2:]
    if isinstance(value, (tuple, list)):
        return type(value)(_second_half(v, rows) for v in value)
    return value


def _row_ids(routing: TaskRouting, rows: Tensor) -> Tensor:
    """Task ids aligned with ``rows``' leading dimension; a stacked-stream forward needs them.

    Raises:
        RuntimeError: no task ids are set.
    """
    ids = routing.ids_for(rows)
    if ids is None:
        raise RuntimeError("MTLoRALinear: stacked-stream forward without task ids")
    return ids


def _first_half(value: Any, rows: int) -> Any:
    """The shared half of ``value`` when it is row-aligned with a ``rows``-row stacked input (tensors of rank ≥ 2)."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == rows:
        return value[: rows // 2]
    if isinstance(value, (tuple, list)):
        return type(value)(_first_half(v, rows) for v in value)
    return value


def _twice(value: Any, n: int) -> Any:
    """``value`` repeated along its leading dimension when it is batch-aligned (tensors of rank ≥ 2 only)."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == n:
        return torch.cat([value, value])
    if isinstance(value, (tuple, list)):
        return type(value)(_twice(v, n) for v in value)
    return value


class MTLoRALinear(DeltaMergeable, nn.Module):
    """A frozen ``nn.Linear`` with a shared LoRA and optional per-task LoRAs (``MTLoRALinear``, 'matrix' mode).

    Per-task factors live in ``nn.ParameterDict``s keyed by task name (``mtlora_tasks_A.<task>``), so every tensor
    declares the one task it belongs to (``ParamRole("A", task=name)``) and state-dict keys are readable. The mixed
    forward concatenates the T small factors into one rank ``T·task_r`` pair and masks each row to its own task's
    block: one pair of matmuls for the whole batch, no loop over examples (T is small).

    Args:
        base: the pretrained linear layer; its parameters are frozen.
        r: shared rank.
        scale: fixed multiplier of the shared and task branches.
        dropout: dropout probability on the shared LoRA input.
        tasks: task names with a TS-LoRA here (empty: TA-LoRA only).
        task_r: rank of each task's update.
        task_input: whether the layer takes a task input in the two-stream forward (``fc1``/``fc2``); ``proj``
            does not (its input, the attention output, is shared), so its tasks use ``drop(x)``.
        routing: per-example task ids of the mixed-batch forward.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        scale: float,
        dropout: float = 0.0,
        tasks: tuple[str, ...] = (),
        task_r: int = 4,
        task_input: bool = True,
        routing: TaskRouting | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.task_r, self.scale, self.task_input = r, task_r, scale, task_input
        self.tasks = tuple(tasks)
        self.routing = routing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Half-precision adapters lose small early updates of B; keep them in fp32 as LoRALinear does.
        w = base.weight
        kw = {"device": w.device, "dtype": torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype}
        d_in, d_out = base.in_features, base.out_features
        self.mtlora_shared_A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.mtlora_shared_B = nn.Parameter(torch.empty(d_out, r, **kw))
        self.mtlora_tasks_A = nn.ParameterDict({t: nn.Parameter(torch.empty(task_r, d_in, **kw)) for t in tasks})
        self.mtlora_tasks_B = nn.ParameterDict({t: nn.Parameter(torch.empty(d_out, task_r, **kw)) for t in tasks})
        self.merged = False
        self.streams_only = False
        """Set while only the stream rows of this layer's output are read (a mixed batch's closing module, see
        ``_TwoStreams.closing_pre``): the shared rows' update is then skipped and only the stream rows returned."""
        # (next layer, GELU form): a mixed batch's fc1 hands its task rows to the closing fc2 (see _TwoStreams);
        # a tuple, so that the next layer is not registered as a submodule of this one.
        self.hand_to: tuple[MTLoRALinear, str] | None = None
        self.handed: tuple[Tensor, Tensor, Tensor, MTLoRALinear] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ← kaiming_uniform_(a=√5), B ← 0 (shared and per task): every output equals the pretrained one."""
        for a in [self.mtlora_shared_A, *self.mtlora_tasks_A.values()]:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in [self.mtlora_shared_B, *self.mtlora_tasks_B.values()]:
            nn.init.zeros_(b)

    def adapter_params(self) -> dict[str, ParamRole]:
        """Shared factors (task ``None``) and per-task factors (task = its name)."""
        roles = {"mtlora_shared_A": ParamRole("A"), "mtlora_shared_B": ParamRole("B")}
        for t in self.tasks:
            roles[f"mtlora_tasks_A.{t}"] = ParamRole("A", task=t)
            roles[f"mtlora_tasks_B.{t}"] = ParamRole("B", task=t)
        return roles

    def _low_rank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        # The scale multiplies the rank-r activations, not the (..., out) result: one pass over the output less.
        return F.linear(F.linear(_as(x, a.dtype), a) * self.scale, b)

    def _shared(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pre = W0 x + b, drop(x), shared output y)."""
        pre, dropped, delta = self._shared_parts(x)
        return pre, dropped, pre if delta is None else pre + delta

    def _shared_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(pre = W0 x + b, drop(x), the shared update s·B A drop(x) in ``pre``'s dtype, or ``None`` while merged)."""
        pre = self.base(x)
        if self.merged:
            return pre, x, None
        dropped = self.dropout(x)
        return pre, dropped, self._low_rank(dropped, self.mtlora_shared_A, self.mtlora_shared_B).to(pre.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Shared output ``y``; inside a block with ``k`` stacked task streams (``TaskRouting.stacked``),
        ``cat([y, y_task(row) for every stream row])`` over ``[shared; stream_1; ...; stream_k]`` rows.

        The frozen matmul runs on the shared rows only; each stream row adds its own task's rank-``task_r``
        correction (§7.3). With ``TaskRouting.shared_input`` the layer receives the shared rows alone and every
        stream's input is the shared one (``drop(x)`` for ``proj``-style layers, ``x`` otherwise).

        Args:
            x: ``(N, ..., in_features)``; with ``k`` stacked streams ``N = (k + 1)·n`` (shared rows first), or
                ``N = n`` under ``shared_input``.

        Returns:
            ``(N, ..., out_features)``, or ``((k + 1)·N, ..., out_features)`` under ``shared_input``; with per-row
            task ids and :attr:`streams_only` set, the stream rows alone (``k·n`` of them); with per-row task ids
            and :attr:`hand_to` set (one stream), the shared rows alone, the task rows being handed to that layer,
            which then takes the shared rows' activation as ``x`` and returns the task rows.

        Raises:
            RuntimeError: a stacked-stream forward without task ids.
        """
        routing = self.routing
        k = routing.stacked if routing is not None and self.tasks else 0
        if not k:
            return self._shared(x)[2]
        assert routing is not None
        common = routing.shared_input  # every stream's input is the shared one
        if routing.stream_tasks is None and self.streams_only and self.handed is not None:
            return self._fused_task_rows(x)
        # One split, not two slices: its backward joins the two gradients in one copy instead of zero-filling the
        # whole input twice.
        x_shared, x_streams = (x, x) if common else x.split([x.shape[0] // (k + 1), x.shape[0] * k // (k + 1)])
        if routing.stream_tasks is None and self._hands_off(x, k, common):
            # The task rows' hidden activation is left to the next layer (see _TwoStreams): the shared rows only.
            pre, dropped, y = self._shared(x_shared)
            ids = _row_ids(routing, x_streams)
            assert self.hand_to is not None
            self.hand_to[0].handed = (pre, self._mixed_down(x_streams, ids), ids, self)
            return y
        if routing.stream_tasks is None:
            # Per-row task ids (mixed batches): the shared and task sums are written into the stacked rows directly;
            # with streams_only the shared rows' update is not computed and only the stream rows are returned.
            if self.streams_only:
                pre, shared_delta = self.base(x_shared), None
                dropped = x_shared if self.task_input else self.dropout(x_shared)
            else:
                pre, dropped, shared_delta = self._shared_parts(x_shared)
                assert shared_delta is not None  # a layer with task LoRA is never merged
            u = x_streams if self.task_input else dropped  # no dropout on task inputs; proj reads drop(x) (§7.3)
            if (common or not self.task_input) and k > 1:
                u = torch.cat([u] * k)
            task_delta = self._mixed_task_delta(u, _row_ids(routing, u)).to(pre.dtype)
            if shared_delta is None:
                return (task_delta.view(k, *pre.shape) + pre).flatten(0, 1)
            return _StackedSums.apply(pre, shared_delta, task_delta, k)
        pre, dropped, y = self._shared(x_shared)
        if not self.task_input:
            u, common = dropped, True  # proj: the task branches read drop(x), never a task input (§7.3)
        else:
            u = x_streams  # no dropout on task inputs (§7.3)
        return torch.cat([y, self._streams(pre, u, common, k, routing)])

    def _hands_off(self, x: Tensor, k: int, common: bool) -> bool:
        """Whether this layer (a mixed batch's ``fc1`` paired with the closing module's ``fc2``) leaves its task rows
        to the next layer: one stream, its own input, and dtypes the fused product keeps (as in :meth:`stream_mlp`)."""
        if self.hand_to is None or k != 1 or common or not self.task_input:
            return False
        return torch.is_autocast_enabled(x.device.type) or (
            x.dtype == self.mtlora_shared_A.dtype == self.base.weight.dtype == self.hand_to[0].base.weight.dtype)

    def _fused_task_rows(self, x: Tensor) -> Tensor:
        """The task rows ``W2 act(h_t) + b2 + s·B2_t A2_t act(h_t)`` of a mixed batch's closing ``fc2``, where
        ``h_t = W1 x_sh + b1 + s·B1_t A1_t x_t`` comes from what ``fc1`` handed over (its frozen output on the shared
        rows and the task rows' down-projection), never stored: :class:`_StreamHidden` computes it block by block,
        in the forward and again in the backward pass, with every task's factors side by side and each row's own
        block kept (§7.3 maths; the same as the layer-by-layer path).

        Args:
            x: ``act(y_sh)``, the activation of the shared rows, ``(n, ..., hidden)``.

        Returns:
            ``(n, ..., out_features)``, the task rows.
        """
        assert self.handed is not None
        pre1, z1, ids, fc1 = self.handed
        self.handed = None
        hidden, rank = pre1.shape[-1], z1.shape[-1]
        b1 = fc1._tasks_B().unsqueeze(0)  # (1, hidden, T·r1)
        a2 = self._tasks_A().unsqueeze(0)  # (1, T·r2, hidden)
        assert fc1.hand_to is not None
        z2 = _StreamHidden.apply(pre1.reshape(-1, hidden), z1.reshape(1, -1, rank), b1, a2, fc1.scale,
                                 fc1.hand_to[1])  # (1, M, T·r2)
        z2 = self._own_block(z2.reshape(*x.shape[:-1], -1), ids)
        pre2 = self.base(x)
        return pre2 + F.linear(z2 * self.scale, self._tasks_B()).to(pre2.dtype)

    def _streams(self, pre: Tensor, u: Tensor, common: bool, k: int, routing: TaskRouting) -> Tensor:
        """The ``k`` stream outputs ``pre + s·B_t A_t u_t`` of streams with one task each
        (``TaskRouting.stream_tasks``: the all-tasks forward), stream-major ``(k·n, ..., out)``: each stream runs its
        own rank-r pair, all in one batched product.

        ``u`` is the streams' common input ``(n, ..., in)`` (``common``) or their stacked inputs ``(k·n, ..., in)``.
        """
        assert routing.stream_tasks is not None
        d_in, r = self.base.in_features, self.task_r
        a, b = self._stream_factors(routing.stream_tasks)
        if common:  # one down-projection of the shared input for all streams
            z = F.linear(_as(u, a.dtype), a.reshape(k * r, d_in)).reshape(-1, k, r).transpose(0, 1)
        else:
            z = torch.bmm(_as(u, a.dtype).reshape(k, -1, d_in), a.transpose(1, 2))  # (k, M, r)
        return _plus_streams(pre, z, b, self.scale)

    def _stream_factors(self, stream_tasks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Each stream's task factors, ``(A (k, r, in), B (k, out, r))``, for streams naming task indices.

        Every task's factors enter the graph (an absent task gets a zero gradient, not none), as in the masked
        product: AdamW then treats a task absent from a batch the same on both paths.
        """
        a = torch.stack([self.mtlora_tasks_A[t] for t in self.tasks])  # (T, r, in), in routing order
        b = torch.stack([self.mtlora_tasks_B[t] for t in self.tasks])  # (T, out, r)
        if list(stream_tasks) != list(range(len(self.tasks))):
            a, b = torch.stack([a[i] for i in stream_tasks]), torch.stack([b[i] for i in stream_tasks])
        return a, b

    def stream_mlp(self, act: nn.Module, fc2: nn.Module, x: Tensor) -> Tensor | None:
        """``fc2(act(self(x)))`` on stacked streams with one task each (``interfaces.StreamMLP``), or ``None``.

        Same maths as the two layers called one after the other (§7.3: each frozen matmul on the shared rows, each
        stream adds its rank-``task_r`` correction of its own input), but a stream's hidden activation
        ``act(W1 x_sh + b1 + s·B1_t A1_t x_t)``, as wide as the hidden layer, is used only by ``A2_t`` and is not
        kept: :class:`_StreamHidden` computes it block of rows by block of rows and again in the backward pass, so
        the streams cost the step neither that memory nor passes over it in main memory. Module hooks on this
        layer, ``act`` and ``fc2`` do not see the stream rows on this path (``act`` and ``fc2`` are called on the
        shared rows only), and double backward is not supported.

        Args:
            act: the activation between the layers; ``nn.GELU`` (either form) only, whose backward the fused
                path calls directly.
            fc2: the MLP's second layer, an :class:`MTLoRALinear` with the same tasks.
            x: ``((k + 1)·n, ..., in_features)``, ``[shared; stream_1; ...; stream_k]``.

        Returns:
            ``((k + 1)·n, ..., fc2.out_features)``, or ``None`` outside a stacked forward with one task per stream,
            or where ``fc2`` or the dtypes do not allow it.
        """
        routing = self.routing
        if (routing is None or routing.stream_tasks is None or not routing.stacked or routing.shared_input
                or not self.tasks or not self.task_input or not isinstance(fc2, MTLoRALinear)
                or fc2.tasks != self.tasks or not fc2.task_input or self.merged or fc2.merged
                or type(act) is not nn.GELU):
            return None
        k = routing.stacked
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not x.dtype == self.mtlora_shared_A.dtype == self.base.weight.dtype:
            return None  # half-precision weights with fp32 adapters and no autocast: keep the layer-wise rounding
        n = x.shape[0] // (k + 1)
        x_shared, x_streams = x.split([n, k * n])
        pre1, _, y1 = self._shared(x_shared)
        a1, b1 = self._stream_factors(routing.stream_tasks)
        a2, b2 = fc2._stream_factors(routing.stream_tasks)
        hidden = pre1.shape[-1]
        z1 = torch.bmm(_as(x_streams, a1.dtype).reshape(k, -1, self.base.in_features), a1.transpose(1, 2))
        z2 = _StreamHidden.apply(pre1.reshape(-1, hidden), z1, b1, a2, self.scale, act.approximate)  # (k, M, r2)
        pre2, _, y2 = fc2._shared(act(y1))
        return torch.cat([y2, _plus_streams(pre2, z2, b2, fc2.scale)])

    def stream_routing(self) -> TaskRouting | None:
        """The routing of the stacked-stream forward, ``None`` without TS-LoRA (``interfaces.StreamAdapter``)."""
        return self.routing if self.tasks else None

    def _mixed_task_delta(self, u: Tensor, ids: Tensor) -> Tensor:
        """``s · B_{ids[i]} A_{ids[i]} u[i]`` for every row i, vectorised: one-hot mask over the T task blocks."""
        # The scale in rank space, as a Python number: folded into the (possibly bf16) mask it would be rounded.
        return F.linear(self._mixed_down(u, ids) * self.scale, self._tasks_B())

    def _mixed_down(self, u: Tensor, ids: Tensor) -> Tensor:
        """``A_{ids[i]} u[i]`` in row i's own task block of the ``T·r`` rank columns, zeros elsewhere:
        ``(n, ..., T·r)``."""
        a = self._tasks_A()
        return self._own_block(F.linear(_as(u, a.dtype), a), ids)  # every task's down-projection of every row

    def _own_block(self, z: Tensor, ids: Tensor) -> Tensor:
        """``z`` ``(n, ..., T·r)`` with every row's columns outside its own task's block set to zero."""
        k, r = len(self.tasks), self.task_r
        # (n, T·r): the row's own task block. A comparison, not F.one_hot, whose range check reads the ids back to the
        # host (a device sync in every adapted layer).
        keep = (ids.long()[:, None] == torch.arange(k, device=ids.device)).to(z.dtype).repeat_interleave(r, dim=1)
        return z * keep.view(keep.shape[0], *([1] * (z.ndim - 2)), k * r)

    def _tasks_A(self) -> Tensor:  # noqa: N802 (the paper's A)
        """Every task's ``A`` stacked, ``(T·r, in)``, in routing order."""
        return torch.cat([self.mtlora_tasks_A[t] for t in self.tasks])

    def _tasks_B(self) -> Tensor:  # noqa: N802 (the paper's B)
        """Every task's ``B`` side by side, ``(out, T·r)``, in routing order."""
        return torch.cat([self.mtlora_tasks_B[t] for t in self.tasks], dim=1)

    def forward_tasks(self, x: Tensor, x_tasks: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """All-tasks forward of methods.md §7.3: the shared output and one output per task of this layer.

        Args:
            x: shared activation ``(..., in_features)``.
            x_tasks: task activations by task name (``fc1``/``fc2`` calls; outputs for these tasks only), or ``None``
                (``proj`` calls: every task of the layer, each on ``drop(x)``).

        Returns:
            ``(y, {task: y_t})``; the dict is empty when the layer has no TS-LoRA.
        """
        pre, dropped, y = self._shared(x)
        outs = {}
        for t in self.tasks if x_tasks is None else x_tasks:
            u = dropped if x_tasks is None else x_tasks[t]
            outs[t] = pre + self._low_rank(u, self.mtlora_tasks_A[t], self.mtlora_tasks_B[t]).to(pre.dtype)
        return y, outs

    def merge(self) -> None:
        """Fold the shared LoRA into ``W0`` (TA-LoRA-only layers: a TS layer's task outputs need ``W0`` alone)."""
        if self.tasks:
            raise RuntimeError("MTLoRALinear.merge: a layer with task-specific LoRA cannot be merged (§7.12)")
        super().merge()

    def delta_weight(self) -> Tensor:
        """The shared (TA-LoRA) update ``s · B A`` in the factors' dtype (fp32 beside a half-precision weight), so
        :meth:`DeltaMergeable.merge` rounds once into the weight."""
        return self.scale * (self.mtlora_shared_B @ self.mtlora_shared_A)

    def extra_repr(self) -> str:
        return f"r={self.r}, task_r={self.task_r}, tasks={len(self.tasks)}, scale={self.scale:g}, merged={self.merged}"


@register_method("mtlora")
class MTLoRA(Method):
    """TA-LoRA on every target layer, TS-LoRA on ``task_targets`` of the last ``task_blocks`` blocks of each stage.

    Mixed batches (``set_task(model, task_ids)``, GLUE / LLM tasks): the model's last block runs two streams after
    its attention, which runs once (see :class:`_TwoStreams`), and hands each example its own task's stream; without
    task ids it returns the shared stream. All-tasks use (PASCAL, methods.md §7.4): core's
    ``backbones.swin_stage_features`` runs attention once and fans ``proj`` out to one stream per task in the last
    block of each stage via :class:`~mtbench.interfaces.TaskRouting` (the layers are
    :class:`~mtbench.interfaces.StreamAdapter` s; with one task per stream each layer batches its per-task products
    in one ``bmm``); :meth:`MTLoRALinear.forward_tasks` is the same maths per layer, task by task.
    Not mergeable: TS outputs cannot fold into one weight (§7.12); :meth:`merge_shared` folds the
    TA-LoRA of layers without TS-LoRA.
    """

    config_cls: ClassVar[type[MethodConfig]] = MTLoRAConfig
    mergeable: ClassVar[bool] = False
    cfg: MTLoRAConfig

    def __init__(self, cfg: MethodConfig, tasks: Sequence[str]) -> None:
        super().__init__(cfg, tasks)
        self.streams = _TwoStreams(self.routing)
        self.hooks: list[RemovableHandle] = []

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Wrap every target linear (and, with ``plus``, every PatchMerging reduction) in an :class:`MTLoRALinear`.

        Raises:
            ValueError: ``target_modules`` matches no linear layer.
            ConfigError: ``task_targets`` select a layer outside ``target_modules`` or a q/k/v layer; ``plus`` on a
                backbone without PatchMerging; a task name that cannot key a parameter dict.
        """
        cfg = self.cfg
        shared = find_linears(backbone, cfg.target_modules)
        tasks = self.tasks if cfg.task_targets else ()
        if bad := [t for t in tasks if not t or "." in t]:
            raise ConfigError(f"task names {bad} cannot key MTLoRA's per-task factors (empty or containing '.')")
        ts_blocks = [b for stage in stages(backbone) for b in stage[-cfg.task_blocks:]]
        try:
            ts = set(find_linears(backbone, cfg.task_targets, within=ts_blocks)) if tasks else set()
        except ValueError as exc:
            raise ConfigError(f"method.task_targets={list(cfg.task_targets)} matches no linear layer of the last "
                              f"{cfg.task_blocks} block(s) of each stage") from exc
        if outside := sorted(ts - set(shared)):
            raise ConfigError(f"method.task_targets selects layers outside method.target_modules: {outside[:3]}")
        if qkv := sorted(ts & set(_maybe_linears(backbone, _QKV_ROLES))):
            raise ConfigError(f"method.task_targets must not select q/k/v layers: {qkv[:3]}")
        no_task_input = set(_maybe_linears(backbone, ("proj",)))
        mlp = {role: _maybe_linears(backbone, (role,)) for role in ("fc1", "fc2")}  # before the layers are wrapped
        reductions = []
        if cfg.plus:
            reductions = downsamplers(backbone)
            if not reductions:
                raise ConfigError("method.plus=true needs Swin PatchMerging layers (downsample.reduction); none found")
        last = blocks(backbone)[-1]
        qkv_parents = {n.rpartition(".")[0] for n in _maybe_linears(backbone, _QKV_ROLES) if n.startswith(last + ".")}
        for name in dict.fromkeys([*shared, *reductions]):
            parent, attr = get_submodule_parent(backbone, name)
            base = getattr(parent, attr)
            layer = MTLoRALinear(
                base, r=cfg.r, scale=cfg.scale, dropout=cfg.dropout,
                tasks=tasks if name in ts else (), task_r=cfg.task_r, task_input=name not in no_task_input,
                routing=self.routing,
            )
            setattr(parent, attr, layer.train(base.training))  # a new module would start in train mode
        # Mixed batches: only the model's last block runs two streams; an earlier TS block's task streams would be
        # discarded anyway (the official BasicLayer keeps the last block's task outputs only).
        if any(name.startswith(last + ".") for name in ts):
            block = backbone.get_submodule(last)
            self.hooks.append(block.register_forward_pre_hook(self.streams.pre, with_kwargs=True))
            self.hooks.append(block.register_forward_hook(self.streams.post, always_call=True))
            if len(qkv_parents) == 1:
                attention = backbone.get_submodule(qkv_parents.pop())
                self.hooks.append(attention.register_forward_pre_hook(self.streams.attention_pre, with_kwargs=True))
                self.hooks.append(attention.register_forward_hook(self.streams.attention_post, always_call=True))
            if (closing := closing_module(backbone, last)) is not None:
                module = backbone.get_submodule(closing)
                self.hooks.append(module.register_forward_pre_hook(self.streams.closing_pre, with_kwargs=True))
                self.hooks.append(module.register_forward_hook(self.streams.closing_post, always_call=True))
                self._pair_mlp(backbone, [n for n in mlp["fc1"] if n.startswith(last + ".") and n in ts],
                               [n for n in mlp["fc2"] if n.startswith(closing + ".") and n in ts])
        refuse_shared_weights(backbone)  # merge_shared writes into base weights: a tied lm_head would move the input
        return backbone

    @staticmethod
    def _pair_mlp(backbone: nn.Module, fc1s: list[str], fc2s: list[str]) -> None:
        """Let the last block's ``fc1`` hand its task rows to the closing module's ``fc2`` (see
        :class:`_TwoStreams`) where there is one of each with TS-LoRA (``fc1s``, ``fc2s``) and ``fc1``'s module is
        ``act(fc1(x))`` with a GELU."""
        if len(fc1s) != 1 or len(fc2s) != 1:
            return
        fc1, fc2 = backbone.get_submodule(fc1s[0]), backbone.get_submodule(fc2s[0])
        others = [m for m in backbone.get_submodule(fc1s[0].rpartition(".")[0]).children() if m is not fc1]
        approximate = gelu_form(others[0]) if len(others) == 1 else None
        if approximate is not None and isinstance(fc1, MTLoRALinear) and isinstance(fc2, MTLoRALinear):
            fc1.hand_to = (fc2, approximate)

    def checkpoint_exclusions(self, model: nn.Module) -> list[str]:
        """The block that runs two streams in mixed batches: its hooks stack the streams in the forward pass, which
        a recomputation in the backward pass would not replay (torch.utils.checkpoint stops with a mismatch), so it
        keeps its activations while every other layer is recomputed."""
        return [blocks(model)[-1]] if self.hooks else []

    def task_layers(self, model: nn.Module) -> list[list[str]]:
        """Names of the TS-LoRA layers of each stage (``backbones.stages`` order), for an all-tasks caller."""
        ts = [n for n, m in model.named_modules() if isinstance(m, MTLoRALinear) and m.tasks]
        return [[n for n in ts if any(n.startswith(b + ".") for b in stage)] for stage in stages(model)]

    def merge_shared(self, model: nn.Module) -> None:
        """Fold the TA-LoRA of every layer without TS-LoRA into its base weight (TS layers stay unmerged)."""
        for module in model.modules():
            if isinstance(module, MTLoRALinear) and not module.tasks:
                module.merge()

    def unmerge_shared(self, model: nn.Module) -> None:
        """Undo :meth:`merge_shared`."""
        for module in model.modules():
            if isinstance(module, MTLoRALinear):
                module.unmerge()


class _StreamHidden(torch.autograd.Function):
    """``z2_t = A2_t act(pre1 + s·B1_t z1_t)`` for every stream ``t``, keeping no hidden-width activation.

    ``pre1`` ``(M, H)`` is the first layer's frozen output on the shared rows, ``z1`` ``(k, M, r1)`` each stream's
    down-projection, ``b1`` ``(k, H, r1)`` and ``a2`` ``(k, r2, H)`` the streams' first-layer ``B`` and second-layer
    ``A``; returns ``(k, M, r2)``. The ``(k, M, H)`` hidden activations exist one block of rows at a time
    (:data:`STREAM_BLOCK_BYTES`), in the forward pass and again in the backward pass, which differentiates the
    recomputed block with GELU's own backward kernel; only ``pre1`` and ``z1`` are saved. Everything runs in
    ``pre1``'s dtype (what autocast gives the products); gradients of ``b1`` and ``a2`` accumulate in at least
    float32.
    """

    @staticmethod
    def forward(ctx: Any, pre1: Tensor, z1: Tensor, b1: Tensor, a2: Tensor, scale: float, approximate: str
                ) -> Tensor:
        dtype = pre1.dtype
        ctx.scale, ctx.approximate, ctx.dtypes = scale, approximate, (b1.dtype, a2.dtype)
        b1t, a2 = b1.to(dtype).transpose(1, 2), a2.to(dtype)  # (k, r1, H), (k, r2, H)
        z1 = z1.to(dtype)
        ctx.save_for_backward(pre1, z1, b1t, a2)
        with torch.autocast(pre1.device.type, enabled=False):
            # Rank-space results are formed transposed, (k, r, rows) = (k, r, H) @ (k, H, rows): a GEMM with
            # r = 4 output rows runs about twice as fast on a CPU as one with r = 4 output columns (MKL, fp32).
            z2t = torch.cat([torch.bmm(a2, F.gelu(torch.baddbmm(pre1[rows], z1[:, rows], b1t, alpha=scale),
                                                  approximate=approximate).transpose(1, 2))
                             for rows in _row_blocks(pre1, z1.shape[0])], dim=2)
        return z2t.transpose(1, 2).contiguous()  # (k, M, r2): the next product takes it as a row-major operand

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre1, z1, b1t, a2 = ctx.saved_tensors
        scale, approximate = ctx.scale, ctx.approximate
        grad = grad.to(pre1.dtype)
        grad_t = grad.transpose(1, 2)  # (k, r2, M)
        g_pre1, g_z1t = torch.empty_like(pre1), []
        acc = torch.promote_types(pre1.dtype, torch.float32)  # the factors' gradients: at least fp32
        g_b1t = torch.zeros(b1t.shape, dtype=acc, device=b1t.device)
        g_a2 = torch.zeros(a2.shape, dtype=acc, device=a2.device)
        same_dtype = acc == pre1.dtype  # the factors' gradients sum in the blocks' dtype: one kernel each
        with torch.autocast(pre1.device.type, enabled=False):
            b1t_scaled = b1t * scale  # the scale once on the factor, not on every block's product
            for rows in _row_blocks(pre1, z1.shape[0]):
                f = torch.baddbmm(pre1[rows], z1[:, rows], b1t, alpha=scale)
                g_a2 = _accumulate(g_a2, grad_t[:, :, rows], F.gelu(f, approximate=approximate), same_dtype)
                g_act = torch.bmm(grad[:, rows], a2)
                if z1.shape[0] == 1:  # one stream: its gradient is pre1's, written there directly (no sum pass)
                    g_f = g_pre1[rows].unsqueeze(0)
                    torch.ops.aten.gelu_backward.grad_input(g_act, f, approximate=approximate, grad_input=g_f)
                else:
                    g_f = torch.ops.aten.gelu_backward(g_act, f, approximate=approximate)
                    torch.sum(g_f, dim=0, out=g_pre1[rows])  # pre1 is every stream's: its gradient sums theirs
                del f, g_act
                g_z1t.append(torch.bmm(b1t_scaled, g_f.transpose(1, 2)))  # (k, r1, rows), as in forward
                g_b1t = _accumulate(g_b1t, z1[:, rows].transpose(1, 2), g_f, same_dtype)
            g_b1t.mul_(scale)
        dtype_b1, dtype_a2 = ctx.dtypes
        g_z1 = torch.cat(g_z1t, dim=2).transpose(1, 2).contiguous()
        return g_pre1, g_z1, g_b1t.transpose(1, 2).to(dtype_b1), g_a2.to(dtype_a2), None, None


def _accumulate(total: Tensor, a: Tensor, b: Tensor, same_dtype: bool) -> Tensor:
    """``total + a @ b`` (batched): one ``baddbmm`` where ``total`` has the operands' dtype, else the product
    rounded up into ``total``'s (float32 sums of half-precision products). Out of place: the sums are rank-sized,
    and torch's FLOP counter counts ``baddbmm``, not ``baddbmm_``."""
    if same_dtype:
        return torch.baddbmm(total, a, b)
    return total.add_(torch.bmm(a, b).to(total.dtype))


STREAM_BLOCK_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}
"""Size of one block of :class:`_StreamHidden`'s hidden activations (all streams), by device type: on a CPU small
enough for a core's L2 cache, so that the hidden-width passes (update, activation, its backward) read and write
cache instead of main memory; on a GPU a bound on the transient memory (the backward pass holds up to three blocks
at once, so 192 MiB here, about 1 % of LoRA's peak for the PASCAL model at 448 px and batch 32), with blocks large
enough (tens of thousands of rows) to fill the device. That model's first stage then takes about 20 blocks.
Other devices take the CUDA value. On the 2-core CPU of docs/performance.md (2 MiB of L2 per
core), one MTLoRA training step of the PASCAL model (224 px, batch 4, one thread) took 2.71-2.74 s with 1-2 MiB
blocks, 2.88 s with 128 KiB blocks (the per-block overhead) and 2.82-2.88 s with 32-128 MiB (main memory)."""


def _row_blocks(pre1: Tensor, streams: int) -> list[slice]:
    """Row slices of ``pre1`` ``(M, H)`` whose ``streams`` hidden activations fit :data:`STREAM_BLOCK_BYTES`."""
    budget = STREAM_BLOCK_BYTES.get(pre1.device.type, STREAM_BLOCK_BYTES["cuda"])
    m, h = pre1.shape
    step = max(1, budget // max(1, streams * h * pre1.element_size()))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)] or [slice(0, 0)]


class _StackedSums(torch.autograd.Function):
    """``cat([pre + shared, pre + streams_1, ..., pre + streams_k])``, each sum written straight into its rows.

    ``pre`` and ``shared`` are ``(n, ...)``, ``streams`` is ``(k·n, ...)`` (stream-major), all of one dtype; returns
    ``((k + 1)·n, ...)``. The same numbers as adding and then concatenating, without the concatenation's pass over
    every row: on a mixed text batch that pass copied ``fc1``'s hidden-width output of both streams. Interleaved on
    MiniLM-L6 (32 × 128 tokens, CPU, one thread, 6 rounds) the mixed step went from 1.087 × LoRA's to 1.051 ×.
    The backward is made of differentiable operations, so double backward works; forward-mode AD and ``torch.func``
    transforms are not supported (as for :class:`_StreamHidden`).
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, shared: Tensor, streams: Tensor, k: int) -> Tensor:
        n = ctx.rows = pre.shape[0]
        out = pre.new_empty(((k + 1) * n, *pre.shape[1:]))
        torch.add(pre, shared, out=out[:n])
        torch.add(pre, streams.reshape(k, *pre.shape), out=out[n:].view(k, *pre.shape))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.rows
        g_shared, g_streams = grad[:n], grad[n:]
        g_pre = None
        if ctx.needs_input_grad[0]:  # pre is every row's: its gradient sums theirs
            one = g_streams.shape[0] == n  # one stream (mixed batches): no reduction pass
            g_pre = g_shared + (g_streams if one else g_streams.reshape(-1, *g_shared.shape).sum(0))
        return g_pre, g_shared, g_streams, None


def _plus_streams(pre: Tensor, z: Tensor, b: Tensor, scale: float) -> Tensor:
    """``pre + s·z_t B_tᵀ`` for every stream ``t``, stream-major ``(k·n, ..., out)``.

    ``pre`` ``(n, ..., out)`` is the frozen output every stream shares, ``z`` ``(k, M, r)`` the streams' rank-space
    activations (``M`` the rows of ``pre``), ``b`` ``(k, out, r)`` their ``B`` factors. One ``baddbmm`` where the
    dtypes allow (``pre`` broadcast, not copied); otherwise the product in the factors' dtype, rounded once into
    ``pre``'s.
    """
    flat = pre.reshape(1, -1, pre.shape[-1])
    b_t = b.transpose(1, 2)  # (k, r, out)
    if torch.is_autocast_enabled(pre.device.type) or flat.dtype == z.dtype:
        out = torch.baddbmm(flat, z, b_t, alpha=scale)
    else:
        out = flat + (scale * torch.bmm(z, b_t)).to(flat.dtype)
    return out.reshape(z.shape[0] * pre.shape[0], *pre.shape[1:])


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the adapters' dtype; as is under autocast, which picks the matmul dtype itself (no extra copy)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def _maybe_linears(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """:func:`find_linears`, but an empty list where nothing matches."""
    try:
        return find_linears(model, targets)
    except ValueError:
        return []

"""LoRASC: LoRA Slow Cascade Learning (Li et al.; Findings of EMNLP 2024), https://arxiv.org/abs/2407.01491.

**No official code exists** (microsoft/LoRASC was announced, never released) and only the abstract and Fig. 1 could be
read, so this is the reconstruction of methods.md §6, every default a design decision. Training runs in stages. Each
stage trains a fresh *fast* LoRA (kaiming ``A``, ``B = 0``, fresh AdamW state) on a backbone perturbed by a fixed
NoisyTune noise ``ε = U(−λ/2, λ/2) · std(W)``; at the stage's end a portion ``α_sf`` of the fast LoRA is folded into
the backbone (the slow update) and the noise is resampled. The final model is dense: no adapter at inference. The
noise never enters the weights, evaluation and checkpoints see the clean weights, folds are exact to the weight's
precision (bf16 included), and a resumed run trains on the same noise (see :class:`LoRASCLinear`).

Update rule: stage forward ``y = (W + ε) x + b + s · B A drop(x)``; at its end ``W ← W + α_sf · s · B A`` (lookahead).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from mtbench.backbones import find_linears, get_submodule_parent
from mtbench.errors import ConfigError
from mtbench.interfaces import MethodConfig, refuse_shared_weights
from mtbench.methods.lora import LoRA, LoRAConfig, LoRALinear
from mtbench.registry import register_method


if TYPE_CHECKING:
    import lightning.pytorch as pl


UpdateRule = Literal["lookahead", "ema"]
NoiseScope = Literal["adapted", "all"]


@dataclass(frozen=True, kw_only=True)
class LoRASCConfig(LoRAConfig):
    """LoRA hyperparameters plus the cascade: stage length, slow-fast pace, noise and update rule (methods.md §6)."""

    stage_steps: Annotated[int, Ge(0)] = 0
    """Stage length: 0 = one stage per epoch (the paper); N = a stage boundary every N optimizer steps."""
    slow_fast_alpha: Annotated[float, Interval(gt=0, le=1)] = 1.0
    """Slow-fast pace α_sf in (0, 1]: the share of each fast LoRA folded into the backbone at a stage's end."""
    noise: Annotated[float, Ge(0)] = 0.15
    """NoisyTune intensity λ: ε = U(-λ/2, λ/2) · std(W) per frozen matrix, drawn once per stage (seeded by the run's
    seed and the stage, so a resumed stage gets the same ε), training forwards only; 0 = off."""
    update_rule: UpdateRule = "lookahead"
    """lookahead: W ← W + α_sf·ΔW (= a slow LoRA S ← S + α_sf·ΔW under W_pre + S); ema: S ← (1-α_sf)·S + α_sf·ΔW,
    an average of the stages' deltas, backbone W_pre + S (the other reading of Fig. 1; stores S beside W)."""
    noise_scope: NoiseScope = "adapted"
    """Matrices that get noise: the adapted ones, or every frozen linear layer of the backbone (a layer a task
    trains, such as Swin's patch-merging reductions on pascal, is trained directly and gets none)."""


class LoRASCLinear(LoRALinear):
    """:class:`LoRALinear` trained on a noisy base weight ``W + ε``, with a slow update at stage ends.

    The stage noise is applied once per stage: the first training forward of a stage builds ``W + ε`` (a
    non-persistent buffer, never written into ``W``) and every training forward of the stage multiplies by it, at the
    cost of one matmul like the plain layer. Evaluation uses the clean ``W``, and state dicts hold only the clean
    weights. ``ε`` is drawn from a generator seeded by the run's noise seed, the stage index and the layer's index
    (:func:`stage_noise`), so a run resumed mid-stage trains on the same noise.

    Folds are exact to the weight's precision: the update is added at fp32 precision and rounded once; beside a
    half-precision weight the rounding remainder is kept in a persistent fp32 buffer and added to the next fold
    (compensated summation), so updates much smaller than the weight's rounding step still accumulate.

    Args:
        base, r, alpha, dropout, use_rslora, init, name: as :class:`LoRALinear`.
        ema: keep a slow accumulator ``S`` and apply the ``ema`` update rule at stage ends.
    """

    lorasc_noisy: Tensor | None
    lorasc_slow: Tensor | None
    lorasc_residual: Tensor | None

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: Literal["kaiming", "gaussian"] = "kaiming", name: str = "", ema: bool = False) -> None:
        super().__init__(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, name=name)
        weight = base.weight
        _init_noise_state(self)
        slow = torch.zeros(weight.shape, dtype=self.lora_A.dtype, device=weight.device) if ema else None
        self.register_buffer("lorasc_slow", slow)
        half = weight.dtype in (torch.float16, torch.bfloat16)
        residual = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if half else None
        self.register_buffer("lorasc_residual", residual)

    def forward(self, x: Tensor) -> Tensor:
        """``(W + ε) x + b + s · B A drop(x)`` in training, ``W x + b + s · B A drop(x)`` in evaluation."""
        noisy = noisy_weight(self, self.base.weight) if self.training and not self.merged else None
        y = self.base(x) if noisy is None else F.linear(x, noisy, self.base.bias)
        return y if self.merged else self.add_update(x, y)

    def exact_weight(self) -> Tensor:
        """``W`` at fp32 precision or wider, plus the remainder of earlier folds beside a half-precision weight."""
        weight = super().exact_weight()
        return weight if self.lorasc_residual is None else weight + self.lorasc_residual

    @torch.no_grad()
    def fold(self, delta: Tensor) -> None:
        """``W ← W + Δ`` with one rounding of the exact sum, keeping the remainder beside a half-precision ``W``."""
        weight = self.base.weight
        total = self.exact_weight() + delta.to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_(total)
        if self.lorasc_residual is not None:
            self.lorasc_residual.copy_(total - weight.float())

    @torch.no_grad()
    def end_stage(self, slow_fast_alpha: float) -> None:
        """Fold ``α_sf`` of the fast LoRA into the base weight (by the update rule), then re-initialise A and B.

        A and B are re-initialised in place, so an optimizer keeps referencing the same Parameter objects. The
        stage's noisy weight is dropped.
        """
        self.unmerge()
        delta = self.delta_weight()
        if self.lorasc_slow is None:
            self.fold(slow_fast_alpha * delta)
        else:
            slow = (1.0 - slow_fast_alpha) * self.lorasc_slow + slow_fast_alpha * delta
            self.fold(slow - self.lorasc_slow)  # W = W_pre + S, with S moved to its new value
            self.lorasc_slow.copy_(slow)
        self.reset_parameters()
        self.lorasc_noisy = None


def _init_noise_state(module: nn.Module) -> None:
    """Give a linear layer LoRASC's per-stage noise state: no noise until :func:`set_stage_noise` is called."""
    module.register_buffer("lorasc_noisy", None, persistent=False)
    module.lorasc_noise_spec = None  # (seed, λ) of the current stage, or None for no noise


def set_stage_noise(module: nn.Module, seed: int | None, noise: float) -> None:
    """Start a stage's noise on ``module``: ``ε`` seeded by ``seed`` with intensity ``λ = noise``; ``None`` or
    ``λ = 0`` removes it. The noisy weight is rebuilt lazily by the next training forward."""
    module.lorasc_noise_spec = None if seed is None or noise <= 0 else (seed, noise)
    module.lorasc_noisy = None


def _weight_of(module: nn.Module) -> Tensor:
    return module.base.weight if isinstance(module, LoRASCLinear) else module.get_parameter("weight")


@torch.no_grad()
def stage_noise(module: nn.Module) -> Tensor | None:
    """The current stage's ``ε = U(−λ/2, λ/2) · std(W)`` of a module (``W`` its clean weight, fp32), or ``None``.

    Drawn from a generator on ``W``'s device seeded by the stage's seed, so the same stage gives the same noise in a
    resumed run.
    """
    spec = getattr(module, "lorasc_noise_spec", None)
    if spec is None:
        return None
    seed, noise = spec
    weight = _weight_of(module).detach()
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    uniform = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    return (uniform - 0.5) * (noise * weight.float().std())


def noisy_weight(module: nn.Module, weight: Tensor) -> Tensor | None:
    """The weight a training forward of ``module`` uses this stage: ``W + ε``, or ``None`` without noise.

    A frozen ``W`` gets ``W + ε`` built once per stage (then reused by every forward); a ``W`` that trains (a layer a
    task unfreezes, under ``noise_scope=all``) gets no noise: LoRASC perturbs the frozen backbone only.
    """
    if module.lorasc_noise_spec is None or weight.requires_grad:
        return None
    if module.lorasc_noisy is None:
        eps = stage_noise(module)
        assert eps is not None
        with torch.no_grad():
            module.lorasc_noisy = (weight.detach().to(eps.dtype) + eps).to(weight.dtype)
    return module.lorasc_noisy


class _NoisyLinear(nn.Linear):
    """A plain ``nn.Linear`` that trains on ``W + ε`` under ``noise_scope=all``.

    Set as the class of the backbone's own (non-adapted) linear layers, so their state-dict keys and parameters stay
    those of the plain backbone; evaluation and frozen-or-not bookkeeping are unchanged.
    """

    lorasc_noisy: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        noisy = noisy_weight(self, self.weight) if self.training else None
        return super().forward(x) if noisy is None else F.linear(x, noisy, self.bias)


def _training_ends_here(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer step just taken is the last of the fit (``max_steps``, or the last epoch's last batch)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    return epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs and _epoch_ends_here(
        trainer, batch_idx)


def _epoch_ends_here(trainer: pl.Trainer, batch_idx: int) -> bool:
    return bool(trainer.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


@functools.cache
def _stages_class() -> type[pl.Callback]:
    """:class:`LoRASCStages`, defined on first use: Lightning is imported only by a run that trains."""
    import lightning.pytorch as pl

    class LoRASCStages(pl.Callback):
        """Stage boundaries of a :class:`LoRASC` run: every epoch end or every ``stage_steps`` optimizer steps.

        At a boundary the fast LoRA is folded into the backbone, A/B are re-initialised with their optimizer state
        cleared, and the noise moves to the next stage; after the last optimizer step a final fold leaves the model
        dense. The learning-rate schedule is not restarted per stage (one global schedule, methods.md §6).

        Every fold happens in ``on_train_batch_end``, which Lightning runs before it validates at that step: a
        stage-end evaluation and the final score are those of the folded model, the one that is shipped. A fit that
        stops before its last step (a stop request, to be resumed) folds nothing more: the model keeps its fast LoRA
        and is evaluated as is. The stage count and noise seed are callback state, saved in checkpoints, so a resumed
        run continues the same stage with the same noise.
        """

        def __init__(self, method: LoRASC) -> None:
            self.method = method
            self._last_boundary: int | None = None

        def state_dict(self) -> dict[str, Any]:
            return {"stages_folded": self.method.stages_folded, "noise_seed": self.method.noise_seed}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.method.stages_folded = int(state_dict["stages_folded"])
            self.method.noise_seed = int(state_dict["noise_seed"])

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._last_boundary = trainer.global_step
            self.method.start_stage(pl_module)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            # Only optimizer steps count: this hook fires per micro-batch under gradient accumulation, and the step
            # that ends the run may also end a stage; folding an untrained (B = 0) LoRA would count a stage twice.
            if trainer.global_step == self._last_boundary:
                return
            every = self.method.cfg.stage_steps
            last = _training_ends_here(trainer, batch_idx)
            if last or (trainer.global_step % every == 0 if every else _epoch_ends_here(trainer, batch_idx)):
                self._last_boundary = trainer.global_step
                self.method.end_stage(pl_module, trainer.optimizers)
                if last:
                    self.method.finish(pl_module)
                else:
                    self.method.start_stage(pl_module)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # No fold here: it would come after the last evaluation. Only the training-time noise goes.
            self.method.remove_noise(pl_module)

    return LoRASCStages


def __getattr__(name: str) -> Any:
    if name == "LoRASCStages":  # module attribute built on first access (PEP 562), see _stages_class
        return _stages_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_method("lorasc")
class LoRASC(LoRA):
    """Cascaded fast LoRAs folded into the backbone stage by stage; :meth:`merge` folds the current fast LoRA."""

    config_cls: ClassVar[type[MethodConfig]] = LoRASCConfig
    mergeable: ClassVar[bool] = True
    cfg: LoRASCConfig

    def __init__(self, cfg: MethodConfig, tasks: Sequence[str]) -> None:
        super().__init__(cfg, tasks)
        self.stages_folded = 0
        """Stage boundaries performed so far (each folds one fast LoRA into the backbone)."""
        self.noise_seed = torch.initial_seed() % 2**62
        """Seed of every stage's noise (the run's seed, read without drawing from the global generator)."""

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Wrap the targets in :class:`LoRASCLinear` (and, under ``noise_scope=all``, give every other linear layer
        the stage noise), then start the first stage's noise.

        Raises:
            ValueError: ``target_modules`` matches no linear layer.
            ConfigError: ``r`` exceeds the width of a target layer; a target's weight is shared with another module
                (tied input and output embeddings, which a fold would change too); ``noise_scope=all`` meets a linear
                layer that is not a plain ``nn.Linear``.
        """
        cfg = self.cfg
        others = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
        targets = find_linears(backbone, cfg.target_modules)
        for name in targets:
            parent, attr = get_submodule_parent(backbone, name)
            layer = LoRASCLinear(getattr(parent, attr), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                 use_rslora=cfg.use_rslora, init=cfg.init, name=name, ema=cfg.update_rule == "ema")
            setattr(parent, attr, layer)
        refuse_shared_weights(backbone)
        if cfg.noise_scope == "all":
            for name in [n for n in others if n not in targets]:
                linear = backbone.get_submodule(name)
                if type(linear) is not nn.Linear:
                    raise ConfigError(f"method.noise_scope=all: {name} is a {type(linear).__name__}, not a plain "
                                      "nn.Linear; use method.noise_scope=adapted")
                # A class with its own forward rather than a wrapper keeps the backbone's state-dict keys.
                linear.__class__ = _NoisyLinear
                _init_noise_state(linear)
        # The first stage's noise, so that a loop without the callback also trains on a perturbed backbone.
        self.start_stage(backbone)
        return backbone

    def start_stage(self, model: nn.Module) -> None:
        """Begin stage :attr:`stages_folded`: re-enable the fast LoRA branch (after :meth:`finish`) and set its noise.

        Each layer's noise is seeded by (:attr:`noise_seed`, stage, layer index), so the noise is fresh every stage
        and identical when a stage is resumed.
        """
        for index, module in enumerate(_noisy_modules(model)):
            if isinstance(module, LoRASCLinear):
                module.unmerge()
            seed = ((self.noise_seed * 1_000_003 + self.stages_folded) * 1_000_003 + index) % 2**63
            set_stage_noise(module, seed, self.cfg.noise)

    def end_stage(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Fold ``α_sf`` of every fast LoRA into its base weight, re-initialise A/B and drop their optimizer state."""
        layers = [m for m in model.modules() if isinstance(m, LoRASCLinear)]
        optimizers = list(optimizers)
        for layer in layers:
            layer.end_stage(self.cfg.slow_fast_alpha)
            for p in (layer.lora_A, layer.lora_B):
                p.grad = None
                for optimizer in optimizers:
                    optimizer.state.pop(p, None)  # AdamW then restarts its moments and bias correction for p
        self.stages_folded += 1

    def remove_noise(self, model: nn.Module) -> None:
        """Drop the stage noise of every layer (it only ever acts in training)."""
        for module in _noisy_modules(model):
            set_stage_noise(module, None, 0.0)

    def finish(self, model: nn.Module) -> None:
        """After the last fold: remove the noise and switch the (zero) branches off, leaving a dense model."""
        self.remove_noise(model)
        for module in model.modules():
            if isinstance(module, LoRASCLinear):
                module.merged = True  # B = 0 after the last fold: nothing to add, and nothing for unmerge to restore

    def callbacks(self) -> list[pl.Callback]:
        """The stage schedule (:class:`LoRASCStages`)."""
        return [_stages_class()(self)]


def _noisy_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lorasc_noise_spec")]

"""LoRASC: LoRA Slow Cascade Learning (Li et al.; Findings of EMNLP 2024), https://arxiv.org/abs/2407.01491.

**No official code exists** (microsoft/LoRASC was announced, never released) and only the abstract and Fig. 1 could be
read, so this is the reconstruction of methods.md §6, every default a design decision. Training runs in stages. Each
stage trains a fresh *fast* LoRA (kaiming ``A``, ``B = 0``, fresh AdamW state) on a backbone perturbed by a fixed
NoisyTune noise ``ε = U(−λ/2, λ/2) · std(W)``; at the stage's end a portion ``α_sf`` of the fast LoRA is folded into
the backbone (the slow update) and the noise is resampled. The final model is dense: no adapter at inference.

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
from mtbench.interfaces import MethodConfig
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
    """NoisyTune intensity λ: ε = U(-λ/2, λ/2) · std(W) per matrix, resampled every stage, training only; 0 = off."""
    update_rule: UpdateRule = "lookahead"
    """lookahead: W ← W + α_sf·ΔW (= a slow LoRA S ← S + α_sf·ΔW under W_pre + S); ema: S ← (1-α_sf)·S + α_sf·ΔW,
    an average of the stages' deltas, backbone W_pre + S (the other reading of Fig. 1; stores S beside W)."""
    noise_scope: NoiseScope = "adapted"
    """Matrices that get noise: the adapted ones, or every linear layer of the backbone."""


class LoRASCLinear(LoRALinear):
    """:class:`LoRALinear` with a stage noise ``ε`` (training forwards only) and a slow update at stage ends.

    ``ε`` is a non-persistent buffer: it never enters the base weight or a state dict, so checkpoints hold only the
    clean merged weights (a run resumed mid-stage draws a fresh ε). With the ``ema`` rule the slow accumulator ``S``
    is a persistent buffer, since resuming needs it.

    Args:
        base, r, alpha, dropout, use_rslora, init, name: as :class:`LoRALinear`.
        ema: keep a slow accumulator ``S`` and apply the ``ema`` update rule at stage ends.
    """

    lorasc_noise: Tensor | None
    lorasc_slow: Tensor | None

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: Literal["kaiming", "gaussian"] = "kaiming", name: str = "", ema: bool = False) -> None:
        super().__init__(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, name=name)
        self.register_buffer("lorasc_noise", None, persistent=False)
        slow = torch.zeros(base.weight.shape, dtype=self.lora_A.dtype, device=base.weight.device) if ema else None
        self.register_buffer("lorasc_slow", slow)

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + s · B A drop(x)``, plus ``ε x`` in training.

        The noise gets its own matmul instead of ``F.linear(x, W + ε)``: that would save a weight-sized tensor per
        layer for backward and make the noiseless part differ from ``base(x)`` by rounding.
        """
        y = super().forward(x)
        noise = self.lorasc_noise
        if self.training and noise is not None:
            y = y + F.linear(x.to(noise.dtype), noise).to(y.dtype)
        return y

    @torch.no_grad()
    def end_stage(self, slow_fast_alpha: float) -> None:
        """Fold ``α_sf`` of the fast LoRA into the base weight (by the update rule), then re-initialise A and B.

        A and B are re-initialised in place, so an optimizer keeps referencing the same Parameter objects.
        """
        self.unmerge()
        delta = self.scale * (self.lora_B @ self.lora_A)
        weight = self.base.weight
        if self.lorasc_slow is None:
            weight += (slow_fast_alpha * delta).to(weight.dtype)
        else:
            slow = (1.0 - slow_fast_alpha) * self.lorasc_slow + slow_fast_alpha * delta
            weight += (slow - self.lorasc_slow).to(weight.dtype)  # W = W_pre + S, with S moved to its new value
            self.lorasc_slow.copy_(slow)
        self.reset_parameters()


def resample_noise(module: nn.Module, noise: float) -> None:
    """Draw a module's stage noise ``U(−λ/2, λ/2) · std(W)`` (``W`` its base weight); ``λ = 0`` removes it."""
    weight: Tensor = module.base.weight if isinstance(module, LoRASCLinear) else module.get_parameter("weight")
    if noise <= 0:
        module.lorasc_noise = None  # type: ignore[assignment]
        return
    w = weight.detach().float()
    eps = (torch.rand_like(w) - 0.5) * (noise * w.std())
    module.lorasc_noise = eps.to(weight.dtype)  # type: ignore[assignment]


def _noise_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
    """Forward hook of a non-adapted linear layer under ``noise_scope=all``: add ``ε x`` in training."""
    noise: Tensor | None = getattr(module, "lorasc_noise", None)
    if not module.training or noise is None:
        return None
    return output + F.linear(args[0].to(noise.dtype), noise).to(output.dtype)


@functools.cache
def _stages_class() -> type[pl.Callback]:
    """:class:`LoRASCStages`, defined on first use: Lightning is imported only by a run that trains."""
    import lightning.pytorch as pl

    class LoRASCStages(pl.Callback):
        """Stage boundaries of a :class:`LoRASC` run: every epoch end or every ``stage_steps`` optimizer steps.

        At a boundary the fast LoRA is folded into the backbone, A/B are re-initialised with their optimizer state
        cleared, and the noise is resampled; at the end of training a final fold leaves the model dense. The
        learning-rate schedule is not restarted per stage (one global schedule, methods.md §6).
        """

        def __init__(self, method: LoRASC) -> None:
            self.method = method
            self._last_boundary: int | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._last_boundary = trainer.global_step
            self.method.start_stage(pl_module)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            every = self.method.cfg.stage_steps
            if every and trainer.global_step % every == 0:
                self._boundary(trainer, pl_module, restart=True)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not self.method.cfg.stage_steps:
                self._boundary(trainer, pl_module, restart=True)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._boundary(trainer, pl_module, restart=False)
            self.method.finish(pl_module)

        def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, restart: bool) -> None:
            # Only optimizer steps count: hooks fire per micro-batch under gradient accumulation, and an epoch or the
            # run may end right after a boundary; folding an untrained (B = 0) LoRA would count a stage that never ran.
            if trainer.global_step == self._last_boundary:
                return
            self._last_boundary = trainer.global_step
            self.method.end_stage(pl_module, trainer.optimizers)
            if restart:
                self.method.start_stage(pl_module)

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

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Wrap the targets in :class:`LoRASCLinear`, hook every other linear under ``noise_scope=all``, draw ε.

        Raises:
            ValueError: ``target_modules`` matches no linear layer.
            ConfigError: ``r`` exceeds the width of a target layer.
        """
        cfg = self.cfg
        others = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
        targets = find_linears(backbone, cfg.target_modules)
        for name in targets:
            parent, attr = get_submodule_parent(backbone, name)
            layer = LoRASCLinear(getattr(parent, attr), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                 use_rslora=cfg.use_rslora, init=cfg.init, name=name, ema=cfg.update_rule == "ema")
            setattr(parent, attr, layer)
        if cfg.noise_scope == "all":
            # A hook rather than a wrapper keeps these layers' state-dict keys those of the plain backbone.
            for name in [n for n in others if n not in targets]:
                linear = backbone.get_submodule(name)
                linear.register_buffer("lorasc_noise", None, persistent=False)
                linear.register_forward_hook(_noise_hook)
        # The first stage's noise, so that a loop without the callback also trains on a perturbed backbone.
        self.start_stage(backbone)
        return backbone

    def start_stage(self, model: nn.Module) -> None:
        """Begin a stage: re-enable the fast LoRA branch (after :meth:`finish`) and draw a fresh noise."""
        for module in model.modules():
            if isinstance(module, LoRASCLinear):
                module.unmerge()
            if hasattr(module, "lorasc_noise"):
                resample_noise(module, self.cfg.noise)

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

    def finish(self, model: nn.Module) -> None:
        """End of training: remove the noise and switch the (now zero) branches off, leaving a dense model."""
        for module in model.modules():
            if hasattr(module, "lorasc_noise"):
                module.lorasc_noise = None  # type: ignore[assignment]
            if isinstance(module, LoRASCLinear):
                module.merge()  # B = 0 after the last fold, so this only marks the branch as merged

    def callbacks(self) -> list[pl.Callback]:
        """The stage schedule (:class:`LoRASCStages`)."""
        return [_stages_class()(self)]

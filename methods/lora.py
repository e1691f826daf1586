"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021), https://arxiv.org/abs/2106.09685.

Each selected linear layer keeps its pretrained weight ``W0`` frozen and learns a low-rank update ``B A`` of rank
``r`` beside it; only ``A`` (r × d_in, "down") and ``B`` (d_out × r, "up") train. ``B`` starts at zero, so the
adapted model reproduces the backbone exactly at initialisation. The update can be folded into ``W0`` after training
(``merge``), so inference costs nothing extra. One LoRA is shared by every task (the multi-task baseline);
semantics follow peft's reference implementation (methods.md §2).

Update rule: ``y = W0 x + b + s · B A dropout(x)`` with ``s = α / r`` (rsLoRA: ``s = α / √r``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt, Interval
from torch import Tensor, nn

from mtbench.backbones import find_linears, get_submodule_parent
from mtbench.errors import ConfigError
from mtbench.interfaces import DeltaMergeable, Method, MethodConfig, ParamRole, refuse_shared_weights
from mtbench.registry import register_method


LoRAInit = Literal["kaiming", "gaussian"]


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(MethodConfig):
    """LoRA hyperparameters (peft ``LoraConfig`` names in brackets)."""

    r: Annotated[int, Gt(0)] = 8
    """Rank of the update ``B A`` [r]."""
    alpha: Annotated[float, Gt(0)] = 16.0
    """Scale numerator: the branch is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) [lora_alpha]."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """Dropout probability on the input of the low-rank branch only [lora_dropout]."""
    use_rslora: bool = False
    """Rank-stabilised scale ``alpha / sqrt(r)`` (Kalajdzievski, 2023) instead of ``alpha / r`` [use_rslora]."""
    init: LoRAInit = "kaiming"
    """Init of ``A``: kaiming (kaiming_uniform_, a=√5) or gaussian (N(0, 1/r²)); ``B`` always starts at 0."""


class LoRALinear(DeltaMergeable, nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank branch ``s · B A dropout(x)``.

    The wrapped layer stays reachable as ``base``, so state-dict keys read ``<layer>.base.weight`` and
    ``<layer>.lora_A``. Later methods (LoRA+, LoRASC) reuse this layer unchanged.

    Args:
        base: the pretrained linear layer; its parameters are frozen.
        r: rank of the update.
        alpha: scale numerator.
        dropout: dropout probability on the branch input.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` or ``"gaussian"`` init of ``A`` (``B`` starts at zero).
        name: module path of the layer, used in error messages.

    Raises:
        ConfigError: ``r`` exceeds the layer's width ``min(in_features, out_features)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
        name: str = "",
    ) -> None:
        super().__init__()
        width = min(base.in_features, base.out_features)
        if r > width:
            raise ConfigError(f"method.r={r} exceeds the width {width} of layer {name or '<unnamed>'}")
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        self.init = init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Half-precision adapters lose the small early updates of B; keep them in fp32 as peft does by default.
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=weight.device, dtype=dtype))
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the branch: ``A`` by ``init``, ``B = 0`` (the layer then equals ``base`` again)."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / self.r)
        else:
            # U(-1/sqrt(d_in), 1/sqrt(d_in)): nn.Linear's own default, as in loralib and peft.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_params(self) -> dict[str, ParamRole]:
        """The two LoRA factors and their roles (``B`` is what LoRA+ speeds up)."""
        return {"lora_A": ParamRole("A"), "lora_B": ParamRole("B")}

    def delta_weight(self) -> Tensor:
        """The dense update ``s · B A`` (out × in), in the factors' dtype (fp32 beside a half-precision weight)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + s · B A dropout(x)``; just ``base(x)`` while merged.

        Args:
            x: input ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        y = self.base(x)
        return y if self.merged else self.add_update(x, y)

    def add_update(self, x: Tensor, y: Tensor) -> Tensor:
        """``y + s · B A dropout(x)``: the low-rank branch on input ``x`` added to a base output ``y``."""
        # The scale multiplies the rank-r activations, not the (..., out) result: one pass over the output less.
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scale
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, merged={self.merged}"


@register_method("lora")
class LoRA(Method):
    """One LoRA per target layer, shared by all tasks; only the factors train (plus heads and task extras)."""

    config_cls: ClassVar[type[MethodConfig]] = LoRAConfig
    mergeable: ClassVar[bool] = True
    cfg: LoRAConfig

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Replace every target ``nn.Linear`` with a :class:`LoRALinear` in place, keeping its module name.

        Raises:
            ValueError: ``target_modules`` matches no linear layer.
            ConfigError: ``r`` exceeds the width of a target layer, or a target's weight is shared with another
                module (tied input and output embeddings: a merge would change both).
        """
        cfg = self.cfg
        for name in find_linears(backbone, cfg.target_modules):
            parent, attr = get_submodule_parent(backbone, name)
            layer = LoRALinear(
                getattr(parent, attr),
                r=cfg.r,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                use_rslora=cfg.use_rslora,
                init=cfg.init,
                name=name,
            )
            setattr(parent, attr, layer)
        refuse_shared_weights(backbone)
        return backbone

"""DoRA (Liu et al., 2024, arXiv 2402.09353, eq. 5): W' = m * (W0 + s B A) / ||W0 + s B A||, norm per output row.

A method plugin written from docs/adding-a-method.md alone, as a third-party author would: every import is one the
docs show. ``m`` (the magnitude, one value per output channel) starts at ``||W0||`` and ``B`` at zero, so the layer
is the identity at init. Its merged update depends on the original weight ``W0``, which the ``DeltaMergeable``
contract allows: ``merge`` evaluates ``delta_weight()`` on ``W0`` and ``unmerge`` restores the saved ``W0``. The tests
plant faults in copies of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbench import ConfigError, DeltaMergeable, Method, MethodConfig, ParamRole, register_method
from mtbench.backbones import find_linears, get_submodule_parent


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(MethodConfig):
    """Rank and scaling of the directional update."""

    r: int = 8
    """Rank of the low-rank directional update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / r."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ConfigError(f"method.r must be > 0, got {self.r}")


class DoRALinear(DeltaMergeable, nn.Module):
    """A frozen linear layer re-parametrised as magnitude times unit-norm direction."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=weight.dtype))
        self.magnitude = nn.Parameter(weight.detach().norm(dim=1))

    def adapter_params(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole("A"), "lora_B": ParamRole("B"), "magnitude": ParamRole("scale")}

    def _adapted_weight(self) -> Tensor:
        direction = self.base.weight + self.scaling * (self.lora_B @ self.lora_A)
        return direction * (self.magnitude / direction.norm(dim=1))[:, None]

    def delta_weight(self) -> Tensor:
        return self._adapted_weight() - self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, self._adapted_weight(), self.base.bias)


@register_method("dora_fixture")
class DoRA(Method):
    """Weight-decomposed low-rank adaptation: a learned magnitude per output channel and a LoRA-updated direction."""

    config_cls: ClassVar[type[MethodConfig]] = DoRAConfig
    mergeable: ClassVar[bool] = True

    def apply(self, backbone: nn.Module) -> nn.Module:
        cfg = self.cfg
        assert isinstance(cfg, DoRAConfig)
        for name in find_linears(backbone, cfg.target_modules):
            parent, attr = get_submodule_parent(backbone, name)
            setattr(parent, attr, DoRALinear(getattr(parent, attr), cfg.r, cfg.alpha))
        return backbone

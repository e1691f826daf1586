"""Full fine-tuning: the baseline every parameter-efficient method is measured against (methods.md §1).

The backbone is left untouched and every one of its parameters trains, together with the task heads; there is no
adapter, nothing to merge and no task routing inside the backbone (all tasks share its features; each task keeps
its own head). It is an ordinary registered method, so the runner has no special case for it.

Update rule: ``W ← W − η ∇W L`` for every backbone weight ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mtbench.interfaces import Method, MethodConfig
from mtbench.registry import register_method


@dataclass(frozen=True, kw_only=True)
class FullFTConfig(MethodConfig):
    """Full fine-tuning has no hyperparameters of its own; the inherited ``target_modules`` is not used."""


@register_method("full_ft")
class FullFineTuning(Method):
    """Train the whole backbone: no adapters, every parameter trainable."""

    config_cls: ClassVar[type[MethodConfig]] = FullFTConfig

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Return the backbone unchanged."""
        return backbone

    def trainable(self, model: nn.Module) -> set[str]:
        """Every parameter name of ``model``: all of them train."""
        return {name for name, _ in model.named_parameters()}

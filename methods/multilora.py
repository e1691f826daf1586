"""MultiLoRA: Democratizing LoRA for Better Multi-Task Learning (Wang et al., 2023), https://arxiv.org/abs/2311.11501.

A single LoRA's update is dominated by a few top singular directions. MultiLoRA scales LoRA horizontally: each
adapted linear layer gets ``n`` parallel low-rank branches whose outputs are weighted by learnable scales ``s_i`` and
summed, and it changes the init so that ``A_i`` and ``B_i`` are both random while ``s_i = 0`` (the update is still
zero at step 0, but the branches start in different subspaces). There is no task identity and no gating: multi-task
behaviour comes only from the data mixture. No official code exists; we follow methods.md §4.

Update rule: ``y = W0 x + b + (α/r) · Σ_i s_i ⊙ B_i A_i drop(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from mtbench.backbones import find_linears, get_submodule_parent
from mtbench.errors import ConfigError
from mtbench.interfaces import DeltaMergeable, Method, MethodConfig, ParamRole, refuse_shared_weights
from mtbench.registry import register_method


ScaleKind = Literal["channel", "scalar"]


@dataclass(frozen=True, kw_only=True)
class MultiLoRAConfig(MethodConfig):
    """MultiLoRA hyperparameters."""

    n: Annotated[int, Ge(1)] = 3
    """Number of parallel LoRA branches per adapted layer (``lora_num`` in the MTL-LoRA re-implementation)."""
    r: Annotated[int, Gt(0)] = 8
    """Rank of each branch; with ``equal_budget`` the total rank, split evenly over the ``n`` branches."""
    alpha: Annotated[float, Gt(0)] = 16.0
    """Scale numerator: the summed branches are multiplied by ``alpha / r`` (``r`` as configured)."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """Dropout probability on the input of the branches only."""
    scale: ScaleKind = "channel"
    """Granularity of the learnable ``s_i``: ``channel`` (one per output channel) or ``scalar`` (one per branch)."""
    equal_budget: bool = False
    """Give each branch rank ``r // n`` so the layer has as many factor parameters as one LoRA of rank ``r``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.equal_budget and self.r % self.n:
            raise ConfigError(f"method.r={self.r} must be divisible by method.n={self.n} when method.equal_budget")

    @property
    def branch_rank(self) -> int:
        """Rank ``r_i`` of each branch: ``r``, or ``r // n`` with ``equal_budget``."""
        return self.r // self.n if self.equal_budget else self.r


class MultiLoRALinear(DeltaMergeable, nn.Module):
    """A frozen ``nn.Linear`` plus ``n`` scaled low-rank branches, stored stacked along the rank dimension.

    ``multilora_A`` is ``(n·r_i, in)`` (branch ``i`` = rows ``i·r_i … (i+1)·r_i``), ``multilora_B`` is
    ``(out, n·r_i)`` (the same columns) and ``multilora_s`` is ``(n, out)`` or ``(n, 1)``. The wrapped layer stays
    reachable as ``base``.

    Args:
        base: the pretrained linear layer; its parameters are frozen.
        cfg: the method config (``n``, ``r``, ``alpha``, ``dropout``, ``scale``, ``equal_budget``).
        name: module path of the layer, used in error messages.

    Raises:
        ConfigError: the branch rank exceeds the layer's width ``min(in_features, out_features)``.
    """

    def __init__(self, base: nn.Linear, cfg: MultiLoRAConfig, name: str = "") -> None:
        super().__init__()
        rank, width = cfg.branch_rank, min(base.in_features, base.out_features)
        if rank > width:
            raise ConfigError(f"method.r: branch rank {rank} exceeds the width {width} of layer {name or '<unnamed>'}")
        self.base = base
        self.base.requires_grad_(False)
        self.n, self.rank = cfg.n, rank
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Half-precision adapters lose small early updates; keep them in fp32 as LoRALinear does.
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.multilora_A = nn.Parameter(weight.new_empty(cfg.n * rank, base.in_features, dtype=dtype))
        self.multilora_B = nn.Parameter(weight.new_empty(base.out_features, cfg.n * rank, dtype=dtype))
        s_width = base.out_features if cfg.scale == "channel" else 1
        self.multilora_s = nn.Parameter(weight.new_empty(cfg.n, s_width, dtype=dtype))
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A_i``, ``B_i`` kaiming-uniform (a=√5) per branch, ``s = 0``: the layer then equals ``base`` again."""
        for i in range(self.n):
            rows = slice(i * self.rank, (i + 1) * self.rank)
            # Per branch so B_i's bound is 1/sqrt(r_i), not 1/sqrt(n·r_i) as on the stacked tensor.
            nn.init.kaiming_uniform_(self.multilora_A[rows], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.multilora_B[:, rows], a=math.sqrt(5))
        nn.init.zeros_(self.multilora_s)

    def adapter_params(self) -> dict[str, ParamRole]:
        """Stacked factors and scales with their roles (LoRA+ speeds up ``multilora_B``)."""
        return {"multilora_A": ParamRole("A"), "multilora_B": ParamRole("B"), "multilora_s": ParamRole("scale")}

    def scaled_B(self) -> Tensor:
        """``cat_i(diag(s_i) B_i)``, shape ``(out, n·r_i)``: the scales folded into the up-projection."""
        out = self.multilora_B.shape[0]
        # s.T is (out | 1, n); broadcast it over each branch's r_i columns.
        blocks = self.multilora_B.reshape(out, self.n, self.rank) * self.multilora_s.T.unsqueeze(-1)
        return blocks.reshape(out, self.n * self.rank)

    def delta_weight(self) -> Tensor:
        """The dense update ``(α/r) Σ_i diag(s_i) B_i A_i`` (out × in), in the factors' dtype (fp32 beside a
        half-precision weight)."""
        return self.scale * (self.scaled_B() @ self.multilora_A)

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + (α/r) Σ_i s_i ⊙ B_i A_i drop(x)``; just ``base(x)`` while merged.

        Args:
            x: input ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.multilora_A.dtype), self.multilora_A)  # (..., n·r_i), all branches
        # s_i scales B_i's output channels, so it folds exactly into B: Σ_i s_i ⊙ (B_i h_i) = cat_i(diag(s_i) B_i) h.
        # That costs O(out·n·r_i) once per call, independent of the batch, and leaves one GEMM; computing the n
        # per-branch outputs (einsum over (..., n, r_i)) would materialise n times the output activations instead.
        return y + (self.scale * F.linear(h, self.scaled_B())).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, r_i={self.rank}, scale={self.scale:g}, s={tuple(self.multilora_s.shape)}, "
            f"merged={self.merged}"
        )


@register_method("multilora")
class MultiLoRA(Method):
    """``n`` scaled parallel LoRAs per target layer, shared by all tasks (no routing); mergeable."""

    config_cls: ClassVar[type[MethodConfig]] = MultiLoRAConfig
    mergeable: ClassVar[bool] = True
    cfg: MultiLoRAConfig

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Replace every target ``nn.Linear`` with a :class:`MultiLoRALinear` in place, keeping its module name.

        Raises:
            ValueError: ``target_modules`` matches no linear layer.
            ConfigError: the branch rank exceeds the width of a target layer, or a target's weight is shared with
                another module (tied input and output embeddings: a merge would change both).
        """
        for name in find_linears(backbone, self.cfg.target_modules):
            parent, attr = get_submodule_parent(backbone, name)
            setattr(parent, attr, MultiLoRALinear(getattr(parent, attr), self.cfg, name=name))
        refuse_shared_weights(backbone)
        return backbone

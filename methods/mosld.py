"""MoSLD: Mixture-of-Shared LoRAs with Dropout (Zhao, Zeng, Shi, Zhou; COLING 2025), https://arxiv.org/abs/2412.08946.

Each adapted linear layer gets a mixture of LoRA experts that **share** one down-projection ``A`` (the "general
feature" matrix) and keep their own up-projections ``B_k`` (the "specific feature" matrices). A token-level router
picks the top-K experts per token and renormalises their probabilities. During training ``A`` is regularised by
DropConnect (a fresh elementwise Bernoulli mask each forward, off in eval), and a Switch/MoLA balance loss keeps the
experts in use. Later layers get more experts (MoLA's finding); no official code exists, so unspecified details follow
MoLA's code as recorded in methods.md §5. Not mergeable: the routing depends on the input.

Update rule: ``y = W0 x + b + (α/r) Σ_{k∈TopK(x)} g_k(x) · B_k Ã drop(x)``, ``Ã = M ⊙ A / (1−p)``, M ~ Bernoulli(1−p).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval, MinLen
from torch import Tensor, nn

from mtbench.backbones import blocks, find_linears, get_submodule_parent
from mtbench.errors import ConfigError
from mtbench.interfaces import Method, MethodConfig, ParamRole
from mtbench.registry import register_method


AInit = Literal["kaiming", "gaussian"]
Mixture = Literal["grouped", "rank"]
MAX_EXPERT_SETS = 64
"""Most expert sets ``C(N, K)`` a layer computes by the grouped mixture; above it the rank form runs. The grouped
form's cost grows with the sets (each one a group of the grouped GEMM, and its ``[B_e1 | ... | B_eK]`` a copy of
``K·r × out``): on this project's CPU, one layer of 1,024 tokens took 9.5 ms at 6 sets against 8.7 ms rank, 34 ms at
496 sets against 13 ms (forward and backward, 384 → 384, r 8). 64 covers every top-2 routing up to 11 experts and
the paper's 8 experts up to top-3; torch's CUDA kernel refuses 1,024 groups or more."""


@dataclass(frozen=True, kw_only=True)
class MoSLDConfig(MethodConfig):
    """MoSLD hyperparameters (defaults: the paper's LLaMA2 setup, §4.3, with MoLA's increasing expert allocation)."""

    target_modules: tuple[str, ...] = ("q", "v")
    """Linear layers to adapt; the paper adapts the attention query and value projections only."""
    r: Annotated[int, Gt(0)] = 8
    """Rank of the shared down-projection ``A`` and of every expert's ``B_k``."""
    alpha: Annotated[float, Gt(0)] = 16.0
    """Scale numerator: the mixture is multiplied by ``alpha / r``."""
    top_k: Annotated[int, Ge(1)] = 2
    """Experts selected per token; their router probabilities are renormalised to sum to 1."""
    experts: Annotated[tuple[Annotated[int, Ge(1)], ...], MinLen(1)] = (2, 4, 6, 8)
    """Experts per depth group: the blocks split into len(experts) consecutive groups of (near-)equal size, shallow
    first. The default gives later layers more experts, which the paper's Fig. 7 and MoLA find better; the paper's
    main setup lists the reverse, (8, 6, 4, 2) — pass that to reproduce it."""
    dropconnect: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    """DropConnect probability on the shared ``A`` (training only; kept entries are rescaled by 1/(1-p))."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """Dropout probability on the input of the adapter branch (not in the paper; MoLA applies its lora_dropout)."""
    balance_coef: Annotated[float, Ge(0)] = 0.001
    """Weight of the balance loss summed over layers (MoLA's router_aux_loss_coef); 0 turns it off."""
    a_init: AInit = "kaiming"
    """Init of ``A``: kaiming (kaiming_uniform_, a=√5, as MoLA's code) or gaussian (N(0, 1/r²), peft-style). The
    paper says "random Gaussian" without a std; we default to kaiming so MoSLD shares LoRA's init (methods.md §5.2)."""
    mixture: Mixture = "grouped"
    """How ``Σ_k g_k B_k z`` is computed; the same sum either way (§5.1's "only the K selected ``B_k z``").
    ``grouped``: tokens sorted by their set of K experts and one grouped GEMM over the sets, ``K·r`` deep, each
    token's output row written once: no multiply-add for an expert the token does not use. ``rank``: one GEMM over
    every expert's ``B`` side by side with the unselected blocks of the rank-space input zero (``N·r`` deep, no
    sort and no gathers), faster on a CPU at 4 experts (docs/performance.md). ``grouped`` needs torch's
    ``grouped_mm`` (torch ≥ 2.10), at most ``MAX_EXPERT_SETS`` expert sets ``C(N, K)`` and, on CUDA, bfloat16
    (autocast) on an H100/H200 (``MoSLDLinear._grouped_mm_takes``); elsewhere the layer takes the rank form. The two
    differ by float rounding only (the order of the sums)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.top_k <= min(self.experts):
            raise ConfigError(f"method.top_k must be in [1, min(method.experts) = {min(self.experts)}], "
                              f"got {self.top_k}")


class MoSLDLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a top-K mixture of LoRA experts sharing one down-projection.

    Args:
        base: the pretrained linear layer; its parameters are frozen.
        r: rank of the shared ``A`` and of each expert ``B_k``.
        alpha: scale numerator (the mixture is multiplied by ``alpha / r``).
        n_experts: number of experts ``N`` of this layer.
        top_k: experts selected per token.
        dropconnect: DropConnect probability on ``A`` in training.
        dropout: dropout probability on the branch input.
        a_init: ``"kaiming"`` or ``"gaussian"`` init of ``A``.
        mixture: ``"grouped"`` or ``"rank"`` (:attr:`MoSLDConfig.mixture`).
        name: module path of the layer, used in error messages.

    Raises:
        ConfigError: ``r`` exceeds the layer's width, or ``top_k`` exceeds ``n_experts``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, n_experts: int, top_k: int, dropconnect: float = 0.0,
                 dropout: float = 0.0, a_init: AInit = "kaiming", mixture: Mixture = "grouped",
                 name: str = "") -> None:
        super().__init__()
        width = min(base.in_features, base.out_features)
        if r > width:
            raise ConfigError(f"method.r={r} exceeds the width {width} of layer {name or '<unnamed>'}")
        if not 1 <= top_k <= n_experts:
            raise ConfigError(f"method.top_k={top_k} must be in [1, {n_experts}] (experts of {name or 'the layer'})")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.n_experts, self.top_k = r, n_experts, top_k
        self.scale = alpha / r
        self.dropconnect = dropconnect
        self.a_init, self.mixture = a_init, mixture
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The expert sets of the grouped mixture, in colexicographic order, so that a sorted set e_1 < ... < e_K has
        # the index Σ_i C(e_i, i) (the combinatorial number system: no N^K lookup table, no loop). Built only where
        # the grouped form may run: their number C(N, K) grows fast (735,471 sets at 24 experts, top-8).
        self.n_sets = math.comb(n_experts, top_k)
        sets = sorted(itertools.combinations(range(n_experts), top_k), key=lambda c: c[::-1]) \
            if self.n_sets <= MAX_EXPERT_SETS else []
        binomials = [[math.comb(e, i) for i in range(1, top_k + 1)] for e in range(n_experts)] if sets else []
        device = base.weight.device
        self.register_buffer("expert_sets", torch.tensor(sets, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("set_binomials", torch.tensor(binomials, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("set_ends", torch.arange(1, len(sets) + 1, device=device), persistent=False)
        weight = base.weight
        # Half-precision adapters lose small early updates and skew the router's softmax; keep them in fp32.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        device = weight.device
        self.mosld_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.mosld_B = nn.Parameter(torch.empty(n_experts, base.out_features, r, device=device, dtype=dtype))
        self.mosld_router = nn.Parameter(torch.empty(n_experts, base.in_features, device=device, dtype=dtype))
        self.routed: list[tuple[Tensor, Tensor]] = []
        """``(router logits, index)`` of each training forward since the method last collected them: the balance
        loss is computed at collection, for every layer with the same expert count at once
        (:func:`balance_loss_groups`)."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` by ``a_init``, every ``B_k = 0`` (so the layer equals ``base``), router kaiming-uniform (a=√5)."""
        if self.a_init == "gaussian":
            nn.init.normal_(self.mosld_A, mean=0.0, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.mosld_A, a=math.sqrt(5))
        nn.init.zeros_(self.mosld_B)
        nn.init.kaiming_uniform_(self.mosld_router, a=math.sqrt(5))

    def adapter_params(self) -> dict[str, ParamRole]:
        """Shared ``A``, the experts' ``B`` (LoRA+ speeds these up) and the router."""
        return {"mosld_A": ParamRole("A"), "mosld_B": ParamRole("B"), "mosld_router": ParamRole("router")}

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token-level top-K routing.

        Args:
            x: input ``(..., in_features)``.

        Returns:
            ``(gates, index, probs)``: renormalised weights of the selected experts ``(..., K)`` (they sum to 1),
            the experts' indices ``(..., K)`` and the full softmax over all experts ``(..., N)``.
        """
        gates, index, logits = self._select(F.linear(x.to(self.mosld_router.dtype), self.mosld_router))
        return gates, index, logits.softmax(dim=-1)

    def _select(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # In fp32 whatever the activations' dtype: the balance loss and the top-K choice depend on it. Softmax is
        # monotonic, so the top-K logits name the top-K experts, and the selected probabilities renormalised to sum
        # to 1 are exactly the softmax of the selected logits: two kernels (and their backward) instead of a softmax
        # over all experts, a sum and a division. Returns (gates, index, fp32 logits): the full softmax is taken
        # only where it is used, by the balance loss at collection (for all layers of a group at once).
        logits = logits.float()
        top, index = logits.topk(self.top_k, dim=-1)
        return top.softmax(dim=-1), index, logits

    def forward(self, x: Tensor) -> Tensor:
        """``base(x)`` plus the routed expert mixture; in training, records its routing for the balance loss.

        Args:
            x: input ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        y = self.base(x)
        a: Tensor = self.mosld_A
        if self.training and self.dropconnect > 0:
            # DropConnect is dropout applied to the weight: keep each entry with probability 1 - p, scaled by
            # 1 / (1 - p); one fused kernel on a GPU instead of five.
            a = F.dropout(a, self.dropconnect, training=True)
        router = self.mosld_router
        if isinstance(self.dropout, nn.Identity) and a.dtype == router.dtype:
            # The shared projection and the router read the same input: one GEMM over [Ã; W_r] reads x once (and
            # writes one input gradient in the backward pass instead of two to be summed).
            z, logits = F.linear(x.to(a.dtype), torch.cat([a, router])).split([self.r, self.n_experts], dim=-1)
        else:
            z = F.linear(self.dropout(x).to(a.dtype), a)
            logits = F.linear(x.to(router.dtype), router)
        gates, index, logits = self._select(logits)
        if self.training:
            self.routed.append((logits, index))
        if self.mixture == "grouped" and self._grouped_mm_takes(z):
            mixed = self.grouped_mixture(z, gates, index)
            if mixed.dtype == y.dtype:  # y + s·mixed in one pass
                return torch.add(y, mixed, alpha=self.scale)
            return y + (self.scale * mixed).to(y.dtype)
        u, b = self.mix(z, gates, index), self.stacked_B()
        if y.dtype == u.dtype or torch.is_autocast_enabled(y.device.type):
            # y + s·u Bᵀ in one kernel: the scale and the addition ride on the GEMM that writes the output.
            return torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t(),
                               alpha=self.scale).view(y.shape)
        return y + (self.scale * F.linear(u, b)).to(y.dtype)

    def mix(self, z: Tensor, gates: Tensor, index: Tensor) -> Tensor:
        """The rank-space input of the stacked experts: ``u[..., n·r:(n+1)·r] = g_n · z`` for each selected expert
        ``n``, zero for the others, so that ``stacked_B() u = Σ_k g_k B_k z`` (the scale ``s`` is applied after).

        Args:
            z: the shared projection ``Ã x``, ``(..., r)``.
            gates, index: the selected experts' renormalised weights and indices, ``(..., K)`` each.

        Returns:
            ``(..., N·r)``.
        """
        # The rank form (mixture="rank"): a token's output row is written once, by one GEMM over all experts' B side
        # by side, as LoRA's B writes it, with no sort or gather. Its price is N·r instead of K·r multiply-adds per
        # output element, r = 8: far below the d_in of W0 x, and GEMMs this thin are bound by the output write, not
        # the arithmetic, so on a CPU it is the faster form (docs/performance.md).
        dense_gates = z.new_zeros(*gates.shape[:-1], self.n_experts).scatter(-1, index, gates.to(z.dtype))
        return (dense_gates.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)

    def _grouped_mm_takes(self, z: Tensor) -> bool:
        """Whether :meth:`grouped_mixture` runs on ``z`` (else the rank form does; the same sum):

        - torch has ``grouped_mm`` (2.10 and later), and the layer has at most :data:`MAX_EXPERT_SETS` expert sets;
        - the product's dtype (autocast's, else the adapters') is one its kernels take: float32, bfloat16 or float16;
          on CUDA only bfloat16 on a compute-capability 9.0 GPU (H100, H200), the one configuration whose kernel
          neither copies the group offsets to the host (every other GPU loops over the groups on the host) nor,
          as reported for 10.0 (pytorch/pytorch#172439), writes non-zero weight gradients for empty groups;
        - the rows of the rank-space input (``K·r`` wide) and of the stacked ``B`` (``out`` wide) are multiples of
          16 bytes, which its kernels require; and there are tokens.
        """
        if not hasattr(F, "grouped_mm") or z.numel() == 0 or self.n_sets > MAX_EXPERT_SETS:
            return False
        dtype = _product_dtype(z)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        device = z.device
        if device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) != (9, 0)):
            return False
        size = torch.finfo(dtype).bits // 8
        return self.top_k * self.r * size % 16 == 0 and self.base.out_features * size % 16 == 0

    def grouped_mixture(self, z: Tensor, gates: Tensor, index: Tensor) -> Tensor:
        """``Σ_k g_k B_k z`` per token, ``K·r`` multiply-adds per output element: the tokens are sorted by their set
        of selected experts, each set's tokens multiply that set's ``[B_e1 | ... | B_eK]`` in one grouped GEMM
        (``torch.nn.functional.grouped_mm``, group ends computed on the device: no Python loop, and on the GPUs
        :meth:`_grouped_mm_takes` admits no host sync), and every token's row is written once and put back in token
        order (the scale ``s`` is applied after).

        Args:
            z: the shared projection ``Ã x``, ``(..., r)``.
            gates, index: the selected experts' renormalised weights and indices, ``(..., K)`` each.

        Returns:
            ``(..., out_features)``, in the dtype of the product (autocast's where it is on, else the adapters').
        """
        lead, k, r = z.shape[:-1], self.top_k, self.r
        z, gates, index = z.reshape(-1, r), gates.reshape(-1, k), index.reshape(-1, k)
        experts, slot = index.sort(dim=-1)  # each set in ascending order, as the sets' B blocks are stacked
        gates = gates.gather(-1, slot)
        set_id = self.set_binomials.gather(0, experts).sum(dim=-1)  # (M,): Σ_i C(e_i, i + 1)
        sorted_ids, order = set_id.sort(stable=True)
        inverse = order.argsort()
        # Where each set's tokens end in that order: the offsets of the grouped GEMM, computed on the device.
        ends = torch.searchsorted(sorted_ids, self.set_ends, out_int32=True)
        dtype = _product_dtype(z)
        u = (gates.to(dtype).unsqueeze(-1) * z.to(dtype).unsqueeze(-2)).flatten(-2)  # (M, K·r)
        # (sets, K·r, out): row k·r + j of set c is column j of B_{e_k}, matching u's (k, j) columns. Cast and
        # transposed once per expert, then gathered per set (C(N, K)·K blocks, more than N): one copy of that size.
        b = self.mosld_B.to(dtype).transpose(1, 2).contiguous()[self.expert_sets].view(self.n_sets, k * r, -1)
        out = F.grouped_mm(_Permute.apply(u, order, inverse), b, offs=ends)  # tokens in set order
        return _Permute.apply(out, inverse, order).view(*lead, -1)  # back in token order

    def stacked_B(self) -> Tensor:  # noqa: N802 (the paper's B)
        """Every expert's ``B_k`` side by side, ``(out, N·r)``: column block ``n`` is ``B_n``."""
        return self.mosld_B.permute(1, 0, 2).reshape(self.base.out_features, self.n_experts * self.r)

    @property
    def balance_losses(self) -> tuple[Tensor, ...]:
        """The balance loss of each training forward since the method last collected them, in call order (computed
        on each access from :attr:`routed`, which is what the method clears)."""
        by_call = {i: loss for members, losses in balance_loss_groups(self.routed)
                   for i, loss in zip(members, losses, strict=True)}
        return tuple(by_call[i] for i in range(len(self.routed)))

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.n_experts}, top_k={self.top_k}, scale={self.scale:g}, p={self.dropconnect}"


def _product_dtype(z: Tensor) -> torch.dtype:
    """The dtype the grouped mixture multiplies in: autocast's where it is on, else ``z``'s (the adapters')."""
    device = z.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else z.dtype


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` of ``x``'s rows, whose gradient is the gather ``grad[inverse]``.

    Autograd's own backward of row indexing scatters into a zero-filled tensor of ``x``'s shape (index_put), and
    index_copy's keeps its ``(rows, width)`` source for the backward pass; with the inverse permutation both passes
    are gathers, one kernel each, and only the indices are kept. Gathers are deterministic on every device.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def balance_loss_groups(routed: list[tuple[Tensor, Tensor]]) -> list[tuple[list[int], Tensor]]:
    """Switch/MoLA balance loss ``N · Σ_k f_k · P_k`` of every routed call, computed group by group.

    ``f_k`` is the fraction of the call's tokens × K top-K assignments that went to expert ``k`` (no gradient),
    ``P_k`` its mean router probability over the call's tokens. Padding tokens count too: the layer never sees the
    mask. Calls with the same expert count, token count and K (the layers of one depth group, in one forward) are
    computed together: one set of kernels per group instead of one per layer, which on a GPU, where these tiny
    kernels cost their launch, was about a tenth of a MoSLD step's kernels.

    Args:
        routed: ``(logits (..., N), index (..., K))`` per call: the router's fp32 logits and the selected experts.

    Returns:
        ``[(positions in routed, losses (L,))]``, one entry per group.
    """
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (logits, index) in enumerate(routed):
        groups.setdefault((logits.shape[-1], logits.numel(), index.shape[-1]), []).append(i)
    out = []
    for (n, numel, k), members in groups.items():
        probs = torch.stack([routed[i][0].reshape(numel // n, n) for i in members]).softmax(dim=-1)  # (L, T, N)
        index = torch.stack([routed[i][1].reshape(numel // n, k) for i in members])  # (L, T, K)
        # A comparison rather than bincount (no deterministic CUDA kernel under use_deterministic_algorithms) or
        # F.one_hot (its range check reads the indices back to the host: a device sync in every layer).
        hit = index.flatten(1).unsqueeze(-1) == torch.arange(n, device=index.device)  # (L, T·K, N)
        f = hit.to(probs.dtype).mean(dim=1)
        out.append((members, n * (f * probs.mean(dim=1)).sum(dim=-1)))
    return out


def experts_per_block(n_blocks: int, experts: tuple[int, ...]) -> list[int]:
    """Expert count of each block: block ``i`` of ``L`` falls in group ``floor(i·G/L)`` of the ``G`` groups.

    With ``L`` a multiple of ``G`` the groups are consecutive and equal (32 blocks, (2, 4, 6, 8): 8 blocks each);
    otherwise each block takes the group of its relative depth (2 blocks with 4 groups get 2 and 6 experts).
    """
    return [experts[i * len(experts) // n_blocks] for i in range(n_blocks)]


@register_method("mosld")
class MoSLD(Method):
    """A shared-A mixture of LoRA experts per target layer, with DropConnect on A and a router balance loss."""

    config_cls: ClassVar[type[MethodConfig]] = MoSLDConfig
    mergeable: ClassVar[bool] = False
    cfg: MoSLDConfig

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Replace every target ``nn.Linear`` with a :class:`MoSLDLinear`, its expert count set by its block's depth.

        Raises:
            ValueError: ``target_modules`` matches no linear layer, or the backbone family is unknown.
            ConfigError: a target lies outside the backbone's blocks, or ``r`` exceeds a target's width.
        """
        cfg = self.cfg
        paths = blocks(backbone)
        counts = dict(zip(paths, experts_per_block(len(paths), cfg.experts)))
        for name in find_linears(backbone, cfg.target_modules):
            block = next((b for b in paths if name.startswith(b + ".")), None)
            if block is None:
                raise ConfigError(f"method.target_modules selects {name}, outside the backbone's blocks; MoSLD "
                                  f"assigns experts by block depth, so only layers inside blocks can be adapted")
            parent, attr = get_submodule_parent(backbone, name)
            layer = MoSLDLinear(getattr(parent, attr), r=cfg.r, alpha=cfg.alpha, n_experts=counts[block],
                                top_k=cfg.top_k, dropconnect=cfg.dropconnect, dropout=cfg.dropout,
                                a_init=cfg.a_init, mixture=cfg.mixture, name=name)
            setattr(parent, attr, layer)
        return backbone

    def set_task(self, model: nn.Module, task_ids: Tensor | str | None) -> None:
        """Route the next forward (MoSLD's routing is per token, not per task) and drop stale balance losses.

        The runner calls this before every forward, so losses recorded by a forward whose :meth:`aux_loss` was never
        collected (for example a training-mode forward without a loss) cannot leak into the next step.
        """
        super().set_task(model, task_ids)
        for layer in _layers(model):
            layer.routed.clear()

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        """``balance_coef · Σ_layers N · Σ_k f_k P_k`` of the last training forward, then cleared.

        Returns:
            A scalar, or ``None`` in eval mode, when nothing was recorded, or when ``balance_coef`` is 0.
        """
        routed = [call for layer in _layers(model) for call in layer.routed]
        for layer in _layers(model):
            layer.routed.clear()
        if not routed or not model.training or self.cfg.balance_coef == 0:
            return None
        return self.cfg.balance_coef * torch.cat([losses for _, losses in balance_loss_groups(routed)]).sum()


def _layers(model: nn.Module) -> list[MoSLDLinear]:
    return [m for m in model.modules() if isinstance(m, MoSLDLinear)]

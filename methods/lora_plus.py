"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu, ICML 2024), https://arxiv.org/abs/2402.12354.

The model is exactly LoRA's (same layers, init, forward and merge); only the optimizer changes. The paper's
infinite-width analysis shows that equal step sizes for ``A`` and ``B`` learn features inefficiently, so ``B`` gets a
learning rate ``λ`` times larger (λ ≈ 2^4 in practice). ``roles`` mode (default) speeds up every tensor declared as a
``B`` by its layer, whatever the method; ``peft`` mode reproduces ``peft.optimizers.create_loraplus_optimizer``'s
partition for comparison with published numbers (methods.md §3.4).

Update rule: ``η_B = λ · η_A``; every other trainable parameter keeps ``η_A``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Gt
from torch import nn

from mtbench.interfaces import AdapterModule, MethodConfig, adapter_roles
from mtbench.methods.lora import LoRA, LoRAConfig
from mtbench.registry import register_method


Partition = Literal["roles", "peft"]


@dataclass(frozen=True, kw_only=True)
class LoRAPlusConfig(LoRAConfig):
    """LoRA hyperparameters plus LoRA+'s learning-rate ratio (peft ``create_loraplus_optimizer`` names in brackets)."""

    lr_ratio: Annotated[float, Gt(0)] = 16.0
    """λ = η_B / η_A [loraplus_lr_ratio]. Must be > 0: λ < 1 is allowed because the official sweeps include it."""
    partition: Partition = "roles"
    """``roles``: ×λ for declared ``B`` tensors only; ``peft``: peft's name/ndim rule (×λ for every 1-D tensor too)."""
    embedding_lr: Annotated[float, Gt(0)] = 1e-6
    """Absolute lr of LoRA factors on embedding layers, ``peft`` partition only [loraplus_lr_embedding]."""


@register_method("lora_plus")
class LoRAPlus(LoRA):
    """LoRA whose ``B`` factors train at ``lr_ratio`` times the base learning rate; only the groups differ."""

    config_cls: ClassVar[type[MethodConfig]] = LoRAPlusConfig
    cfg: LoRAPlusConfig

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: ``B`` tensors at ``lr · lr_ratio``, the rest at ``lr`` (see ``partition``).

        Unlike peft, whose ``weight_decay`` kwarg is silently ignored in favour of ``loraplus_weight_decay``
        (default 0; methods.md §3.4), ``weight_decay`` here is applied to every decaying group in both partitions.
        """
        cfg = self.cfg
        if cfg.partition == "peft":
            return _peft_groups(model, lr, cfg.lr_ratio, cfg.embedding_lr, weight_decay)
        params = dict(model.named_parameters(remove_duplicate=False))
        # Declared roles, not name substrings, so shared, per-task and per-expert B's of every method are found.
        b_ids = {id(params[name]) for name, role in adapter_roles(model).items() if role.kind == "B"}

        def key(_: str, p: nn.Parameter) -> str:
            # 2-D weights decay; biases and norms don't, in both lr groups.
            return ("B_" if id(p) in b_ids else "") + ("decay" if p.ndim >= 2 else "no_decay")

        fast = lr * cfg.lr_ratio
        settings = {"B_decay": (fast, weight_decay), "B_no_decay": (fast, 0.0)}
        return _grouped(model, key, settings | {"decay": (lr, weight_decay), "no_decay": (lr, 0.0)})


def _peft_groups(model: nn.Module, lr: float, ratio: float, embedding_lr: float, wd: float) -> list[dict[str, Any]]:
    """peft's partition: embedding LoRA → ``embedding``; ``"lora_B"`` in name or 1-D → B; the rest → ``groupA``."""
    # peft builds its decay set with transformers' get_parameter_names(model, ALL_LAYERNORM_LAYERS); mirror it.
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    norms = tuple(ALL_LAYERNORM_LAYERS)
    in_norm = {id(p) for m in model.modules() if m is not model and isinstance(m, norms) for p in m.parameters()}
    embedding = _embedding_adapter_ids(model)

    def key(name: str, p: nn.Parameter) -> str:
        if id(p) in embedding:
            return "embedding"
        if "lora_B" in name or p.ndim == 1:
            return "groupB" if id(p) not in in_norm and "bias" not in name else "groupB_no_decay"
        return "groupA"

    settings = {"groupA": (lr, wd), "embedding": (embedding_lr, wd), "groupB": (lr * ratio, wd)}
    return _grouped(model, key, settings | {"groupB_no_decay": (lr * ratio, 0.0)})


def _grouped(
    model: nn.Module, key: Callable[[str, nn.Parameter], str], settings: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """Named groups ``{params, lr, weight_decay, name}`` in ``settings`` order, by ``key``; empty ones dropped."""
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in settings}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[key(name, p)].append(p)
    groups = ({"params": buckets[k], "lr": lr, "weight_decay": wd, "name": k} for k, (lr, wd) in settings.items())
    return [g for g in groups if g["params"]]


def _embedding_adapter_ids(model: nn.Module) -> set[int]:
    """Ids of adapter parameters of layers wrapping an ``nn.Embedding`` (ours: ``base``, peft: ``base_layer``)."""
    ids: set[int] = set()
    for module in model.modules():
        # Our adapter layers declare adapter_params and wrap ``base``; peft's tuner layers wrap ``base_layer``.
        base = getattr(module, "base" if isinstance(module, AdapterModule) else "base_layer", None)
        if isinstance(base, nn.Embedding):
            wrapped = {id(p) for p in base.parameters()}
            ids |= {id(p) for p in module.parameters() if id(p) not in wrapped}
    return ids

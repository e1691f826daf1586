"""LoRA+ optimizer groups: B tensors (found by role) at lr·λ, peft's partition reproduced, weight decay applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.interfaces import MultiTaskModel, ParamRole, adapter_roles
from mtbench.methods.lora_plus import LoRAPlus, LoRAPlusConfig
from mtbench.methods.multilora import MultiLoRA, MultiLoRAConfig


LR, RATIO, WD = 1e-3, 16.0, 0.05


def _lr_wd(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr, weight decay), checking that every trainable parameter is listed exactly once."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for group in groups:
        assert group["params"], "empty groups must be dropped"
        for p in group["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} listed twice"
            out[names[id(p)]] = (group["lr"], group["weight_decay"])
    assert set(out) == {n for n, p in model.named_parameters() if p.requires_grad}
    return out


def _lora_plus_model(**cfg: object) -> tuple[LoRAPlus, MultiTaskModel]:
    """LoRA+ on tiny BERT with two heads; adapters, heads, LayerNorms and attention-output biases train."""
    method = LoRAPlus(LoRAPlusConfig(**cfg), tasks=("a", "b"))
    backbone = method.apply(tiny_bert().model)
    model = MultiTaskModel(backbone, nn.ModuleDict({t: nn.Linear(32, 2) for t in ("a", "b")}))
    trainable = method.trainable(model)
    for name, p in model.named_parameters():
        extra = name.startswith("heads.") or "LayerNorm" in name or name.endswith("attention.output.dense.base.bias")
        p.requires_grad_(name in trainable or extra)
    return method, model


def test_roles_b_only_at_ratio() -> None:
    method, model = _lora_plus_model(r=4, lr_ratio=RATIO)
    groups = method.param_groups(model, LR, WD)
    assert all("name" in g for g in groups)
    table = _lr_wd(model, groups)
    b_names = {n for n, role in adapter_roles(model).items() if role.kind == "B"}
    assert len(b_names) == 12
    for name, (lr, wd) in table.items():
        assert lr == pytest.approx(LR * RATIO if name in b_names else LR), name
        assert wd == (WD if dict(model.named_parameters())[name].ndim >= 2 else 0.0), name
    # Heads, LayerNorms and biases stay at the base lr (peft would put the 1-D ones at lr·λ).
    assert table["heads.a.bias"][0] == LR and table["heads.a.weight"] == (LR, WD)
    assert table["backbone.encoder.layer.0.attention.output.LayerNorm.weight"] == (LR, 0.0)
    assert table["backbone.encoder.layer.0.attention.output.dense.base.bias"] == (LR, 0.0)


class _Adapter(nn.Module):
    """A method layer whose B tensors are called ``up`` (shared) and ``task_up.<task>`` (per task)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(2, 8))
        self.up = nn.Parameter(torch.zeros(8, 2))
        self.task_up = nn.ParameterDict({t: nn.Parameter(torch.zeros(8, 2)) for t in ("a", "b")})
        self.gate = nn.Parameter(torch.ones(8))

    def adapter_params(self) -> dict[str, ParamRole]:
        roles = {"down": ParamRole("A"), "up": ParamRole("B"), "gate": ParamRole("scale")}
        return roles | {f"task_up.{t}": ParamRole("B", task=t) for t in ("a", "b")}


def test_roles_finds_b_of_any_name() -> None:
    model = nn.Sequential(_Adapter(), nn.LayerNorm(8), nn.Linear(8, 2))
    groups = LoRAPlus(LoRAPlusConfig(lr_ratio=4.0), tasks=("a", "b")).param_groups(model, LR, WD)
    table = _lr_wd(model, groups)
    fast = {n for n, (lr, _) in table.items() if lr == pytest.approx(4 * LR)}
    assert fast == {"0.up", "0.task_up.a", "0.task_up.b"}
    assert table["0.gate"] == (LR, 0.0) and table["0.down"] == (LR, WD) and table["1.weight"] == (LR, 0.0)


def test_roles_on_another_method() -> None:
    method = MultiLoRA(MultiLoRAConfig(n=2, r=2), tasks=("a",))
    model = method.apply(tiny_bert().model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in method.trainable(model))
    table = _lr_wd(model, LoRAPlus(LoRAPlusConfig(), tasks=("a",)).param_groups(model, LR, WD))
    fast = {n for n, (lr, _) in table.items() if lr > LR}
    assert fast and fast == {n for n in table if n.endswith("multilora_B")}


def _peft_optimizer_table(model: nn.Module, **kwargs: float) -> dict[str, tuple[float, float]]:
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(
        model, optimizer_cls=torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD, **kwargs
    )
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def _unfreeze_extras(model: nn.Module, prefix: str = "") -> None:
    """Make non-LoRA tensors of every kind trainable: 2-D weights, biases, LayerNorms, a 1-D non-norm tensor."""
    extras = (
        "embeddings.word_embeddings.weight",
        "encoder.layer.1.intermediate.dense.weight",
        "encoder.layer.1.intermediate.dense.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.0.attention.self.temperature",
    )
    model.get_submodule(prefix + "encoder.layer.0.attention.self").register_parameter(
        "temperature", nn.Parameter(torch.ones(4))
    )
    for name, p in model.named_parameters():
        if name.removeprefix(prefix) in extras:
            p.requires_grad_(True)


def test_peft_partition_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    theirs = peft.get_peft_model(tiny_bert().model, config)
    _unfreeze_extras(theirs, "base_model.model.")

    method = LoRAPlus(
        LoRAPlusConfig(r=4, alpha=8.0, target_modules=("query", "value"), partition="peft", lr_ratio=RATIO),
        tasks=("a",),
    )
    ours = method.apply(tiny_bert().model)
    keep = set(method.trainable(ours))
    for name, p in ours.named_parameters():
        p.requires_grad_(name in keep)
    _unfreeze_extras(ours)

    def to_ours(name: str) -> str:
        name = name.removeprefix("base_model.model.")
        for factor in ("lora_A", "lora_B"):
            name = name.replace(f".{factor}.default.weight", f".{factor}")
        return name

    expected = {to_ours(n): v for n, v in _peft_optimizer_table(theirs).items()}
    got = _lr_wd(ours, method.param_groups(ours, LR, WD))
    assert got == expected
    # The partition really exercises every rule: LoRA B, LayerNorm, bias, 1-D non-norm, 2-D non-LoRA.
    assert got["encoder.layer.0.attention.self.query.lora_B"] == (LR * RATIO, WD)
    assert got["encoder.layer.0.attention.self.temperature"] == (LR * RATIO, WD)
    assert got["encoder.layer.0.attention.output.LayerNorm.weight"] == (LR * RATIO, 0.0)
    assert got["encoder.layer.1.intermediate.dense.bias"] == (LR * RATIO, 0.0)
    assert got["embeddings.word_embeddings.weight"] == (LR, WD)
    names = [g["name"] for g in method.param_groups(ours, LR, WD)]
    assert names == ["groupA", "groupB", "groupB_no_decay"]


def test_peft_partition_on_peft_model_with_embedding_lora() -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"])
    model = peft.get_peft_model(tiny_bert().model, config)
    _unfreeze_extras(model, "base_model.model.")
    method = LoRAPlus(LoRAPlusConfig(partition="peft", lr_ratio=RATIO, embedding_lr=3e-6), tasks=("a",))
    got = _lr_wd(model, method.param_groups(model, LR, WD))
    assert got == _peft_optimizer_table(model, loraplus_lr_embedding=3e-6)
    assert got["base_model.model.embeddings.word_embeddings.lora_embedding_B.default"] == (3e-6, WD)


class _EmbeddingAdapter(nn.Module):
    """One of our adapter layers on an embedding: its factors form peft's absolute-lr ``embedding`` group."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Embedding(10, 8).requires_grad_(False)
        self.emb_A = nn.Parameter(torch.zeros(2, 10))
        self.emb_B = nn.Parameter(torch.randn(8, 2))

    def adapter_params(self) -> dict[str, ParamRole]:
        return {"emb_A": ParamRole("A"), "emb_B": ParamRole("B")}


def test_peft_partition_embedding_group_for_our_layers() -> None:
    model = nn.Sequential(_EmbeddingAdapter(), nn.Linear(8, 2))
    method = LoRAPlus(LoRAPlusConfig(partition="peft", embedding_lr=2e-6), tasks=("a",))
    groups = method.param_groups(model, LR, WD)
    assert _lr_wd(model, groups) == {
        "0.emb_A": (2e-6, WD),
        "0.emb_B": (2e-6, WD),
        "1.weight": (LR, WD),
        "1.bias": (LR * 16, 0.0),
    }
    assert [g["name"] for g in groups] == ["groupA", "embedding", "groupB_no_decay"]


def test_weight_decay_applied() -> None:
    for partition in ("roles", "peft"):
        method, model = _lora_plus_model(partition=partition)
        groups = {g["name"]: g for g in method.param_groups(model, LR, 0.123)}
        decaying = {"B_decay", "decay"} if partition == "roles" else {"groupA", "groupB"}
        assert decaying <= set(groups)
        for name, group in groups.items():
            assert group["weight_decay"] == (0.123 if name in decaying or name == "embedding" else 0.0), name


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"lr_ratio": 0.0}, "method.lr_ratio"),
        ({"partition": "names"}, "method.partition"),
        ({"embedding_lr": -1.0}, "method.embedding_lr"),
        ({"r": 0}, "method.r"),
    ],
)
def test_bad_config(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        LoRAPlusConfig(**cfg)

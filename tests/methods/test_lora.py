"""LoRA numerics: identity at init, agreement with peft, scales, init statistics, merge round trip, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _merge_checks import assert_exact_bf16_round_trip
from torch import nn

from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.interfaces import ParamRole, adapter_roles
from mtbench.methods.lora import LoRA, LoRAConfig, LoRALinear


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _adapted(**cfg: object) -> tuple[LoRA, nn.Module]:
    method = LoRA(LoRAConfig(**cfg), tasks=("a", "b"))
    return method, method.apply(tiny_bert().model).eval()


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA branch non-zero factors, so the branch actually contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.2)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)


@torch.no_grad()
def _hidden(model: nn.Module) -> torch.Tensor:
    return model(**_inputs()).last_hidden_state


def test_identity_at_init() -> None:
    expected = _hidden(tiny_bert().model.eval())
    _, model = _adapted(dropout=0.1)
    assert torch.equal(_hidden(model), expected)


def test_wraps_every_target_and_keeps_names() -> None:
    _, model = _adapted()
    layers = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 6  # q, k, v, attention output, intermediate, output per block
    keys = model.state_dict().keys()
    assert "encoder.layer.0.attention.self.query.base.weight" in keys
    assert "encoder.layer.0.attention.self.query.lora_A" in keys
    roles = adapter_roles(model)
    assert roles["encoder.layer.1.output.dense.lora_B"] == ParamRole("B")
    assert len(roles) == 2 * len(layers)
    assert all(not m.base.weight.requires_grad for n, m in model.named_modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft(rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    r, alpha = 4, 12.0
    _, ours = _adapted(r=r, alpha=alpha, use_rslora=rslora, target_modules=("qkv", "proj", "fc1", "fc2"))
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora, target_modules=["query", "key", "value", "dense"]
    )
    theirs = peft.inject_adapter_in_model(config, tiny_bert().model).eval()
    _randomise(ours)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 12
    with torch.no_grad():
        for name, m in layers:
            ref = theirs.get_submodule(name)
            ref.lora_A["default"].weight.copy_(m.lora_A)
            ref.lora_B["default"].weight.copy_(m.lora_B)
            assert ref.scaling["default"] == pytest.approx(m.scale)
    out, expected = _hidden(ours), _hidden(theirs)
    assert (out - expected).abs().max().item() <= 1e-6
    assert (out - _hidden(tiny_bert().model.eval())).abs().max().item() > 1e-2  # the branch really contributes


@pytest.mark.parametrize(("rslora", "scale"), [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_scale(rslora: bool, scale: float) -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(10, 6), r=4, alpha=16.0, use_rslora=rslora)
    assert layer.scale == scale
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 10)
    expected = layer.base(x) + scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gaussian_init_std() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 256), r=8, alpha=16.0, init="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert layer.lora_A.mean().abs().item() < 0.01
    assert torch.count_nonzero(layer.lora_B) == 0


def test_kaiming_init_bound() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 64), r=8, alpha=16.0)
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max().item() <= bound
    assert layer.lora_A.abs().max().item() > 0.95 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_merge_unmerge_round_trip() -> None:
    method, model = _adapted(r=4, alpha=8.0)
    _randomise(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _hidden(model)
    method.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    q = model.encoder.layer[0].attention.self.query
    assert not torch.equal(q.base.weight, weights["encoder.layer.0.attention.self.query.base.weight"])
    assert (_hidden(model) - before).abs().max().item() <= 1e-5
    method.merge(model)  # merging twice must not add the update twice
    assert (_hidden(model) - before).abs().max().item() <= 1e-5
    method.unmerge(model)
    assert (_hidden(model) - before).abs().max().item() <= 1e-5
    for key, value in model.state_dict().items():
        assert (value - weights[key]).abs().max().item() <= 1e-6, key


def test_merged_weight_is_w_plus_sba() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), r=2, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, w0 + 1.5 * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"r": 0}, "method.r"),
        ({"alpha": 0.0}, "method.alpha"),
        ({"dropout": 1.0}, "method.dropout"),
        ({"dropout": -0.1}, "method.dropout"),
        ({"init": "orthogonal"}, "method.init"),
    ],
)
def test_bad_config(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        LoRAConfig(**cfg)


def test_rank_exceeds_layer_width() -> None:
    method = LoRA(LoRAConfig(r=33), tasks=("a",))  # tiny_bert's hidden size is 32
    with pytest.raises(ConfigError, match=r"method\.r=33 exceeds the width 32 of layer encoder\.layer\.0"):
        method.apply(tiny_bert().model)


def test_no_matching_target_raises() -> None:
    method = LoRA(LoRAConfig(target_modules=("nothing_like_this",)), tasks=("a",))
    with pytest.raises(ValueError, match="target_modules"):
        method.apply(tiny_bert().model)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=4.0, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


MERGING = ("lora", "lora_plus", "multilora", "lorasc")
"""Every method whose layers write their update into the base weight (merge, or LoRASC's stage folds)."""


def test_merging_methods_are_all_listed() -> None:
    from mtbench import registry

    registry.discover()
    builtins = [n for n in registry.methods.names() if registry.methods.origin(n).startswith("built-in")]
    assert {n for n in builtins if registry.methods.get(n).mergeable} <= set(MERGING)


@pytest.mark.parametrize("name", MERGING)
def test_tied_output_embedding_is_refused(name: str) -> None:
    # The tiny LLaMA ties lm_head to the input embedding, as SmolLM2 does: a merge into lm_head would move both.
    from mtbench import registry
    from mtbench.backbones import tiny_llama

    registry.discover()
    cls = registry.methods.get(name)
    method = cls(cls.config_cls(target_modules=("q", "lm_head")), tasks=("a",))
    with pytest.raises(ConfigError, match=r"selects lm_head, whose weight is shared with model\.embed_tokens\.weight"):
        method.apply(tiny_llama().model)


def test_tied_output_embedding_is_refused_when_merging_too() -> None:
    # A model adapted without the check (a plugin's apply) is still refused by merge(), before any weight moves.
    from mtbench.backbones import tiny_llama

    model = tiny_llama().model
    model.lm_head = LoRALinear(model.lm_head, r=2, alpha=4.0, name="lm_head")
    nn.init.normal_(model.lm_head.lora_B)
    embedding = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ConfigError, match="lm_head"):
        LoRA(LoRAConfig(), tasks=("a",)).merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_tied_output_embedding_exits_2_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mtbench.cli import main

    code = main(["run", "--method", "lora", "--task", "llm_mixture", "--profile", "smoke", "--no-progress",
                 "--set", "method.target_modules=[q,lm_head]", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lm_head" in err[0] and "Traceback" not in err[0]


@torch.no_grad()
def test_bf16_merge_rounds_once_and_unmerge_restores_every_bit() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64).to(torch.bfloat16), r=4, alpha=4.0)
    layer.lora_B.normal_(0.0, 3e-3)  # updates of ~3e-4, about the weights' bf16 rounding step
    w0 = layer.base.weight.clone()
    assert_exact_bf16_round_trip(layer)  # bit for bit, for every one of the 4,096 weights
    layer.merge()
    layer.merge()  # merging twice changes nothing
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)

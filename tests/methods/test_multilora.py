"""MultiLoRA numerics: identity at init, step-0 gradients, vectorised forward vs a loop, merge, options, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _merge_checks import assert_exact_bf16_round_trip
from torch import nn

from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.interfaces import ParamRole, adapter_roles
from mtbench.methods.multilora import MultiLoRA, MultiLoRAConfig, MultiLoRALinear


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _adapted(**cfg: object) -> tuple[MultiLoRA, nn.Module]:
    method = MultiLoRA(MultiLoRAConfig(**cfg), tasks=("a", "b"))
    return method, method.apply(tiny_bert().model).eval()


def _layer(n: int = 3, r: int = 2, scale: str = "channel", seed: int = 0) -> MultiLoRALinear:
    torch.manual_seed(seed)
    return MultiLoRALinear(nn.Linear(10, 6), MultiLoRAConfig(n=n, r=r, alpha=3.0, scale=scale))


def _loop_reference(layer: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``W0 x + b + (α/r) Σ_i s_i ⊙ B_i A_i x`` with an explicit loop over branches."""
    y = layer.base(x)
    for i in range(layer.n):
        rows = slice(i * layer.rank, (i + 1) * layer.rank)
        branch = F.linear(F.linear(x, layer.multilora_A[rows]), layer.multilora_B[:, rows])
        y = y + layer.scale * layer.multilora_s[i] * branch
    return y


def test_identity_at_init() -> None:
    expected = tiny_bert().model.eval()(**_inputs()).last_hidden_state
    _, model = _adapted(dropout=0.1)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).last_hidden_state, expected)


def test_step0_gradients_only_reach_scales() -> None:
    method, model = _adapted(n=3, r=4)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name in method.trainable(model))
    model(**_inputs()).last_hidden_state.pow(2).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 12
    for m in layers:
        assert torch.count_nonzero(m.multilora_A.grad) == 0
        assert torch.count_nonzero(m.multilora_B.grad) == 0
    # Each branch's scale gets a gradient (branch i's B_i A_i x differs from the others at init).
    assert all(m.multilora_s.grad.abs().sum(dim=1).min() > 0 for m in layers)


@pytest.mark.parametrize("scale", ["channel", "scalar"])
def test_vectorised_forward_matches_loop(scale: str) -> None:
    layer = _layer(scale=scale)
    with torch.no_grad():
        layer.multilora_s.normal_()
    x = torch.randn(4, 5, 10)
    out = layer(x)
    assert (out - _loop_reference(layer, x)).abs().max().item() <= 1e-6
    assert (out - layer.base(x)).abs().max().item() > 1e-2


def test_merge_unmerge_round_trip() -> None:
    method, model = _adapted(n=2, r=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiLoRALinear):
                m.multilora_s.copy_(torch.randn(m.multilora_s.shape, generator=gen))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**_inputs()).last_hidden_state
        method.merge(model)
        method.merge(model)  # merging twice must not add the update twice
        assert (model(**_inputs()).last_hidden_state - before).abs().max().item() <= 1e-5
        method.unmerge(model)
        assert (model(**_inputs()).last_hidden_state - before).abs().max().item() <= 1e-5
    for key, value in model.state_dict().items():
        assert (value - weights[key]).abs().max().item() <= 1e-6, key


def test_merged_weight_formula() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.multilora_s.normal_()
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    a, b, s, r = layer.multilora_A, layer.multilora_B, layer.multilora_s, layer.rank
    expected = w0 + layer.scale * sum(
        torch.diag(s[i]) @ b[:, i * r : (i + 1) * r] @ a[i * r : (i + 1) * r] for i in range(layer.n)
    )
    torch.testing.assert_close(layer.base.weight, expected)


def test_init_bounds_and_roles() -> None:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(400, 64), MultiLoRAConfig(n=3, r=8))
    assert layer.multilora_A.abs().max().item() <= 1 / math.sqrt(400)
    bound = 1 / math.sqrt(8)  # per branch (fan_in r_i), not 1/sqrt(n·r_i)
    assert bound * 0.95 < layer.multilora_B.abs().max().item() <= bound
    assert torch.count_nonzero(layer.multilora_s) == 0
    assert layer.adapter_params() == {
        "multilora_A": ParamRole("A"),
        "multilora_B": ParamRole("B"),
        "multilora_s": ParamRole("scale"),
    }


def test_scalar_scale_shapes() -> None:
    layer = _layer(n=4, r=2, scale="scalar")
    assert layer.multilora_s.shape == (4, 1)
    assert layer.multilora_A.shape == (8, 10) and layer.multilora_B.shape == (6, 8)
    assert _layer(n=4, r=2).multilora_s.shape == (4, 6)


def test_equal_budget_ranks_and_scale() -> None:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(10, 6), MultiLoRAConfig(n=3, r=6, alpha=12.0, equal_budget=True))
    assert layer.rank == 2 and layer.multilora_A.shape == (6, 10) and layer.multilora_B.shape == (6, 6)
    assert layer.scale == 12.0 / 6  # α over the configured r, as a LoRA of rank r
    with pytest.raises(ConfigError, match=r"method\.r=8 must be divisible by method\.n=3"):
        MultiLoRAConfig(n=3, r=8, equal_budget=True)


def test_parameter_count() -> None:
    n, r = 3, 4
    method, model = _adapted(n=n, r=r)
    roles = adapter_roles(model)
    params = dict(model.named_parameters())
    layers = {n_: m for n_, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    expected = sum(
        n * r * (m.base.in_features + m.base.out_features) + n * m.base.out_features for m in layers.values()
    )
    assert sum(params[k].numel() for k in roles) == expected
    assert sum(params[k].numel() for k in method.trainable(model)) == expected
    assert expected == 2 * (4 * (n * r * 64 + n * 32) + (n * r * (32 + 128) + n * 128) + (n * r * (128 + 32) + n * 32))


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"n": 0}, "method.n"),
        ({"r": 0}, "method.r"),
        ({"alpha": 0.0}, "method.alpha"),
        ({"dropout": 1.0}, "method.dropout"),
        ({"scale": "row"}, "method.scale"),
    ],
)
def test_bad_config(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MultiLoRAConfig(**cfg)


def test_branch_rank_exceeds_width() -> None:
    with pytest.raises(ConfigError, match=r"method\.r.*exceeds the width 32 of layer encoder\.layer\.0"):
        MultiLoRA(MultiLoRAConfig(r=33), tasks=("a",)).apply(tiny_bert().model)


@torch.no_grad()
def test_bf16_merge_rounds_once_and_unmerge_restores_every_bit() -> None:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(64, 64).to(torch.bfloat16), MultiLoRAConfig(n=3, r=4))
    layer.multilora_s.normal_(0.0, 3e-3)  # updates of ~7e-4, a few times the weights' bf16 rounding step
    assert_exact_bf16_round_trip(layer)

"""MoSLD numerics: identity at init, DropConnect only in training, top-K routing, balance loss, expert allocation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.interfaces import ParamRole, adapter_roles
from mtbench.methods.mosld import MoSLD, MoSLDConfig, MoSLDLinear, balance_loss_groups, experts_per_block


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _adapted(layers: int = 2, **cfg: object) -> tuple[MoSLD, nn.Module]:
    method = MoSLD(MoSLDConfig(**cfg), tasks=("a", "b"))
    return method, method.apply(tiny_bert(layers=layers).model).eval()


def _layer(n_experts: int = 4, top_k: int = 2, dropconnect: float = 0.0, d_in: int = 6, d_out: int = 5,
           r: int = 3, seed: int = 0) -> MoSLDLinear:
    """A stand-alone layer with random (non-zero) experts, so the branch contributes."""
    torch.manual_seed(seed)
    layer = MoSLDLinear(nn.Linear(d_in, d_out), r=r, alpha=2.0 * r, n_experts=n_experts, top_k=top_k,
                        dropconnect=dropconnect)
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
    return layer


def test_identity_at_init() -> None:
    expected = tiny_bert().model.eval()(**_inputs()).last_hidden_state
    method, model = _adapted(dropout=0.1)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).last_hidden_state, expected)


def test_targets_q_and_v_with_roles() -> None:
    _, model = _adapted()
    layers = {n for n, m in model.named_modules() if isinstance(m, MoSLDLinear)}
    assert layers == {f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    roles = adapter_roles(model)
    assert roles["encoder.layer.0.attention.self.query.mosld_B"] == ParamRole("B")
    assert roles["encoder.layer.0.attention.self.query.mosld_router"] == ParamRole("router")
    assert len(roles) == 3 * len(layers)


def test_dropconnect_only_in_training() -> None:
    layer = _layer(dropconnect=0.5)
    x = torch.randn(4, 7, 6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask each forward
    layer.dropconnect = 0.0
    assert torch.equal(layer(x), layer(x))


def test_dropconnect_mask_is_rescaled_bernoulli() -> None:
    # With one expert and top-1 routing the branch is s·B·Ã x; recover Ã from a unit input to read the mask.
    layer = MoSLDLinear(nn.Linear(64, 64), r=64, alpha=64.0, n_experts=1, top_k=1, dropconnect=0.25).train()
    with torch.no_grad():
        layer.mosld_B[0].copy_(torch.eye(64))
        layer.mosld_A.fill_(1.0)
        a_tilde = layer(torch.eye(64)) - layer.base(torch.eye(64))  # row j: Ã[:, j]
    kept = (a_tilde - 1 / 0.75).abs() < 1e-5
    assert (kept | (a_tilde == 0)).all()  # every entry is dropped (0) or kept and rescaled by 1/(1-p)
    assert abs((a_tilde == 0).float().mean().item() - 0.25) < 0.03


def test_selected_gates_sum_to_one() -> None:
    layer = _layer(n_experts=5, top_k=3)
    gates, index, probs = layer.route(torch.randn(2, 11, 6))
    assert gates.shape == index.shape == (2, 11, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 11))
    assert (gates > 0).all()
    assert (index.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts per token
    # The selected experts are the K most probable ones.
    assert torch.equal(probs.gather(-1, index), probs.topk(3, dim=-1).values)


@torch.no_grad()
def test_top_k_equal_n_is_dense_softmax_mixture() -> None:
    layer = _layer(n_experts=3, top_k=3).eval()
    x = torch.randn(2, 4, 6)
    probs = torch.softmax(x @ layer.mosld_router.T, dim=-1)  # (2, 4, 3)
    z = x @ layer.mosld_A.T
    experts = torch.einsum("nor,btr->btno", layer.mosld_B, z)
    expected = layer.base(x) + layer.scale * (probs.unsqueeze(-1) * experts).sum(-2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_top_k_matches_per_token_loop() -> None:
    layer = _layer(n_experts=6, top_k=2).eval()
    x = torch.randn(13, 6)
    expected = layer.base(x)
    for t in range(x.shape[0]):
        p = torch.softmax(layer.mosld_router @ x[t], dim=0)
        top = p.topk(2)
        z = layer.mosld_A @ x[t]
        for w, k in zip(top.values / top.values.sum(), top.indices):
            expected[t] += layer.scale * w * (layer.mosld_B[k] @ z)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_balance_loss_by_hand() -> None:
    layer = MoSLDLinear(nn.Linear(2, 2), r=1, alpha=1.0, n_experts=2, top_k=1).train()
    with torch.no_grad():
        layer.mosld_router.copy_(torch.eye(2))
    p = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]
    # Balanced: each expert wins one token and has mean probability 1/2, so N Σ f P = 2 (1/2·1/2 + 1/2·1/2) = 1.
    layer(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # Collapsed: expert 0 wins both tokens, f = (1, 0), P = (p, 1 - p): 2 · p.
    layer(torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    balanced, collapsed = (loss.item() for loss in layer.balance_losses)
    assert balanced == pytest.approx(1.0, abs=1e-6)
    assert collapsed == pytest.approx(2 * p, abs=1e-6)
    # Top-2 of 3 over one token with probabilities q: f = 1/2 for the two selected experts.
    layer3 = MoSLDLinear(nn.Linear(3, 3), r=1, alpha=1.0, n_experts=3, top_k=2).train()
    with torch.no_grad():
        layer3.mosld_router.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0.5, 0.0]])
    q = torch.softmax(x[0], dim=0)
    layer3(x)
    assert layer3.balance_losses[0].item() == pytest.approx(3 * 0.5 * (q[0] + q[1]).item(), abs=1e-6)


def test_balance_losses_grouped_across_layers_equal_each_call_by_hand() -> None:
    """Calls of different expert counts, token counts and K, interleaved, computed by group: each call's loss is
    N · Σ_k f_k P_k of that call alone, and the order of the calls is kept."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, (2, 5), 2), (2, (2, 5), 1), (4, (2, 5), 2), (4, (3, 7), 2), (8, (2, 5), 3)]
    routed = []
    for n, lead, k in shapes:
        logits = torch.randn(*lead, n, generator=gen)
        routed.append((logits, logits.topk(k, dim=-1).indices))
    got = {i: loss for members, losses in balance_loss_groups(routed) for i, loss in zip(members, losses)}
    assert sorted(got) == list(range(len(shapes)))
    for i, (logits, index) in enumerate(routed):
        n = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        f = torch.tensor([(index == e).sum().item() / index.numel() for e in range(n)])
        expected = n * (f * probs.reshape(-1, n).mean(dim=0)).sum()
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-6), i


def test_no_balance_loss_recorded_in_eval() -> None:
    layer = _layer().eval()
    layer(torch.randn(3, 6))
    assert layer.balance_losses == () and layer.routed == []


def test_experts_per_depth_follow_config() -> None:
    _, model = _adapted(layers=4, experts=(2, 4), top_k=2)
    counts = {n: m.n_experts for n, m in model.named_modules() if isinstance(m, MoSLDLinear)}
    for i, expected in enumerate((2, 2, 4, 4)):
        for proj in ("query", "value"):
            assert counts[f"encoder.layer.{i}.attention.self.{proj}"] == expected
    assert experts_per_block(32, (8, 6, 4, 2)) == [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8
    assert experts_per_block(2, (2, 4, 6, 8)) == [2, 6]  # fewer blocks than groups: by relative depth


def test_parameter_count_per_layer() -> None:
    _, model = _adapted(layers=4, experts=(2, 4), r=4)
    for m in model.modules():
        if isinstance(m, MoSLDLinear):
            d_in, d_out, n = m.base.in_features, m.base.out_features, m.n_experts
            count = sum(p.numel() for name, p in m.named_parameters() if name in m.adapter_params())
            assert count == 4 * d_in + n * d_out * 4 + n * d_in


def test_aux_loss_is_finite_with_router_gradient() -> None:
    # 4 experts everywhere: with top_k == N (2 of 2) every token picks both experts, the assignment fractions are
    # uniform and the balance loss is constant, so its router gradient would be zero by construction.
    method, model = _adapted(layers=2, experts=(4,))
    model.train()
    method.set_task(model, torch.tensor([0, 1, 0]))
    model(**_inputs())
    aux = method.aux_loss(model)
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux)
    # Four layers, each loss >= 1 (its minimum, at perfect balance): coef · Σ >= 0.004.
    assert aux.item() >= 0.001 * 4 - 1e-6
    aux.backward()
    routers = [m.mosld_router for m in model.modules() if isinstance(m, MoSLDLinear)]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    assert method.aux_loss(model) is None  # collected once, then cleared


def test_aux_loss_none_in_eval_and_stale_losses_dropped() -> None:
    method, model = _adapted()
    with torch.no_grad():
        model(**_inputs())
    assert method.aux_loss(model) is None
    model.train()
    model(**_inputs())
    method.set_task(model, None)  # the next forward starts clean, whatever the last one left behind
    assert all(not m.balance_losses for m in model.modules() if isinstance(m, MoSLDLinear))
    model(**_inputs())
    model.eval()
    assert method.aux_loss(model) is None


@pytest.mark.parametrize(
    ("cfg", "key"),
    [({"r": 0}, "method.r"), ({"top_k": 3}, "method.top_k"), ({"experts": (4, 0)}, "method.experts"),
     ({"dropconnect": 1.0}, "method.dropconnect"), ({"dropout": -0.1}, "method.dropout"),
     ({"balance_coef": -1.0}, "method.balance_coef"), ({"a_init": "xavier"}, "method.a_init")],
)
def test_config_errors_name_the_key(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MoSLDConfig(**cfg)


def test_gaussian_init_std() -> None:
    layer = MoSLDLinear(nn.Linear(512, 512), r=8, alpha=16.0, n_experts=2, top_k=1, a_init="gaussian")
    assert layer.mosld_A.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert torch.count_nonzero(layer.mosld_B) == 0


def _reference(layer: MoSLDLinear, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Eq. 3 written out: per token, only its K selected experts, ``W0 x + s Σ_k g_k B_k (Ã x)``."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ layer.mosld_router.T, dim=-1)
    top, index = probs.topk(layer.top_k, dim=-1)
    gates = top / top.sum(-1, keepdim=True)
    z = flat @ a.T  # (T, r)
    selected = layer.mosld_B[index]  # (T, K, out, r): each token's own K experts, no other
    experts = torch.einsum("tkor,tr->tko", selected, z)
    out = layer.base(flat) + layer.scale * (gates.unsqueeze(-1) * experts).sum(1)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("mixture", ["grouped", "rank"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fast_path_equals_the_per_token_reference_with_gradients(dropout: float, mixture: str) -> None:
    # Random weights everywhere, 8 experts top-3, a scale that is not a power of two, DropConnect on, a 3-D input;
    # outputs and every gradient must match the reference that touches only each token's selected experts.
    torch.manual_seed(0)
    layer = MoSLDLinear(nn.Linear(12, 12), r=4, alpha=3.0, n_experts=8, top_k=3, dropconnect=0.3,
                        dropout=dropout, mixture=mixture).train()  # type: ignore[arg-type]
    assert layer._grouped_mm_takes(torch.zeros(1, 4)) == hasattr(F, "grouped_mm")
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
        layer.mosld_router.normal_(0.0, 1.0)
    x = torch.randn(3, 5, 12, requires_grad=True)
    torch.manual_seed(7)
    fast = layer(x)
    grads = torch.autograd.grad(fast.pow(2).sum(), [x, layer.mosld_A, layer.mosld_B, layer.mosld_router])
    torch.manual_seed(7)  # the same DropConnect mask (and input dropout) as the fast path drew
    a = F.dropout(layer.mosld_A, layer.dropconnect, training=True)  # DropConnect: dropout on the weight
    inputs = layer.dropout(x)
    flat = inputs.reshape(-1, 12)
    probs = torch.softmax(x.reshape(-1, 12) @ layer.mosld_router.T, dim=-1)  # the router sees x without dropout
    top, index = probs.topk(3, dim=-1)
    selected = layer.mosld_B[index]
    experts = torch.einsum("tkor,tr->tko", selected, flat @ a.T)
    mixture = layer.scale * ((top / top.sum(-1, keepdim=True)).unsqueeze(-1) * experts).sum(1)
    reference = layer.base(x) + mixture.reshape(3, 5, 12)
    if dropout == 0.0:
        torch.testing.assert_close(reference, _reference(layer, x, a))
    expected = torch.autograd.grad(reference.pow(2).sum(), [x, layer.mosld_A, layer.mosld_B, layer.mosld_router])
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.routed.clear()


class _Products(TorchDispatchMode):
    """The operand shapes of every matrix product that runs (forward and backward)."""

    PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                torch.ops.aten._grouped_mm}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in self.PRODUCTS:
            self.calls.append((func.overloadpacket, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs torch >= 2.10")
def test_grouped_mixture_multiplies_only_the_selected_experts() -> None:
    """The grouped mixture's products are K·r deep (here 2·4 = 8): none of them spans all N·r = 24 rank columns, as
    the rank form's stacked product does, forward or backward; the grouped GEMM runs once per forward."""
    layer = MoSLDLinear(nn.Linear(16, 16), r=4, alpha=8.0, n_experts=6, top_k=2).train()
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
    x = torch.randn(4, 9, 16, requires_grad=True)
    with _Products() as grouped:
        layer(x).sum().backward()
    layer.routed.clear()
    layer.mixture = "rank"
    with _Products() as rank:
        layer(x).sum().backward()
    widths = {dim for _, shapes in grouped.calls for shape in shapes for dim in shape}
    assert 6 * 4 not in widths and 2 * 4 in widths, grouped.calls
    assert [op for op, _ in grouped.calls].count(torch.ops.aten._grouped_mm) >= 1
    assert any(6 * 4 in shape for _, shapes in rank.calls for shape in shapes)  # the check can fail


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs torch >= 2.10")
def test_grouped_mixture_under_bf16_autocast() -> None:
    """Under bfloat16 autocast (the GPU setting) the grouped GEMM runs, in bfloat16, and its output and every
    gradient agree with the rank form's to bfloat16 rounding."""
    torch.manual_seed(0)
    layer = MoSLDLinear(nn.Linear(16, 32), r=8, alpha=16.0, n_experts=4, top_k=2).train()
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(2, 7, 32)
    results = {}
    for mixture in ("grouped", "rank"):
        layer.mixture = mixture  # type: ignore[assignment]
        with _Products() as products:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            grads = torch.autograd.grad((out.float() * weight).sum(), [x, layer.mosld_A, layer.mosld_B,
                                                                        layer.mosld_router])
        layer.routed.clear()
        results[mixture] = (out, grads, products.calls)
    (grouped, grouped_grads, calls), (rank, rank_grads, _) = results["grouped"], results["rank"]
    assert [op for op, _ in calls].count(torch.ops.aten._grouped_mm) == 3  # forward, and both gradients
    assert grouped.dtype == rank.dtype == torch.bfloat16
    torch.testing.assert_close(grouped.float(), rank.float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grouped_grads, rank_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize(("n_experts", "top_k", "d_out", "dtype", "grouped"), [
    (4, 2, 32, torch.float32, True),
    (5, 5, 32, torch.float32, True),  # top-K of all experts: one set
    (1, 1, 32, torch.float32, True),  # a single expert
    (4, 2, 10, torch.float32, False),  # 40-byte output rows: the kernel needs multiples of 16 bytes
    (4, 2, 32, torch.float64, False),  # grouped_mm takes float32, bfloat16 and float16 only
    (12, 3, 32, torch.float32, False),  # 220 expert sets, above MAX_EXPERT_SETS
])
def test_grouped_mixture_where_it_runs_and_where_the_rank_form_does(n_experts: int, top_k: int, d_out: int,
                                                                     dtype: torch.dtype, grouped: bool) -> None:
    """Where the grouped GEMM can take the layer it runs, elsewhere the rank form does; the outputs and gradients are
    the rank form's either way, and an expert no token selected gets an exactly zero ``B`` gradient."""
    from mtbench.methods.mosld import MAX_EXPERT_SETS

    torch.manual_seed(0)
    layer = MoSLDLinear(nn.Linear(16, d_out), r=4, alpha=8.0, n_experts=n_experts, top_k=top_k).to(dtype).train()
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
        layer.mosld_router.zero_()
        layer.mosld_router[:, 0] = torch.arange(n_experts, dtype=dtype)  # x[..., 0] > 0: the last experts win
    assert (layer.n_sets <= MAX_EXPERT_SETS) == (len(layer.expert_sets) == layer.n_sets)
    x = torch.randn(3, 5, 16, dtype=dtype)
    x[..., 0] = x[..., 0].abs() + 1  # every token picks the top_k last experts: the others are never selected
    x.requires_grad_()
    results = {}
    for mixture in ("grouped", "rank"):
        layer.mixture = mixture  # type: ignore[assignment]
        with _Products() as products:
            out = layer(x)
            grads = torch.autograd.grad(out.pow(2).sum(), [x, layer.mosld_A, layer.mosld_B, layer.mosld_router])
        layer.routed.clear()
        results[mixture] = (out, grads, [op for op, _ in products.calls])
    ran = torch.ops.aten._grouped_mm in results["grouped"][2]
    assert ran == (grouped and hasattr(F, "grouped_mm"))
    torch.testing.assert_close(results["grouped"][0], results["rank"][0])
    for got, want in zip(results["grouped"][1], results["rank"][1], strict=True):
        torch.testing.assert_close(got, want)
    unused = results["grouped"][1][2][: n_experts - top_k]
    assert torch.count_nonzero(unused) == 0


def test_rank_form_for_empty_inputs_and_many_experts() -> None:
    """An empty input takes the rank form; a layer with far more expert sets than the grouped form serves builds no
    set tables (C(24, 8) = 735,471 sets) and computes the rank form."""
    layer = MoSLDLinear(nn.Linear(16, 32), r=8, alpha=16.0, n_experts=4, top_k=2).eval()
    assert not layer._grouped_mm_takes(torch.zeros(0, 8))
    assert layer(torch.zeros(0, 16)).shape == (0, 32)
    many = MoSLDLinear(nn.Linear(16, 32), r=4, alpha=8.0, n_experts=24, top_k=8).eval()
    assert many.n_sets == 735_471 and len(many.expert_sets) == 0 and not many._grouped_mm_takes(torch.zeros(1, 4))
    assert many(torch.randn(5, 16)).shape == (5, 32)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs torch >= 2.10")
def test_grouped_rows_go_back_by_gathers_without_a_zero_filled_buffer() -> None:
    """Both permutations of the grouped mixture (tokens to set order and back) are gathers forward and backward:
    no scatter into a zero-filled tensor (autograd's backward of row indexing) runs."""
    layer = MoSLDLinear(nn.Linear(16, 32), r=4, alpha=8.0, n_experts=4, top_k=2).train()
    x = torch.randn(10, 20, 16, requires_grad=True)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            self.calls.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor)
                               else ()))
            return out

    with Ops() as ops:
        layer(x).sum().backward()
    names = [name for name, _ in ops.calls]
    assert "_grouped_mm" in names and names.count("index_select") == 4
    # Scatters of the token rows (200 of them, K·r = 8 or 32 wide) would be the indexing backward; the gates' (K = 2
    # wide) and the expert sets' B (6 sets) are the scatters left.
    assert not [(n, shape) for n, shape in ops.calls
                if n.startswith(("index_put", "scatter")) and shape[:1] == (200,) and shape[-1] >= 8]


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs torch >= 2.10")
def test_grouped_mixture_keeps_no_output_wide_tensor_for_the_backward_pass() -> None:
    """Putting the grouped rows back in token order keeps only the permutation for the backward pass, as the rank
    form keeps nothing as wide as the output: no saved tensor has the layer's output width."""
    layer = MoSLDLinear(nn.Linear(16, 32), r=4, alpha=8.0, n_experts=4, top_k=2).train()
    x = torch.randn(10, 20, 16, requires_grad=True)  # 200 tokens: more rows than the 6 expert sets' B have
    for mixture in ("grouped", "rank"):
        layer.mixture = mixture  # type: ignore[assignment]
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            layer(x).sum().backward()
        layer.routed.clear()
        assert saved and not [s for s in saved if s and s[-1] == 32 and math.prod(s) >= 200 * 32], (mixture, saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grouped_mixture_where_admitted_matches_the_rank_form_without_host_sync() -> None:
    """On a GPU under bf16 autocast (the benchmark's setting) the grouped GEMM runs exactly where the layer admits it
    (compute capability 9.0), its forward and backward never wait for the device (torch's sync debug mode raises on
    a wait), and its output and gradients agree with the rank form's to bf16 rounding."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    layer = MoSLDLinear(nn.Linear(64, 128), r=8, alpha=16.0, n_experts=8, top_k=2).to(device).train()
    with torch.no_grad():
        layer.mosld_B.normal_(0.0, 0.5)
    x = torch.randn(4, 64, 64, device=device, requires_grad=True)
    params = [x, layer.mosld_A, layer.mosld_B, layer.mosld_router]
    admitted = hasattr(F, "grouped_mm") and torch.cuda.get_device_capability(device) == (9, 0)
    results = {}
    for mixture in ("grouped", "rank"):
        layer.mixture = mixture  # type: ignore[assignment]
        for timed in (False, True):  # a warm-up first: one-time set-up may wait for the device
            torch.cuda.synchronize()
            with _Products() as products:
                torch.cuda.set_sync_debug_mode("error" if timed else 0)
                try:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = layer(x)
                    grads = torch.autograd.grad(out.float().sum(), params)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            layer.routed.clear()
        results[mixture] = (out, grads, [op for op, _ in products.calls])
    assert (torch.ops.aten._grouped_mm in results["grouped"][2]) == admitted
    torch.testing.assert_close(results["grouped"][0].float(), results["rank"][0].float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(results["grouped"][1], results["rank"][1], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())

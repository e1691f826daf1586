"""MTLoRA numerics: §7.3 layer semantics, identity at init, mixed-batch routing, parameter counts, MTLoRA+ on Swin."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _merge_checks import assert_exact_bf16_round_trip
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.interfaces import ParamRole, TaskRouting, adapter_roles
from mtbench.methods.mtlora import MTLoRA, MTLoRAConfig, MTLoRALinear


TASKS = ("a", "b")


def _inputs(n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (n, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _adapted(**cfg: object) -> tuple[MTLoRA, nn.Module]:
    method = MTLoRA(MTLoRAConfig(**cfg), tasks=TASKS)
    return method, method.apply(tiny_bert().model).eval()


def _randomise(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero shared and task factors, so every branch contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mtlora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@torch.no_grad()
def _hidden(method: MTLoRA | None, model: nn.Module, ids: torch.Tensor | str | None, n: int = 4) -> torch.Tensor:
    if method is not None:
        method.set_task(model, ids)
    return model(**_inputs(n)).last_hidden_state


def _layer(tasks: tuple[str, ...] = TASKS, dropout: float = 0.0, seed: int = 0) -> MTLoRALinear:
    torch.manual_seed(seed)
    layer = MTLoRALinear(nn.Linear(6, 5), r=3, scale=4.0, dropout=dropout, tasks=tasks, task_r=2)
    _randomise(layer, seed)
    return layer


class _Calls(TorchDispatchMode):
    """Within the block, every ATen operation that runs, forward and backward, as ``(operation, shape of its first
    argument, shape of its output)``; a shape is ``None`` where that is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple[int, ...] | None, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        first = args[0] if args else None
        self.calls.append((func.overloadpacket, *(tuple(t.shape) if isinstance(t, torch.Tensor) else None
                                                  for t in (first, out))))
        return out

    def of(self, op: object) -> list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
        """(first argument's shape, output's shape) of every call of ``op``."""
        return [(first, out) for called, first, out in self.calls if called is op]


# Layer level (methods.md §7.3) ---------------------------------------------------------------------------------------


def test_layer_shared_and_task_outputs() -> None:
    layer = _layer()
    x, w0, b, s = torch.randn(7, 6), layer.base.weight, layer.base.bias, layer.scale
    y, outs = layer.forward_tasks(x)
    pre = x @ w0.T + b
    assert torch.allclose(y, pre + s * x @ layer.mtlora_shared_A.T @ layer.mtlora_shared_B.T, atol=1e-6)
    assert torch.allclose(layer(x), y)
    for t in TASKS:  # the task output excludes the shared LoRA term ('matrix' mode)
        expected = pre + s * x @ layer.mtlora_tasks_A[t].T @ layer.mtlora_tasks_B[t].T
        assert torch.allclose(outs[t], expected, atol=1e-6)
    assert not torch.allclose(outs["a"], outs["b"])


def test_mixed_batch_scale_is_not_rounded_to_bf16() -> None:
    """Under bf16 autocast the task branch of a mixed batch scales by s itself: 1.3 (bf16 rounds it to 1.296875,
    which the branch would carry on every row if the scale were folded into the bf16 row mask)."""
    torch.manual_seed(0)
    layer = MTLoRALinear(nn.Linear(64, 64), r=4, scale=1.3, tasks=TASKS, task_r=4)
    _randomise(layer, std=1.0)
    u, ids = torch.randn(512, 64), torch.arange(512) % 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scaled = layer._mixed_task_delta(u, ids).float()
        layer.scale = 1.0
        unit = layer._mixed_task_delta(u, ids).float()
    assert float((scaled * unit).sum() / (unit * unit).sum()) == pytest.approx(1.3, abs=1e-3)


def test_proj_call_is_a_merged_linear_but_fc1_call_is_not() -> None:
    """methods.md §10.3: TS ``proj`` (no task input) = per-task merged ``W0 + s B_t A_t``; ``fc1`` (task input) ≠."""
    layer = _layer()
    x, x_t = torch.randn(7, 6), torch.randn(7, 6)
    merged = {t: layer.base.weight + layer.scale * layer.mtlora_tasks_B[t] @ layer.mtlora_tasks_A[t] for t in TASKS}
    _, proj = layer.forward_tasks(x)
    _, fc1 = layer.forward_tasks(x, {t: x_t for t in TASKS})
    for t in TASKS:
        assert torch.allclose(proj[t], F.linear(x, merged[t], layer.base.bias), atol=1e-5)
        assert not torch.allclose(fc1[t], F.linear(x_t, merged[t], layer.base.bias), atol=1e-3)
        assert not torch.allclose(fc1[t], F.linear(x, merged[t], layer.base.bias), atol=1e-3)
        # W0 on the shared input, the task correction on the task input.
        low = layer.scale * x_t @ layer.mtlora_tasks_A[t].T @ layer.mtlora_tasks_B[t].T
        assert torch.allclose(fc1[t], layer.base(x) + low, atol=1e-5)


def test_no_dropout_on_task_inputs() -> None:
    layer = _layer(dropout=0.9).train()
    x, x_tasks = torch.randn(16, 6), {t: torch.randn(16, 6) for t in TASKS}
    y1, t1 = layer.forward_tasks(x, x_tasks)
    y2, t2 = layer.forward_tasks(x, x_tasks)
    assert not torch.allclose(y1, y2)  # the shared path is dropped out
    for t in TASKS:
        assert torch.equal(t1[t], t2[t])


def test_layer_without_tasks_and_roles() -> None:
    layer = _layer(tasks=())
    assert layer.forward_tasks(torch.randn(2, 6))[1] == {}
    assert _layer().adapter_params() == {
        "mtlora_shared_A": ParamRole("A"), "mtlora_shared_B": ParamRole("B"),
        "mtlora_tasks_A.a": ParamRole("A", task="a"), "mtlora_tasks_B.a": ParamRole("B", task="a"),
        "mtlora_tasks_A.b": ParamRole("A", task="b"), "mtlora_tasks_B.b": ParamRole("B", task="b"),
    }


# Whole model, mixed-batch mode ---------------------------------------------------------------------------------------


def test_identity_at_init_for_every_task_stream() -> None:
    expected = _hidden(None, tiny_bert().model.eval(), None)
    method, model = _adapted()
    for ids in (None, "a", "b", torch.tensor([0, 1, 1, 0])):
        assert torch.allclose(_hidden(method, model, ids), expected, atol=1e-6)


def test_mixed_batch_rows_take_their_own_task_stream() -> None:
    method, model = _adapted()
    _randomise(model)
    mixed = _hidden(method, model, torch.tensor([0, 1, 1, 0], dtype=torch.int32))
    all_a, all_b = _hidden(method, model, "a"), _hidden(method, model, torch.tensor([1, 1, 1, 1]))
    for i, task in enumerate([0, 1, 1, 0]):
        assert torch.allclose(mixed[i], (all_a if task == 0 else all_b)[i], atol=1e-6)
        assert not torch.allclose(mixed[i], (all_b if task == 0 else all_a)[i], atol=1e-4)
    # Without task ids the model returns the shared stream, which is neither task's.
    assert not torch.allclose(_hidden(method, model, None), all_a, atol=1e-4)


def test_last_block_output_is_the_task_stream_of_section_7_4() -> None:
    """Recompute the last BERT block by hand from §7.4 and compare with the two-stream forward."""
    method, model = _adapted()
    _randomise(model)
    block = model.encoder.layer[-1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    out = _hidden(method, model, "b")
    handle.remove()
    # The hook sees the block's arguments after MTLoRA's pre-hook doubled them: shared rows first.
    (x, mask, *_), att = (a[:4] if a is not None else a for a in captured["args"]), block.attention
    method.set_task(model, None)  # the attention core is shared; run it with the hooks inactive
    with torch.no_grad():
        ctx = att.self(x, mask)[0]
        proj, fc1, fc2 = att.output.dense, block.intermediate.dense, block.output.dense
        a_sh = att.output.LayerNorm(proj(ctx) + x)
        a_t = att.output.LayerNorm(proj.forward_tasks(ctx)[1]["b"] + x)
        h_t = fc1.forward_tasks(a_sh, {"b": a_t})[1]["b"]
        g = block.intermediate.intermediate_act_fn(fc1(a_sh))
        m_t = fc2.forward_tasks(g, {"b": block.intermediate.intermediate_act_fn(h_t)})[1]["b"]
        f_t = block.output.LayerNorm(m_t + a_t)
    assert torch.allclose(out, f_t, atol=1e-5)


def test_last_block_gradients_are_those_of_section_7_4() -> None:
    """The gradients of the last block's factors and of its input on a mixed batch, against the same hand computation
    of §7.4 as above with both streams written out: the task rows' path, and no gradient for the factors whose only
    use, the shared rows of the block's output, is discarded (fc2's shared update)."""
    method, model = _adapted()
    _randomise(model, std=0.1)
    block = model.encoder.layer[-1]
    ids = torch.tensor([0, 1, 1, 0])
    captured = {}

    def keep_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # A leaf in place of the block's (doubled) input, so both computations start from the same tensor.
        x = captured["x"] = args[0][: args[0].shape[0] // 2].detach().requires_grad_()
        captured["mask"] = args[1][: x.shape[0]]
        return (torch.cat([x, x]), *args[1:])

    handle = block.register_forward_pre_hook(keep_input)
    method.set_task(model, ids)
    out = model(**_inputs()).last_hidden_state
    handle.remove()
    factors = {n: p for n, p in block.named_parameters() if "mtlora_" in n}
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    x = captured["x"]
    fast = torch.autograd.grad(out, [x, *factors.values()], cotangent, allow_unused=True)

    method.set_task(model, None)
    att, fc1, fc2 = block.attention, block.intermediate.dense, block.output.dense
    proj, act = att.output.dense, block.intermediate.intermediate_act_fn
    mask = captured["mask"]
    rows = []
    for i, task in enumerate(ids.tolist()):  # example by example, each with its own task's stream
        name, xi = TASKS[task], x[i:i + 1]
        ctx = att.self(xi, mask[i:i + 1])[0]
        a_sh = att.output.LayerNorm(proj(ctx) + xi)
        a_t = att.output.LayerNorm(proj.forward_tasks(ctx)[1][name] + xi)
        h_t = act(fc1.forward_tasks(a_sh, {name: a_t})[1][name])
        m_t = fc2.forward_tasks(act(fc1(a_sh)), {name: h_t})[1][name]
        rows.append(block.output.LayerNorm(m_t + a_t))
    reference = torch.autograd.grad(torch.cat(rows), [x, *factors.values()], cotangent, allow_unused=True)
    for name, got, want in zip(["input", *factors], fast, reference, strict=True):
        if want is None or name.startswith("output.dense.mtlora_shared"):
            assert want is None and got is None, name
        else:
            assert got is not None, name
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("task_targets", [("proj", "fc1", "fc2"), ("proj", "fc1"), ("fc1", "fc2")])
def test_mixed_batch_closing_module_runs_on_the_task_rows(task_targets: tuple[str, ...]) -> None:
    """The shared rows of the last block's output are discarded, so BERT's ``output`` module (fc2, dropout,
    ``LayerNorm(h + input)``) runs on the task rows only, with or without TS-LoRA in it (and with or without it on
    ``proj``, where the streams begin); each row still gets its own task's stream."""
    method, model = _adapted(task_targets=task_targets)
    _randomise(model)
    closing = model.encoder.layer[-1].output
    rows: list[int] = []
    handle = closing.LayerNorm.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    mixed = _hidden(method, model, torch.tensor([0, 1, 1, 0]))
    assert rows == [4]
    # The same rows as the closing module run on both streams (and fc1 keeps the task rows' hidden activation), its
    # shared rows discarded after the block.
    closing_hooks = [*closing._forward_pre_hooks.items()], [*closing._forward_hooks.items()]
    closing._forward_pre_hooks.clear()
    closing._forward_hooks.clear()
    fc1 = model.encoder.layer[-1].intermediate.dense
    hand_to, fc1.hand_to = fc1.hand_to, None
    assert torch.allclose(_hidden(method, model, torch.tensor([0, 1, 1, 0])), mixed, atol=1e-6) and rows == [4, 8]
    closing._forward_pre_hooks.update(closing_hooks[0])
    closing._forward_hooks.update(closing_hooks[1])
    fc1.hand_to = hand_to
    handle.remove()
    alone = {0: _hidden(method, model, "a"), 1: _hidden(method, model, "b")}
    for i, task in enumerate([0, 1, 1, 0]):
        assert torch.allclose(mixed[i], alone[task][i], atol=1e-6)
        assert not torch.allclose(mixed[i], alone[1 - task][i], atol=1e-4)
    assert not closing.dense.streams_only  # reset after the call


@pytest.mark.parametrize("autocast", [False, True])
def test_mixed_batch_mlp_keeps_no_task_hidden_activation(autocast: bool) -> None:
    """On a mixed batch the last block's fc1 hands the task rows to the closing fc2, which computes their hidden
    activation block by block (``_StreamHidden``): no tensor as wide as the hidden layer holds both streams, and the
    outputs and every gradient are those of the layer-by-layer path (fp32, and bf16 autocast)."""
    method, model = _adapted()
    _randomise(model, std=0.1)
    block = model.encoder.layer[-1]
    fc1, hidden = block.intermediate.dense, block.intermediate.dense.base.out_features
    assert fc1.hand_to is not None and fc1.hand_to[0] is block.output.dense and fc1.hand_to[1] == "none"
    ids = torch.tensor([0, 1, 1, 0])
    cotangent = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(2))

    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], _Calls]:
        pair, fc1.hand_to = fc1.hand_to, (fc1.hand_to if fused else None)
        model.zero_grad(set_to_none=True)
        method.set_task(model, ids)
        with _Calls() as calls, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**_inputs()).last_hidden_state
            out.float().backward(cotangent)
        fc1.hand_to = pair
        return out.float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls

    fused, fused_grads, calls = run(True)
    plain, plain_grads, plain_calls = run(False)
    def activations(recorded: _Calls) -> list[tuple[int, ...]]:  # (rows, tokens, hidden), arguments and results
        return [shape for _, first, out in recorded.calls for shape in (first, out)
                if shape and len(shape) == 3 and shape[1:] == (9, hidden)]

    assert activations(calls) and all(shape[0] == 4 for shape in activations(calls))  # the shared rows only
    assert (8, 9, hidden) in activations(plain_calls)  # layer by layer: both streams
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        if not autocast:
            return torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        # bf16: the two paths round at different places; compare as a whole, relative to the size of the values.
        return bool((got - want).norm() <= 2e-2 * want.norm() + 1e-6)

    assert close(fused, plain)
    for name, grad in plain_grads.items():
        got = fused_grads[name]
        assert (got is None) == (grad is None), name
        assert grad is None or close(got, grad), name


def test_mixed_batch_attention_weights_have_one_map_per_example() -> None:
    """``output_attentions``: the last block's (shared) attention map comes back once per example, as every other
    block's, not repeated for the task rows."""
    backbone = tiny_bert().model
    backbone.config._attn_implementation = "eager"  # the attention weights are returned by the eager kernel
    method = MTLoRA(MTLoRAConfig(), tasks=TASKS)
    model = method.apply(backbone).eval()
    method.set_task(model, torch.tensor([0, 1, 1, 0]))
    with torch.no_grad():
        out = model(**_inputs(), output_attentions=True)
    assert [tuple(a.shape) for a in out.attentions] == [(4, 2, 9, 9)] * 2
    method.set_task(model, None)
    with torch.no_grad():
        shared = model(**_inputs(), output_attentions=True).attentions[-1]
    assert torch.allclose(out.attentions[-1], shared)  # the shared stream's map (§7.4)


def test_one_method_serves_two_models_on_mixed_batches() -> None:
    """The two-stream hooks of each model act on that model's own layers."""
    method = MTLoRA(MTLoRAConfig(), tasks=TASKS)
    models = [method.apply(tiny_bert(seed=seed).model).eval() for seed in (0, 1)]
    for seed, model in enumerate(models):
        _randomise(model, seed)
    ids = torch.tensor([0, 1, 1, 0])
    mixed = [_hidden(method, model, ids) for model in models]
    for model, out in zip(models, mixed, strict=True):
        alone = {0: _hidden(method, model, "a"), 1: _hidden(method, model, "b")}
        for i, task in enumerate(ids.tolist()):
            assert torch.allclose(out[i], alone[task][i], atol=1e-6)


def test_closing_module_and_gelu_form_per_family() -> None:
    """The module that ends a block adding its own residual exists in BERT only; the GELU forms the hand-over from fc1
    to fc2 reproduces exactly, and nothing else."""
    from mtbench.backbones import blocks, closing_module, gelu_form, swin_micro, tiny_llama

    bert, llama, swin = tiny_bert().model, tiny_llama().model, swin_micro()
    assert closing_module(bert, blocks(bert)[-1]) == f"{blocks(bert)[-1]}.output"
    assert closing_module(llama, blocks(llama)[-1]) is None and closing_module(swin, blocks(swin)[-1]) is None
    assert gelu_form(bert.encoder.layer[-1].intermediate.intermediate_act_fn) == "none"
    assert gelu_form(nn.GELU()) == "none" and gelu_form(nn.GELU(approximate="tanh")) == "tanh"
    assert gelu_form(nn.ReLU()) is None and gelu_form(llama.model.layers[-1].mlp.act_fn) is None


def test_stacked_forward_without_task_ids_is_refused() -> None:
    """Stacked rows with neither per-row ids nor per-stream tasks cannot be routed: one clear error."""
    routing = TaskRouting(TASKS)
    layer = MTLoRALinear(nn.Linear(6, 5), r=3, scale=4.0, tasks=TASKS, task_r=2, routing=routing)
    with routing.stack(None, 1), pytest.raises(RuntimeError, match="stacked-stream forward without task ids"):
        layer(torch.randn(4, 6))


def test_mixed_forward_is_vectorised() -> None:
    """The per-row task update is one masked rank-(T·task_r) product, identical to the per-row reference."""
    layer = _layer(tasks=("a", "b", "c"))
    u, ids = torch.randn(5, 3, 6), torch.tensor([2, 0, 1, 1, 2])
    ref = torch.stack([layer.scale * u[i] @ layer.mtlora_tasks_A["abc"[k]].T @ layer.mtlora_tasks_B["abc"[k]].T
                       for i, k in enumerate(ids.tolist())])
    assert torch.allclose(layer._mixed_task_delta(u, ids), ref, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_stacked_sums_equal_sums_then_concatenation(k: int) -> None:
    """The stacked rows of a TS layer (``_StackedSums``) are ``cat([pre + shared, pre + stream_t ...])``, with the
    same gradients, a second-order gradient (float64 gradcheck), and empty inputs."""
    from torch.autograd import gradcheck

    from mtbench.methods.mtlora import _StackedSums

    gen = torch.Generator().manual_seed(0)
    pre, shared = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    streams = torch.randn(2 * k, 3, 4, generator=gen)
    leaves = [t.double().requires_grad_() for t in (pre, shared, streams)]
    out = _StackedSums.apply(*leaves, k)
    ref = torch.cat([leaves[0] + leaves[1], (leaves[2].view(k, 2, 3, 4) + leaves[0]).view(2 * k, 3, 4)])
    assert torch.equal(out, ref)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads, ref_grads = (torch.autograd.grad((t * weight).sum(), leaves) for t in (out, ref))
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r)
    assert gradcheck(lambda *t: _StackedSums.apply(*t, k), leaves)
    assert torch.autograd.gradgradcheck(lambda *t: _StackedSums.apply(*t, k), leaves)
    empty = [torch.zeros(0, 4, requires_grad=True) for _ in range(3)]
    out = _StackedSums.apply(*empty, k)
    assert out.shape == (0, 4)
    assert all(g.shape == (0, 4) for g in torch.autograd.grad(out.sum(), empty))


def test_mixed_batch_layer_writes_its_stacked_rows_once() -> None:
    """On a mixed batch a TS layer writes the shared and task sums into the stacked rows directly: no concatenation
    pass over its (here hidden-width) output, forward or backward, and the outputs of :meth:`forward_tasks`."""
    routing = TaskRouting(TASKS)
    torch.manual_seed(0)
    layer = MTLoRALinear(nn.Linear(6, 24), r=3, scale=4.0, tasks=TASKS, task_r=2, routing=routing)
    _randomise(layer)
    x, ids = torch.randn(4, 5, 6, requires_grad=True), torch.tensor([1, 0, 0, 1])
    u = torch.randn(4, 5, 6)
    stacked = torch.cat([x, u])
    with routing.stack(ids, 1), _Calls() as calls:
        out = layer(stacked)
        out.sum().backward()
    cats = [shape for _, shape in calls.of(torch.ops.aten.cat)]
    y, per_task = layer.forward_tasks(x.detach(), {t: u for t in TASKS})
    assert torch.allclose(out[:4], y, atol=1e-5)
    for i, task_id in enumerate(ids.tolist()):
        assert torch.allclose(out[4 + i], per_task[TASKS[task_id]][i], atol=1e-5)
    assert [s for s in cats if s[-1] == 24] == [], cats


def test_training_step_reaches_only_the_routed_tasks() -> None:
    method, model = _adapted()
    model.train()
    method.set_task(model, "a")
    model(**_inputs()).last_hidden_state.square().mean().backward()
    fc2 = model.encoder.layer[-1].output.dense
    assert fc2.base.weight.grad is None
    # B = 0 at init, so A gets no gradient yet; B of the routed task does, the other task's B gets exactly zero.
    assert fc2.mtlora_tasks_B["a"].grad.abs().sum() > 0
    assert fc2.mtlora_tasks_B["b"].grad.abs().sum() == 0


# Placement, counting, merging, config --------------------------------------------------------------------------------


def test_placement_and_parameter_count() -> None:
    method, model = _adapted(r=8, task_r=4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MTLoRALinear)}
    assert len(layers) == 2 * 6
    ts = sorted(n for n, m in layers.items() if m.tasks)
    assert ts == ["encoder.layer.1.attention.output.dense", "encoder.layer.1.intermediate.dense",
                  "encoder.layer.1.output.dense"]
    assert not layers["encoder.layer.1.attention.output.dense"].task_input
    assert method.task_layers(model) == [[ts[0], ts[1], ts[2]]]
    # hidden 32, intermediate 128: per block q, k, v, proj (32→32), fc1 (32→128), fc2 (128→32).
    shared = 2 * 8 * (4 * (32 + 32) + (32 + 128) + (128 + 32))
    task = len(TASKS) * 4 * ((32 + 32) + (32 + 128) + (128 + 32))
    counted = sum(p.numel() for n, p in model.named_parameters() if n in adapter_roles(model))
    assert counted == shared + task == 12288
    assert method.trainable(model) == set(adapter_roles(model))


def test_task_blocks_and_targets() -> None:
    method, model = _adapted(task_blocks=2, task_targets=("fc2",))
    assert method.task_layers(model) == [["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]]
    _, model = _adapted(task_targets=())
    assert not any(m.tasks for m in model.modules() if isinstance(m, MTLoRALinear))


def test_merge_shared_keeps_outputs() -> None:
    method, model = _adapted()
    _randomise(model, std=0.05)
    ids = torch.tensor([0, 1, 1, 0])
    before, weights = _hidden(method, model, ids), {k: v.clone() for k, v in model.state_dict().items()}
    method.merge_shared(model)
    assert torch.allclose(_hidden(method, model, ids), before, atol=1e-5)
    method.unmerge_shared(model)
    assert all(torch.allclose(v, weights[k], atol=1e-6) for k, v in model.state_dict().items())
    with pytest.raises(NotImplementedError):
        method.merge(model)


@pytest.mark.parametrize(
    ("key", "value"),
    [("r", 0), ("task_r", -1), ("scale", 0.0), ("dropout", 1.0), ("task_blocks", 0), ("task_targets", ("qkv",))],
)
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"method.{key}"):
        MTLoRAConfig(**{key: value})


def test_apply_errors() -> None:
    with pytest.raises(ConfigError, match="method.task_targets"):
        _adapted(target_modules=("qkv", "fc1"), task_targets=("proj",))
    with pytest.raises(ConfigError, match="method.task_targets"):
        _adapted(task_targets=("no_such_layer",))
    with pytest.raises(ConfigError, match="method.plus"):
        _adapted(plus=True)


# Swin (timm): stages, MTLoRA+ ----------------------------------------------------------------------------------------


def _swin() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2),
        img_size=64, window_size=4, num_classes=0,
    ).eval()


def test_swin_stages_plus_and_mixed_batch() -> None:
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _swin()(images)
    method = MTLoRA(dataclasses.replace(MTLoRAConfig(r=4), plus=True), tasks=TASKS)
    model = method.apply(_swin())
    layers = method.task_layers(model)
    assert [len(stage) for stage in layers] == [3, 3, 3, 3]
    assert layers[3] == ["layers.3.blocks.1.attn.proj", "layers.3.blocks.1.mlp.fc1", "layers.3.blocks.1.mlp.fc2"]
    reductions = [n for n, m in model.named_modules() if isinstance(m, MTLoRALinear) and "downsample" in n]
    assert reductions == [f"layers.{i}.downsample.reduction" for i in (1, 2, 3)]
    roles = adapter_roles(model)
    for name in reductions:
        assert not model.get_submodule(name).base.weight.requires_grad
        assert f"{name}.base.weight" not in method.trainable(model)
        assert roles[f"{name}.mtlora_shared_A"] == ParamRole("A")
    ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        method.set_task(model, ids)
        assert torch.allclose(model(images), expected, atol=1e-5)
        _randomise(model)
        mixed = model(images)
        method.set_task(model, "a")
        all_a = model(images)
    assert torch.allclose(mixed[1], all_a[1], atol=1e-5)
    assert not torch.allclose(mixed[0], all_a[0], atol=1e-4)


# Swin all-tasks fast path against a per-task reference (methods.md §7.3-7.4) -----------------------------------------


SWIN_TASKS = ("semseg", "sal", "normals")  # not in sorted order: routing order must never be confused with key order


def _swin_shifted(head_dim: int | None = None) -> nn.Module:
    """Two blocks per stage, so the last block of stages 1-2 uses shifted windows (shift 2 at 16² and 8²).
    ``head_dim=16`` makes the heads narrower than the block in stages 3-4 (heads x 16 = 32 and 64 channels)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
        img_size=64, window_size=4, num_classes=0, head_dim=head_dim,
    ).eval()


def _reference_task_block(block: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    """One task's stream through a TS block, layer by layer (§7.4), sharing no code with the fast path.

    ``proj`` has no task input, so its task output is a merged linear ``W0 + s·B_t A_t`` (eval: no dropout, §7.12);
    ``fc1``/``fc2`` take the frozen matmul on the shared activations and the task correction on the task stream.
    """
    proj = block.attn.proj
    b, h, w, c = x.shape
    a_sh = x + block._attn(block.norm1(x))
    a_t = a_sh  # without task LoRA on proj the task stream starts as the shared one
    if proj.tasks:
        merged = nn.Linear(proj.base.in_features, proj.base.out_features)
        del merged.weight, merged.bias
        merged.weight = proj.base.weight + proj.scale * proj.mtlora_tasks_B[task] @ proj.mtlora_tasks_A[task]
        merged.bias = proj.base.bias
        block.attn.proj = merged
        try:
            a_t = x + block._attn(block.norm1(x))
        finally:
            block.attn.proj = proj
    u, u_t = block.norm2(a_sh).reshape(b, -1, c), block.norm2(a_t).reshape(b, -1, c)
    fc1, fc2, act = block.mlp.fc1, block.mlp.fc2, block.mlp.act
    # A layer without task LoRA is the shared layer, applied to the task stream's own rows.
    h_t = fc1.forward_tasks(u, {task: u_t})[1][task] if fc1.tasks else fc1(u_t)
    g = act(fc1(u))
    m_t = fc2.forward_tasks(g, {task: act(h_t)})[1][task] if fc2.tasks else fc2(act(h_t))
    return a_t + m_t.view(b, h, w, c)


def _reference_features(model: nn.Module, images: torch.Tensor, tasks: tuple[str, ...]) -> dict[str, list]:
    layers = list(model.layers)
    x = layers[0].downsample(model.patch_embed(images))
    out: dict[str, list] = {t: [] for t in tasks}
    for i, stage in enumerate(layers):
        for block in stage.blocks[:-1]:
            x = block(x)
        last = stage.blocks[-1]
        merge = layers[i + 1].downsample if i + 1 < len(layers) else nn.Identity()
        for task in tasks:
            out[task].append(merge(_reference_task_block(last, x, task)).permute(0, 3, 1, 2))
        x = merge(last(x))
    return out


@pytest.mark.parametrize(("targets", "head_dim"), [(("proj", "fc1", "fc2"), None), (("fc1",), None),
                                                   (("proj", "fc2"), None), (("proj", "fc1", "fc2"), 16)])
def test_swin_all_tasks_fast_path_matches_per_task_reference(targets: tuple[str, ...], head_dim: int | None) -> None:
    """Features and gradients of the stacked-stream forward (attention once, per-stream products, the fused stream
    MLP where fc1 and fc2 both have task LoRA) equal the per-task reference, for shifted and unshifted blocks, with
    streams requested in an order unlike the method's, with task LoRA on some layers only, and with heads narrower
    than the block (``proj`` then stays inside timm's attention)."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2, task_targets=targets), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted(head_dim))
    _randomise(model, std=0.05)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tasks = ("normals", "semseg")  # a subset, out of the method's order
    factors = [p for n, p in model.named_parameters() if "mtlora_" in n]

    def run(features: dict[str, list]) -> tuple[dict[str, list], list]:
        loss = sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for fs in features.values() for f in fs)
        return features, torch.autograd.grad(loss, factors, allow_unused=True)

    fast, fast_grads = run(swin_stage_features(model, images, tasks=tasks))
    ref, ref_grads = run(_reference_features(model, images, tasks))
    for task in tasks:
        for f, g in zip(fast[task], ref[task], strict=True):
            assert torch.allclose(f, g, rtol=1e-4, atol=1e-4), task
    assert not torch.allclose(fast["normals"][0], fast["semseg"][0], atol=1e-3)
    for (name, _), gf, gr in zip([(n, p) for n, p in model.named_parameters() if "mtlora_" in n], fast_grads,
                                 ref_grads, strict=True):
        if gr is None:  # a factor the reference never uses (the absent task, the unused shared B of stage 4)
            assert gf is None or not gf.any(), name
        else:
            assert gf is not None and torch.allclose(gf, gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item()), name


def _projections(model: nn.Module, tasks: tuple[str, ...], bias: bool = False,
                 widths: tuple[int, ...] = (3, 5, 7, 9)) -> dict[str, list[nn.Conv2d]]:
    """Per task, 1×1 convolutions from each stage's map to a narrower width (a decoder's downsamplers)."""
    from mtbench.backbones import swin_feature_channels

    torch.manual_seed(3)
    return {t: [nn.Conv2d(c, w, 1, bias=bias) for c, w in zip(swin_feature_channels(model), widths)]
            for t in tasks}


@pytest.mark.parametrize("bias", [False, True])
def test_swin_projected_streams_match_reference(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    """With ``project`` each task stream's merge and its 1×1 convolution run as one product (the reduction times the
    convolution): maps and the gradients of every factor, reduction, norm and convolution equal the per-task
    reference followed by the convolution, and the fused path really ran (stages 1-3)."""
    from mtbench import backbones

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted())
    _randomise(model, std=0.05)
    tasks = ("normals", "semseg")
    project = _projections(model, tasks, bias)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in model.named_parameters() if "mtlora_" in n or "downsample" in n]
    params += [p for convs in project.values() for conv in convs for p in conv.parameters()]
    calls = []
    fused = backbones._merge_and_project
    monkeypatch.setattr(backbones, "_merge_and_project", lambda *a: calls.append(1) or fused(*a))

    def run(maps: dict[str, list]) -> tuple[dict[str, list], tuple]:
        loss = sum((m * torch.linspace(-1, 1, m.numel()).view_as(m)).sum() for ms in maps.values() for m in ms)
        return maps, torch.autograd.grad(loss, params, allow_unused=True)

    fast, fast_grads = run(backbones.swin_stage_features(model, images, tasks=tasks, project=project))
    assert len(calls) == 3
    ref_features = _reference_features(model, images, tasks)
    ref, ref_grads = run({t: [conv(f) for conv, f in zip(project[t], ref_features[t])] for t in tasks})
    for task in tasks:
        for f, g in zip(fast[task], ref[task], strict=True):
            assert f.shape == g.shape
            assert torch.allclose(f, g, rtol=1e-4, atol=1e-5), task
    for gf, gr in zip(fast_grads, ref_grads, strict=True):
        if gr is None:
            assert gf is None or not gf.any()
        else:
            assert gf is not None and torch.allclose(gf, gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item())


def test_swin_projected_streams_plain_path_where_not_fusable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolution with a hook of its own keeps its stage on the plain path (merge, then convolution), where the
    hook sees its map, as do a convolution with a forward of its own and a stage with too few rows for the product
    to pay, and an adapted reduction (MTLoRA+) keeps every stage there; the maps are the same either way."""
    from mtbench import backbones

    calls = []
    fused = backbones._merge_and_project
    monkeypatch.setattr(backbones, "_merge_and_project", lambda *a: calls.append(1) or fused(*a))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted())
    _randomise(model, std=0.05)
    project = _projections(model, SWIN_TASKS)
    with torch.no_grad():
        fused_maps = backbones.swin_stage_features(model, images, tasks=SWIN_TASKS, project=project)
        assert len(calls) == 3
        seen = []
        hook = project["sal"][0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
        plain = backbones.swin_stage_features(model, images, tasks=SWIN_TASKS, project=project)
        hook.remove()
    assert len(calls) == 5 and seen == [fused_maps["sal"][0].shape]  # the hooked conv's stage alone is plain
    for task in SWIN_TASKS:
        for f, g in zip(fused_maps[task], plain[task], strict=True):
            assert torch.allclose(f, g, rtol=1e-4, atol=1e-5)
    # A forward installed on the instance (as offloading wrappers do) is honoured: that stage runs plain.
    conv = project["sal"][1]
    conv.forward = lambda x, conv=conv: nn.Conv2d.forward(conv, x) + 1
    with torch.no_grad():
        shifted = backbones.swin_stage_features(model, images, tasks=SWIN_TASKS, project=project)
    del conv.forward
    assert len(calls) == 5 + 2
    assert torch.allclose(shifted["sal"][1], plain["sal"][1] + 1, atol=1e-5)
    # Stage 3 merges 2 × 2 × 2 = 8 rows per stream: forming the 16 × 128 × 256 product would cost more than the
    # plain reduction saves (a width of 7, as above, costs less).
    wide = _projections(model, SWIN_TASKS, widths=(3, 5, 16, 9))
    with torch.no_grad():
        backbones.swin_stage_features(model, images, tasks=SWIN_TASKS, project=wide)
    assert len(calls) == 9
    plus = MTLoRA(dataclasses.replace(MTLoRAConfig(r=4, task_r=2), plus=True), tasks=SWIN_TASKS)
    model = plus.apply(_swin_shifted())
    with torch.no_grad():
        backbones.swin_stage_features(model, images, tasks=SWIN_TASKS, project=_projections(model, SWIN_TASKS))
    assert len(calls) == 9


def test_swin_projected_streams_bf16_autocast() -> None:
    """Under bf16 autocast the fused product (formed in the weights' dtype, rounded once) stays as close to the
    fp32 maps as the plain path's two bf16 products do."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted())
    _randomise(model, std=0.05)
    project = _projections(model, SWIN_TASKS)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = swin_stage_features(model, images, tasks=SWIN_TASKS, project=project)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = swin_stage_features(model, images, tasks=SWIN_TASKS, project=project)
            features = swin_stage_features(model, images, tasks=SWIN_TASKS)
            plain = {t: [conv(f) for conv, f in zip(project[t], features[t])] for t in SWIN_TASKS}
    for task in SWIN_TASKS:
        for e, f, p in zip(exact[task], fused[task], plain[task], strict=True):
            assert f.dtype == p.dtype == torch.bfloat16
            err_fused, err_plain = (f.float() - e).abs().max(), (p.float() - e).abs().max()
            assert err_fused <= 2 * err_plain + 1e-3, (task, err_fused, err_plain)


def _mlp_pair(dropout: float) -> tuple[MTLoRALinear, nn.GELU, MTLoRALinear, TaskRouting]:
    torch.manual_seed(0)
    routing = TaskRouting(SWIN_TASKS)
    fc1 = MTLoRALinear(nn.Linear(6, 24), r=3, scale=4.0, dropout=dropout, tasks=SWIN_TASKS, task_r=2,
                       routing=routing)
    fc2 = MTLoRALinear(nn.Linear(24, 6), r=3, scale=2.0, dropout=dropout, tasks=SWIN_TASKS, task_r=2,
                       routing=routing)
    for layer in (fc1, fc2):
        _randomise(layer, std=0.3)
    return fc1, nn.GELU(), fc2, routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_mlp_matches_the_layers_one_by_one(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused stream MLP (hidden activations per block of rows, recomputed in the backward pass) gives the outputs
    and gradients of ``fc2(act(fc1(x)))`` run layer by layer: in training mode with dropout on the shared inputs,
    over several row blocks (the last one partial), with streams in an order unlike the tasks', fp32 and bf16
    autocast (the GPU configuration)."""
    from mtbench.methods import mtlora

    monkeypatch.setitem(mtlora.STREAM_BLOCK_BYTES, "cpu", 3 * 2 * 24 * 4)  # 3 rows of 2 fp32 streams per block
    fc1, act, fc2, routing = _mlp_pair(dropout=0.2)
    x = torch.randn(3 * 2, 5, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)  # k = 2, n = 2
    params = [x, *fc1.parameters(), *fc2.parameters()]
    params = [p for p in params if p.requires_grad]
    weights = torch.linspace(-1, 1, 3 * 2 * 5 * 6).view(6, 5, 6)

    def run(fused: bool) -> tuple[torch.Tensor, tuple]:
        torch.manual_seed(7)  # the same dropout masks on both paths
        with routing.stack((2, 0), 2), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fc1.stream_mlp(act, fc2, x) if fused else fc2(act(fc1(x)))
        assert out is not None
        return out, torch.autograd.grad((out.float() * weights).sum(), params)

    fast, fast_grads = run(True)
    slow, slow_grads = run(False)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert fast.dtype == slow.dtype and torch.allclose(fast.float(), slow.float(), **tol)
    for gf, gs in zip(fast_grads, slow_grads, strict=True):
        assert torch.allclose(gf.float(), gs.float(), rtol=tol["rtol"], atol=tol["atol"] * gs.abs().max().item())
    assert not torch.allclose(fast[2:4], fast[4:], atol=1e-3)  # the two streams differ


def test_stream_mlp_float64_gradients_and_no_double_backward() -> None:
    """In float64 the fused path's factor gradients are float64-exact (not accumulated in fp32), and a second
    derivative is refused by name rather than failing inside the backward pass."""
    fc1, act, fc2, routing = _mlp_pair(dropout=0.0)
    fc1.double(), fc2.double()
    x = torch.randn(3 * 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [x, *(p for p in (*fc1.parameters(), *fc2.parameters()) if p.requires_grad)]
    with routing.stack((2, 0), 2):
        fast, slow = fc1.stream_mlp(act, fc2, x), fc2(act(fc1(x)))
    assert fast is not None
    for gf, gs in zip(torch.autograd.grad(fast.sum(), params, retain_graph=True),
                      torch.autograd.grad(slow.sum(), params), strict=True):
        assert torch.allclose(gf, gs, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(fast.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gx.sum().backward()


def test_stream_mlp_one_stream_and_empty_rows() -> None:
    """k = 1 and a batch with no rows, against the layers one by one (eval: no dropout)."""
    fc1, act, fc2, routing = _mlp_pair(dropout=0.0)
    for rows in (2 * 3, 0):
        x = torch.randn(rows, 4, 6, requires_grad=True)
        with routing.stack((1,), 1):
            fast, slow = fc1.stream_mlp(act, fc2, x), fc2(act(fc1(x)))
        assert fast is not None and fast.shape == slow.shape == (rows, 4, 6)
        assert torch.allclose(fast, slow, atol=1e-5)
        (g_fast,) = torch.autograd.grad(fast.sum(), x)
        (g_slow,) = torch.autograd.grad(slow.sum(), x)
        assert torch.allclose(g_fast, g_slow, atol=1e-5)


def test_stream_hidden_flops_are_all_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's FLOP counter (the benchmarks' FLOP column) sees every product of the fused stream MLP, over several
    row blocks: forward ``f = pre1 + s·z1 B1ᵀ`` and ``A2 GELU(f)``, backward the recomputed ``f`` and five products,
    ``2·k·M·H·(4·r1 + 3·r2)`` in all. (An in-place ``baddbmm_`` is not counted: summing into a factor's gradient in
    place would hide its products.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from mtbench.methods import mtlora

    k, m, hidden, r1, r2 = 3, 40, 16, 2, 5
    monkeypatch.setitem(mtlora.STREAM_BLOCK_BYTES, "cpu", 10 * k * hidden * 4)  # 10 rows a block: 4 blocks
    gen = torch.Generator().manual_seed(0)
    pre1, z1 = torch.randn(m, hidden, generator=gen), torch.randn(k, m, r1, generator=gen)
    b1, a2 = torch.randn(k, hidden, r1, generator=gen), torch.randn(k, r2, hidden, generator=gen)
    leaves = [t.requires_grad_() for t in (pre1, z1, b1, a2)]
    with FlopCounterMode(display=False) as counter:
        out = mtlora._StreamHidden.apply(*leaves, 2.0, "none")
        out.backward(torch.randn(out.shape, generator=gen))
    assert counter.get_total_flops() == 2 * k * m * hidden * (4 * r1 + 3 * r2)
    assert all(t.grad is not None for t in leaves)


def test_stream_mlp_declines_what_it_cannot_fuse() -> None:
    fc1, act, fc2, routing = _mlp_pair(dropout=0.0)
    x = torch.randn(3 * 2, 6)
    assert fc1.stream_mlp(act, fc2, x) is None  # not stacked
    with routing.stack((2, 0), 2):
        assert fc1.stream_mlp(nn.ReLU(), fc2, x) is None  # only GELU's backward is called directly
        assert fc1.stream_mlp(act, nn.Linear(24, 6), x) is None
        plain1 = MTLoRALinear(nn.Linear(6, 24), r=3, scale=4.0, routing=routing)  # TA-LoRA only
        plain2 = MTLoRALinear(nn.Linear(24, 6), r=3, scale=4.0, routing=routing)
        assert plain1.stream_mlp(act, plain2, x) is None
    with routing.stack(torch.tensor([0, 1, 2, 0]), 2):
        assert fc1.stream_mlp(act, fc2, x) is None  # per-row ids (mixed batches) take the masked product


@pytest.mark.parametrize("targets", [("proj",), ("proj", "fc2"), ("fc1",)])
def test_swin_all_tasks_with_task_lora_on_some_layers_only(targets: tuple[str, ...]) -> None:
    """TS-LoRA on a subset of proj, fc1, fc2: the all-tasks forward (fused MLP where both MLP layers have it, layer
    by layer otherwise) trains, in fp32 and under bf16 autocast, and every stream differs from the shared one."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2, task_targets=targets), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted()).train()
    _randomise(model, std=0.05)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features = swin_stage_features(model, images, tasks=SWIN_TASKS)
            shared = swin_stage_features(model, images)
        sum(f.float().sum() for fs in features.values() for f in fs).backward()
        for task in SWIN_TASKS:
            assert not torch.allclose(features[task][-1].float(), shared[-1].float(), atol=1e-3), (targets, task)
    assert all(p.grad is not None for n, p in model.named_parameters() if "mtlora_tasks_" in n)


def test_swin_stream_blocks_keep_no_hidden_activation_per_stream() -> None:
    """Training the all-tasks forward saves no tensor as wide as the MLP's hidden layer for the task streams: the
    stream rows' hidden activations are recomputed, not kept (docs/performance.md: MTLoRA's memory)."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted()).train()
    images = torch.randn(2, 3, 64, 64)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = swin_stage_features(model, images, tasks=SWIN_TASKS)
    sum(f.sum() for fs in features.values() for f in fs).backward()
    k = len(SWIN_TASKS)
    for stage in model.layers:
        block = stage.blocks[-1]
        rows = 2 * block.input_resolution[0] * block.input_resolution[1]  # tokens of the shared rows
        hidden = block.mlp.fc1.base.out_features
        assert (rows, hidden) in {(s[0] * s[1], s[-1]) for s in saved if len(s) == 3}  # the shared stream's
        assert not [s for s in saved if s[-1] == hidden and math.prod(s) >= k * rows * hidden], hidden
    assert all(p.grad is not None for n, p in model.named_parameters() if "mtlora_tasks_" in n)


def test_swin_stream_blocks_shift_and_partition_the_shared_rows_only() -> None:
    """The cyclic shifts of a shifted-window stream block, forward and backward, run on the shared rows only (and
    with them the window partition and reverse between them): the output projection, the first layer with one
    output per stream, is applied after the reverse shift."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted()).train()
    with _Calls() as calls:
        features = swin_stage_features(model, torch.randn(2, 3, 64, 64), tasks=SWIN_TASKS)
        sum(f.sum() for fs in features.values() for f in fs).backward()
    batches = [shape[0] for shape, _ in calls.of(torch.ops.aten.roll)]
    assert 2 in batches and set(batches) == {2}, batches
    assert all(p.grad is not None for n, p in model.named_parameters() if "mtlora_tasks_" in n)


def test_patch_merging_without_the_pad_copy_matches_timm() -> None:
    """``backbones._merge_patches`` gives timm's ``PatchMerging`` output and gradients; at even sizes it issues no
    ``F.pad`` (a copy of every stream's rows, forward and backward), at odd sizes it is timm's own padded forward;
    the module's hooks run either way."""
    from timm.models.swin_transformer import PatchMerging

    from mtbench.backbones import _merge_patches

    torch.manual_seed(0)
    merging = PatchMerging(dim=6, out_dim=12)
    hooked: list[tuple[int, ...]] = []
    merging.register_forward_hook(lambda module, args, out: hooked.append(tuple(out.shape)))
    for shape, padded in (((3, 4, 6, 6), False), ((2, 5, 3, 6), True)):
        x = torch.randn(shape, requires_grad=True)
        weight = torch.randn(shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, 12)
        (ref,) = torch.autograd.grad((merging(x) * weight).sum(), x)
        with _Calls() as calls:
            out = _merge_patches(merging, x)
            (grad,) = torch.autograd.grad((out * weight).sum(), x)
        pads = [shape[0] for shape, _ in calls.of(torch.ops.aten.constant_pad_nd)]
        assert torch.allclose(out, merging(x), atol=1e-6) and torch.allclose(grad, ref, atol=1e-6), shape
        assert bool(pads) == padded, (shape, pads)
    assert hooked == [(3, 2, 3, 12)] * 3 + [(2, 3, 2, 12)] * 3
    assert _merge_patches(nn.Identity(), x) is x
    # A forward some wrapper installed on the instance is what runs, and it stays.
    calls: list[int] = []

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return PatchMerging.forward(merging, x)

    merging.forward = wrapped
    x = torch.randn(3, 4, 6, 6)
    assert torch.equal(_merge_patches(merging, x), PatchMerging.forward(merging, x))
    assert calls == [1] and vars(merging)["forward"] is wrapped


def test_residual_draws_timm_drop_path_masks_in_one_pass() -> None:
    """``backbones._residual`` adds a DropPath branch with the masks timm's module would draw (same random draws, one
    per example over the leading ``batch_dims``), the same gradients, and in one kernel; inactive DropPath (eval
    mode, rate 0, ``nn.Identity``) is a plain sum."""
    from timm.layers import DropPath

    from mtbench.backbones import _residual

    x = torch.randn(4, 3, 5, requires_grad=True)
    branch = torch.randn(3, 4, 3, 5, requires_grad=True)  # 3 streams of the 4 examples of x
    drop = DropPath(0.5).train()
    torch.manual_seed(3)
    ref = x + drop(branch.reshape(12, 3, 5)).view_as(branch)
    ref_grads = torch.autograd.grad((ref * branch.detach()).sum(), (x, branch))
    torch.manual_seed(3)
    with _Calls() as calls:
        out = _residual(x, branch, drop, batch_dims=2)
    # The passes over the streams: operations whose output is as large as the branch.
    ops = [op for op, _, shape in calls.calls if shape is not None and math.prod(shape) >= branch.numel()]
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)  # one rounding less (fused multiply-add)
    dropped = (out == x).flatten(2).all(-1)
    assert dropped.any() and not dropped.all()  # some examples' branches dropped, not all
    assert ops == [torch.ops.aten.addcmul]  # no separate pass for the mask
    for g, r in zip(torch.autograd.grad((out * branch.detach()).sum(), (x, branch)), ref_grads, strict=True):
        assert torch.allclose(g, r)
    for inactive in (DropPath(0.5).eval(), DropPath(0.0).train(), nn.Identity()):
        assert torch.equal(_residual(x, branch, inactive, batch_dims=2), x + branch)

    class DropAll(DropPath):  # a subclass that applies its rate otherwise: called on the branch itself
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t * 0

    assert torch.equal(_residual(x, branch, DropAll(0.5).train(), batch_dims=2), x + branch * 0)


def test_swin_stream_block_puts_back_a_forward_the_block_already_had() -> None:
    """A stream block whose instance already has a forward (as some wrappers install) gets it back after the call."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted())
    block = model.layers[0].blocks[-1]

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return type(block).forward(block, x)

    block.forward = wrapped
    features = swin_stage_features(model, torch.randn(1, 3, 64, 64), tasks=SWIN_TASKS)
    assert vars(block)["forward"] is wrapped and len(features) == len(SWIN_TASKS)


def test_swin_stream_block_restores_the_attention_after_an_error() -> None:
    """An error inside the attention of a stream block (here from a hook on ``qkv``) leaves the block as it was: its
    output projection back in place, no instance-level forward left, and the next forward runs."""
    from mtbench.backbones import swin_stage_features

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=SWIN_TASKS)
    model = method.apply(_swin_shifted())
    block = model.layers[0].blocks[-1]
    proj, keys = block.attn.proj, set(model.state_dict())

    def fail(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("hook failed")

    handle = block.attn.qkv.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="hook failed"):
        swin_stage_features(model, torch.randn(1, 3, 64, 64), tasks=SWIN_TASKS)
    handle.remove()
    assert block.attn.proj is proj and "forward" not in vars(block) and set(model.state_dict()) == keys
    assert len(swin_stage_features(model, torch.randn(1, 3, 64, 64), tasks=SWIN_TASKS)) == len(SWIN_TASKS)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_mixed_batch_attention_runs_once_on_the_shared_rows(family: str) -> None:
    """The last block's q/k/v and attention see the n shared rows only (§7.4: the attention map is shared); its
    ``proj`` (outside the attention module in BERT, inside in LLaMA) still gives every row its own task's stream."""
    from mtbench.backbones import tiny_llama

    backbone = tiny_bert().model if family == "bert" else tiny_llama().model
    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks=TASKS)
    model = method.apply(backbone).eval()
    _randomise(model)
    last = model.encoder.layer[-1] if family == "bert" else model.model.layers[-1]
    q = last.attention.self.query if family == "bert" else last.self_attn.q_proj
    rows: list[int] = []
    q.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    ids = torch.randint(5, 60, (4, 9), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run(task_ids: torch.Tensor | str) -> torch.Tensor:
        method.set_task(model, task_ids)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.last_hidden_state if family == "bert" else out.logits

    mixed = run(torch.tensor([0, 1, 1, 0]))
    assert rows == [4]
    alone = {0: run("a"), 1: run(torch.tensor([1]))}
    for i, task in enumerate([0, 1, 1, 0]):
        assert torch.allclose(mixed[i], alone[task][i], atol=1e-5)
        assert not torch.allclose(mixed[i], alone[1 - task][i], atol=1e-4)


def test_tied_output_embedding_is_refused() -> None:
    # merge_shared folds TA-LoRA into base weights; a tied lm_head would move the input embedding with it.
    from mtbench.backbones import tiny_llama

    method = MTLoRA(MTLoRAConfig(target_modules=("q", "lm_head"), task_targets=()), tasks=("a", "b"))
    with pytest.raises(ConfigError, match=r"selects lm_head, whose weight is shared with model\.embed_tokens\.weight"):
        method.apply(tiny_llama().model)


def test_bf16_shared_merge_rounds_once_and_unmerges_exactly() -> None:
    torch.manual_seed(0)
    layer = MTLoRALinear(nn.Linear(64, 32).to(torch.bfloat16), r=4, scale=2.0, dropout=0.0, tasks=(), task_r=2)
    # Updates near the weights' rounding step: rounding the delta to bf16 first, then the sum, loses them.
    nn.init.normal_(layer.mtlora_shared_A, std=1.0)
    nn.init.normal_(layer.mtlora_shared_B, std=1e-4)
    assert_exact_bf16_round_trip(layer)

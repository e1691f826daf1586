"""``mtbench check-method`` runs the conformance suite on a third-party method file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mtbench.cli import main


LEAKY = '''
from mtbench import register_method
from mtbench.methods.lora import LoRA


@register_method("leaky_lora_{suffix}")
class LeakyLoRA(LoRA):
    """LoRA whose base weights still train: trainable() names every parameter."""

    def trainable(self, model):
        return {{name for name, _ in model.named_parameters()}}
'''

GOOD = '''
from mtbench import register_method
from mtbench.methods.lora import LoRA, LoRAConfig
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SmallLoRAConfig(LoRAConfig):
    r: int = 2
    """Rank."""


@register_method("small_lora_{suffix}")
class SmallLoRA(LoRA):
    """LoRA with rank 2 by default."""

    config_cls = SmallLoRAConfig
'''


def _write(tmp_path: Path, body: str, name: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body.format(suffix=tmp_path.name[-6:].lower().replace("-", "_"))))
    return path


def test_broken_method_fails_naming_the_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-method", str(_write(tmp_path, LEAKY, "leaky"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    failing = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("trainable_count" in line for line in failing), out
    assert "check(s) failed" in out


def test_good_method_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-method", str(_write(tmp_path, GOOD, "good"))]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out
    assert "pass" in out and "merge_unmerge" in out


def test_file_without_method_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert main(["check-method", str(empty)]) == 2
    assert "registers no new method" in capsys.readouterr().err

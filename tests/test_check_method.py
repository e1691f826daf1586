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
    # Nothing is frozen, so there is nothing to compare: that is a failure, not a vacuous pass.
    assert any("frozen_unchanged: 0 frozen tensors" in line for line in failing), out
    assert all("expected" in line for line in failing), failing  # each FAIL line says what was expected
    assert "check(s) failed" in out


DORA = Path(__file__).resolve().parent / "plugins" / "dora.py"


def _dora_variant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the DoRA fixture with one planted fault, registered under its own name."""
    text = DORA.read_text()
    assert old in text
    path = tmp_path / "dora_variant.py"
    suffix = tmp_path.name[-6:].lower().replace("-", "_")
    path.write_text(text.replace(old, new).replace('"dora_fixture"', f'"dora_variant_{suffix}"'))
    return path


def _lines(out: str, verdict: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(verdict)]


def test_dora_written_from_the_docs_passes_every_check(capsys: pytest.CaptureFixture) -> None:
    """The DoRA fixture (magnitude + direction, mergeable with an update that depends on W0) passes as written."""
    assert main(["check-method", str(DORA)]) == 0
    out = capsys.readouterr().out
    assert not _lines(out, "FAIL"), out
    passed = {line.split()[2].rstrip(":") for line in _lines(out, "pass")}
    assert {"params_declared", "frozen_unchanged", "merge_unmerge", "identity_at_init"} <= passed, out


def test_undeclared_magnitude_fails_params_declared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A DoRA whose magnitude is left out of adapter_params() would silently never train: a named FAIL line."""
    path = _dora_variant(tmp_path, ', "magnitude": ParamRole("scale")}', "}")
    assert main(["check-method", str(path)]) == 1
    failing = _lines(capsys.readouterr().out, "FAIL")
    line = next(line for line in failing if "params_declared" in line)
    assert "magnitude" in line and "expected 0" in line, line


def test_trained_but_undeclared_parameter_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Training a parameter through trainable() without declaring its role fails too (no optimizer role)."""
    path = _dora_variant(tmp_path, ', "magnitude": ParamRole("scale")}', "}\n\n    # planted\n")
    text = path.read_text().replace(
        "    def apply(self, backbone: nn.Module) -> nn.Module:",
        "    def trainable(self, model: nn.Module) -> set[str]:\n"
        "        return super().trainable(model) | {n for n, _ in model.named_parameters() if n.endswith('magnitude')}"
        "\n\n    def apply(self, backbone: nn.Module) -> nn.Module:")
    path.write_text(text)
    assert main(["check-method", str(path)]) == 1
    line = next(line for line in _lines(capsys.readouterr().out, "FAIL") if "params_declared" in line)
    assert "magnitude" in line


def test_frozen_on_purpose_parameter_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A parameter the method freezes itself in apply() (and does not train) is allowed undeclared."""
    path = _dora_variant(tmp_path, ', "magnitude": ParamRole("scale")}', "}")
    text = path.read_text().replace("        self.magnitude = nn.Parameter(weight.detach().norm(dim=1))",
                                    "        self.magnitude = nn.Parameter(weight.detach().norm(dim=1), "
                                    "requires_grad=False)")
    path.write_text(text)
    assert main(["check-method", str(path)]) == 0
    line = next(line for line in _lines(capsys.readouterr().out, "pass") if "params_declared" in line)
    assert "24 declared, 12 frozen on purpose" in line, line


def test_forward_ignoring_merged_fails_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The DeltaMergeable contract's other half: a merged layer's forward must be base(x) alone."""
    path = _dora_variant(tmp_path, "        if self.merged:\n            return self.base(x)\n", "")
    assert main(["check-method", str(path)]) == 1
    line = next(line for line in _lines(capsys.readouterr().out, "FAIL") if "merge_unmerge" in line)
    assert "threshold 1e-5" in line


def test_dora_fixture_trains_on_glue_smoke(tmp_path: Path) -> None:
    """The docs' run command works for the fixture: a FINISHED run through --plugin."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--plugin", str(DORA), "--method", "dora_fixture", "--task", "glue", "--profile", "smoke",
                 "--tracking-uri", uri, "--set", "trainer.max_steps=3", "--no-progress"]) == 0


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


def test_a_built_in_methods_own_file_is_checked_as_registered(capsys: pytest.CaptureFixture) -> None:
    """``check-method methods/full_ft.py`` checks the built-in method that file registers, instead of loading it
    again as a plugin (which clashed with itself: "duplicate method name 'full_ft'")."""
    source = Path(__file__).resolve().parents[1] / "methods" / "full_ft.py"
    assert main(["check-method", str(source)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "all checks passed for full_ft" and "FAIL" not in out

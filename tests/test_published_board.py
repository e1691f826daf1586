"""The published board in leaderboard/ is what the documented command makes of the committed results/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtbench.cli import main


ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"Generated \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ|\"generated\": \"[^\"]*\"")


def _text(path: Path) -> str:
    return STAMP.sub("<generated>", path.read_text(encoding="utf-8"))


def test_published_board_regenerates_from_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mtbench leaderboard --no-store --from-results results --out leaderboard`` (leaderboard/README.md), run
    from the repository root, reproduces every published file but the generation time."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "board"
    assert main(["leaderboard", "--no-store", "--from-results", "results", "--out", str(out)]) == 0
    published = ROOT / "leaderboard"
    made = {p.name for p in out.iterdir()}
    assert made == {p.name for p in published.iterdir()} - {"README.md"}
    assert (out / "leaderboard.csv").read_bytes() == (published / "leaderboard.csv").read_bytes()
    for name in ("leaderboard.json", "LEADERBOARD.md", "index.html"):
        assert _text(out / name) == _text(published / name), name
    for plot in out.glob("*.png"):  # label placement is deterministic (render._label), so the pixels are too
        assert plot.read_bytes() == (published / plot.name).read_bytes(), plot.name

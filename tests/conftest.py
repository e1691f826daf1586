"""Test set-up: offline hubs, no telemetry, registries discovered once for the whole session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mtbench import registry  # noqa: E402


registry.discover()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real benchmark files (``MTBENCH_DATA``, else ``../shared/data`` beside the checkout); skip if absent."""
    root = Path(os.environ.get("MTBENCH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set MTBENCH_DATA)")
    return root


HOST_CONVERSIONS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")
"""Tensor methods that turn a tensor into a Python value: on a GPU each one makes the host wait for the device."""


@pytest.fixture
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """``with no_host_sync("what"):`` fails the test if the block turns any tensor into a Python value."""
    import torch

    @contextlib.contextmanager
    def forbid(what: str) -> Iterator[None]:
        def syncs(self: torch.Tensor, *args: object) -> None:
            raise AssertionError(f"{what} synchronised with the device")

        with monkeypatch.context() as patch:
            for name in HOST_CONVERSIONS:
                patch.setattr(torch.Tensor, name, syncs)
            yield

    return forbid

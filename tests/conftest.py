"""Test set-up: offline hubs, no telemetry, registries discovered once for the whole session."""

from __future__ import annotations

import os
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

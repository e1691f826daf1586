"""Test set-up: offline hubs, no telemetry, registries discovered once for the whole session."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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


def _waits_for_the_device(func: Any, args: tuple[Any, ...]) -> str | None:
    """Why an ATen call would make the host wait for a CUDA device, or ``None``: its output's size depends on the
    values (the host must read them to allocate it) or its kernel reads a value back (``F.one_hot``'s range check,
    any ``.item()``). On a CPU none of these is visible as a Python call, so the CPU test suite catches them here."""
    aten = torch.ops.aten
    name = func.overloadpacket.__name__
    if name in ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "bincount", "equal", "is_nonzero"):
        return f"aten.{name} reads values back to the host"
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
        return f"aten.{name} with a boolean mask has a value-dependent size"
    if func is aten.repeat_interleave.Tensor:
        return "aten.repeat_interleave with tensor repeats has a value-dependent size"
    return None


def _caller_module() -> str:
    """Module name of the innermost frame outside torch and this file: the code that asked for the operation."""
    frame = sys._getframe(1)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name != __name__ and name.split(".")[0] != "torch":
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return ""


class _Forbid(TorchDispatchMode):
    """Fails on every synchronising call (Python conversions, device-placed ``torch.tensor``, the ATen operations of
    :func:`_waits_for_the_device`) made by code outside the ``allow``-ed top-level packages."""

    def __init__(self, what: str, allow: tuple[str, ...]) -> None:
        super().__init__()
        self.what, self.allow = what, allow

    def culprit(self, why: str) -> None:
        caller = _caller_module()
        if caller.split(".")[0] not in self.allow:
            raise AssertionError(f"{self.what} synchronised with the device in {caller}: {why}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        why = _waits_for_the_device(func, args)
        if why is not None:
            self.culprit(why)
        return func(*args, **(kwargs or {}))

    def converter(self, name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def convert(tensor: torch.Tensor, *args: Any) -> Any:
            self.culprit(f"Tensor.{name} turns a tensor into a Python value")
            return original(tensor, *args)
        return convert

    def placed(self, make: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("device") is not None:  # on a GPU a blocking copy from pageable host memory
                self.culprit(f"torch.{make.__name__}(data, device=...) copies host to device")
            return make(*args, **kwargs)
        return build


@pytest.fixture
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Callable[..., contextlib.AbstractContextManager[None]]:
    """``with no_host_sync("what"):`` fails the test if the block turns any tensor into a Python value, builds one
    from Python data on a given device, or runs an operation that makes the host wait for a GPU (see
    :func:`_waits_for_the_device`), forward and backward.

    ``allow``: top-level packages (such as ``"transformers"``) whose own synchronisations are not the tested code's.
    """

    @contextlib.contextmanager
    def forbid(what: str, allow: tuple[str, ...] = ()) -> Iterator[None]:
        guard = _Forbid(what, allow)
        with monkeypatch.context() as patch:
            for name in HOST_CONVERSIONS:
                patch.setattr(torch.Tensor, name, guard.converter(name))
            for make in (torch.tensor, torch.as_tensor):
                patch.setattr(torch, make.__name__, guard.placed(make))
            with guard:
                yield

    return forbid

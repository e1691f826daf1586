"""Shared assertion of the DeltaMergeable contract in half precision, for every mergeable layer's tests."""

from __future__ import annotations

import torch

from mtbench.interfaces import DeltaMergeable


def assert_exact_bf16_round_trip(layer: DeltaMergeable) -> None:
    """``merge`` rounds the fp32 sum ``W + ΔW`` once into the bf16 weight; ``unmerge`` restores every bit."""
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    layer.merge()
    # One rounding of the exact sum: W + ΔW computed in fp32, then rounded to bf16 (not W + bf16(ΔW)).
    assert torch.equal(layer.base.weight, (w0.float() + delta).to(torch.bfloat16))
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)

"""mtbench: a benchmark suite and leaderboard for parameter-efficient multi-task fine-tuning.

Importing this package is cheap: torch, Lightning and MLflow load only when a command needs them.
"""

from __future__ import annotations

from typing import Any


__version__ = "0.1.0"

_LAZY = {
    "AdapterModule": "interfaces",
    "MetricSpec": "interfaces",
    "Method": "interfaces",
    "MethodConfig": "interfaces",
    "MultiTaskModel": "interfaces",
    "ParamRole": "interfaces",
    "Task": "interfaces",
    "TaskConfig": "interfaces",
    "TaskRouting": "interfaces",
    "register_backbone": "registry",
    "register_method": "registry",
    "register_task": "registry",
}
__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mtbench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mtbench' has no attribute {name!r}")

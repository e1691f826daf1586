"""mtbench: a benchmark suite and leaderboard for parameter-efficient multi-task fine-tuning.

Importing this package is cheap: torch, Lightning and MLflow load only when a command needs them. The names below
load on first use, each from its module: the user-facing errors (``ConfigError``, ``DataError``, their base
``MtbenchError``) from :mod:`mtbench.errors` without importing torch, the method and task contracts (and
``task_rows``, for a task's collate) from :mod:`mtbench.interfaces`, the ``register_*`` decorators from
:mod:`mtbench.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from .errors import ConfigError, DataError, MtbenchError
    from .interfaces import (
        AdapterModule,
        DeltaMergeable,
        LoaderConfig,
        Method,
        MethodConfig,
        MetricSpec,
        MultiTaskModel,
        ParamRole,
        Task,
        TaskConfig,
        TaskRouting,
        task_rows,
    )
    from .registry import register_backbone, register_method, register_task


__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "errors",
    "DataError": "errors",
    "MtbenchError": "errors",
    "AdapterModule": "interfaces",
    "DeltaMergeable": "interfaces",
    "LoaderConfig": "interfaces",
    "MetricSpec": "interfaces",
    "Method": "interfaces",
    "MethodConfig": "interfaces",
    "MultiTaskModel": "interfaces",
    "ParamRole": "interfaces",
    "Task": "interfaces",
    "TaskConfig": "interfaces",
    "TaskRouting": "interfaces",
    "task_rows": "interfaces",
    "register_backbone": "registry",
    "register_method": "registry",
    "register_task": "registry",
}
__all__ = [
    "AdapterModule",
    "ConfigError",
    "DataError",
    "DeltaMergeable",
    "LoaderConfig",
    "Method",
    "MethodConfig",
    "MetricSpec",
    "MtbenchError",
    "MultiTaskModel",
    "ParamRole",
    "Task",
    "TaskConfig",
    "TaskRouting",
    "register_backbone",
    "register_method",
    "register_task",
    "task_rows",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mtbench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mtbench' has no attribute {name!r}")

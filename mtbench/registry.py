"""Name -> class registries for methods, tasks and backbones, and plugin discovery.

A plugin registers itself with a decorator (``@register_method("lora")``); nothing else in the project lists it.
Discovery runs once, from :func:`discover`, called by the CLI and by the test suite, never on ``import mtbench``:

1. in-tree modules of ``mtbench.methods`` / ``mtbench.tasks`` (sorted, each imported so its decorator runs);
2. entry points ``mtbench.methods`` / ``mtbench.tasks`` / ``mtbench.backbones`` of installed distributions,
   registered lazily so that a broken third-party plugin fails only when selected
   (``MTBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips this step);
3. files named by ``--plugin FILE.py`` and by the ``MTBENCH_PLUGINS`` path list (``os.pathsep``-separated).

Trust model: plugin code runs with the user's rights, so it is only ever loaded from the three sources above, all
chosen by the user; mtbench never imports a file because it happens to sit in the working directory.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import MtbenchError


T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistryError(MtbenchError):
    """A registry or plugin problem: unknown or duplicate name, or a plugin that fails to import or to conform."""


class UnknownNameError(RegistryError, KeyError):
    """An unknown registry name; the message carries a did-you-mean line and the available names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence.
        return str(self.args[0])


@dataclass
class _Entry(Generic[T]):
    obj: T | None
    origin: str
    entry_point: EntryPoint | None = None


def did_you_mean(name: str, choices: Iterable[str], kind: str) -> str:
    """Return ``unknown <kind> 'x'; did you mean 'y'? available: a, b`` for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} available: {', '.join(choices) or '(none)'}"


class Registry(Generic[T]):
    """A typed name -> object registry filled by a decorator.

    Args:
        kind: what is registered ("method", "task", "backbone"), used in messages.
        check: validates an object at registration and returns an error message, or ``None`` if it is fine.
    """

    def __init__(self, kind: str, check: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._entries: dict[str, _Entry[T]] = {}
        self._frozen = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (lowercase snake_case)."""

        def decorator(obj: T) -> T:
            self.add(name, obj, _origin_of(obj))
            return obj

        return decorator

    def add(self, name: str, obj: T, origin: str) -> None:
        """Register ``obj``; duplicate names and interface violations are errors."""
        if self._frozen:
            raise RegistryError(f"{self.kind} registry is frozen; cannot register '{name}' ({origin})")
        if not _NAME.match(name):
            raise RegistryError(f"{self.kind} name '{name}' ({origin}) must be lowercase snake_case")
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} name '{name}': registered by {self._entries[name].origin} and by {origin}"
            )
        problem = self._check(obj) if self._check else None
        if problem:
            raise RegistryError(f"{self.kind} '{name}' ({origin}) breaks the interface: {problem}")
        self._entries[name] = _Entry(obj, origin)

    def add_lazy(self, name: str, entry_point: EntryPoint) -> None:
        """Register an entry point that is only imported when ``name`` is selected."""
        dist = entry_point.dist.name if entry_point.dist else "?"
        origin = f"entry point {entry_point.value} ({dist})"
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} name '{name}': registered by {self._entries[name].origin} and by {origin}"
            )
        self._entries[name] = _Entry(None, origin, entry_point)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names raise with a did-you-mean line."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownNameError(did_you_mean(name, self._entries, self.kind))
        if entry.obj is None:
            assert entry.entry_point is not None
            try:
                obj = entry.entry_point.load()
            except Exception as exc:
                raise RegistryError(f"{self.kind} plugin '{name}' ({entry.origin}) failed to import: {exc}") from exc
            problem = self._check(obj) if self._check else None
            if problem:
                raise RegistryError(f"{self.kind} '{name}' ({entry.origin}) breaks the interface: {problem}")
            entry.obj = obj
        return entry.obj

    def origin(self, name: str) -> str:
        """``file:line`` of an in-tree or file plugin, or the entry point and its distribution."""
        if name not in self._entries:
            raise UnknownNameError(did_you_mean(name, self._entries, self.kind))
        return self._entries[name].origin

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def freeze(self) -> None:
        """Forbid further registration (called once discovery is complete)."""
        self._frozen = True

    def _clear(self) -> None:
        """Empty the registry (tests only)."""
        self._entries.clear()
        self._frozen = False


def _origin_of(obj: Any) -> str:
    try:
        path = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return getattr(obj, "__module__", "?")
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    package = getattr(module, "__package__", "") or ""
    if package.startswith("mtbench."):
        return f"built-in {package.split('.')[-1]}/{Path(path).name}:{line}"
    return f"{path}:{line}"


def _check_method(obj: Any) -> str | None:
    from .interfaces import Method

    return _check_class(obj, Method)


def _check_task(obj: Any) -> str | None:
    from .interfaces import Task

    problem = _check_class(obj, Task)
    if problem is None and not isinstance(getattr(obj, "version", None), str):
        problem = "a Task needs a class-level string `version`"
    return problem


def _check_class(obj: Any, interface: type) -> str | None:
    if not (inspect.isclass(obj) and issubclass(obj, interface)):
        return f"expected a subclass of {interface.__name__}, got {obj!r}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        return f"{obj.__name__} does not implement {missing}"
    from .interfaces import ConfigBase

    config_cls = getattr(obj, "config_cls", None)
    if not (inspect.isclass(config_cls) and issubclass(config_cls, ConfigBase)):
        return f"{obj.__name__}.config_cls must be a dataclass deriving from {ConfigBase.__name__}"
    return None


def _check_backbone(obj: Any) -> str | None:
    return None if callable(obj) else f"a backbone builder must be callable, got {obj!r}"


methods: Registry[Any] = Registry("method", _check_method)
tasks: Registry[Any] = Registry("task", _check_task)
backbones: Registry[Any] = Registry("backbone", _check_backbone)
register_method = methods.register
register_task = tasks.register
register_backbone = backbones.register

_GROUPS = {"mtbench.methods": methods, "mtbench.tasks": tasks, "mtbench.backbones": backbones}
_discovered = False


def discover(plugins: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Fill the registries from built-ins, entry points, ``MTBENCH_PLUGINS`` and ``plugins``; idempotent."""
    global _discovered
    if not _discovered:
        importlib.import_module("mtbench.backbones")
        for package in ("mtbench.methods", "mtbench.tasks"):
            _import_package_modules(package)
        if os.environ.get("MTBENCH_DISABLE_PLUGIN_AUTOLOAD") != "1":
            for group, registry in _GROUPS.items():
                for ep in entry_points(group=group):
                    if ep.name not in registry or not registry.origin(ep.name).startswith("built-in"):
                        registry.add_lazy(ep.name, ep)
        _discovered = True
    env_files = [p for p in os.environ.get("MTBENCH_PLUGINS", "").split(os.pathsep) if p]
    for path in [*env_files, *plugins]:
        load_plugin_file(path)


def _import_package_modules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"built-in module {package}.{info.name} failed to import: {exc}") from exc


_loaded_files: set[Path] = set()


def load_plugin_file(path: str | os.PathLike[str]) -> None:
    """Import a plugin file so its decorators register; errors name the file."""
    file = Path(path).expanduser().resolve()
    if file in _loaded_files:
        return
    if not file.is_file() or file.suffix != ".py":
        raise RegistryError(f"plugin file {path} does not exist or is not a .py file")
    module_name = f"mtbench_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', file.stem)}_{abs(hash(file)) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except RegistryError as exc:
        del sys.modules[module_name]
        raise RegistryError(f"plugin {path}: {exc}") from exc
    except BaseException as exc:
        del sys.modules[module_name]
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError):
            detail = f"SyntaxError at line {exc.lineno}: {exc.msg}"
        raise RegistryError(f"plugin {path} failed to import ({detail})") from exc
    _loaded_files.add(file)

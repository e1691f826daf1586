"""Name -> class registries for methods, tasks and backbones, and plugin discovery.

A plugin registers itself with a decorator (``@register_method("lora")``); nothing else in the project lists it.
Each registry fills itself the first time it is read (``names()``, ``get()``, ``in``), never on ``import mtbench``,
so a command pays only for the registries it uses (``mtbench ls methods`` imports no task):

1. its in-tree modules: every module of the package (or the one module) named by ``builtins``, sorted, each
   imported so its decorators run (``mtbench.methods``, ``mtbench.tasks``, ``mtbench.backbones``: names, not
   imports, so this module depends on none of them);
2. entry points of its group (``mtbench.methods`` / ``mtbench.tasks`` / ``mtbench.backbones``) of installed
   distributions, registered lazily so that a broken third-party plugin fails only when selected
   (``MTBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips this step);
3. files named by ``--plugin FILE.py`` and by the ``MTBENCH_PLUGINS`` path list (``os.pathsep``-separated), loaded
   by :func:`discover` (the CLI calls it for the commands that read a registry).

Trust model: plugin code runs with the user's rights, so it is only ever loaded from the three sources above, all
chosen by the user; mtbench never imports a file because it happens to sit in the working directory.
"""

from __future__ import annotations

import contextlib
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

from .errors import MtbenchError, did_you_mean


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


class Registry(Generic[T]):
    """A typed name -> object registry filled by a decorator.

    Args:
        kind: what is registered ("method", "task", "backbone"), used in messages.
        check: validates an object at registration and returns an error message, or ``None`` if it is fine.
        builtins: dotted name of the package (all its public modules) or module whose import registers the
            built-ins; imported on first read.
        group: entry-point group of third-party plugins, registered lazily on first read.
    """

    def __init__(self, kind: str, check: Callable[[Any], str | None] | None = None, builtins: str | None = None,
                 group: str | None = None) -> None:
        self.kind = kind
        self._check = check
        self._builtins = builtins
        self._group = group
        self._entries: dict[str, _Entry[T]] = {}
        self._frozen = False
        self._state = "empty" if builtins or group else "filled"  # empty -> filling -> filled

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (lowercase snake_case)."""

        def decorator(obj: T) -> T:
            # A plugin registering before the built-ins were read: fill first, so a clash names both in order.
            # Not for a built-in module imported directly (its siblings may import it while it is half-defined).
            if not self._is_builtin(obj):
                self._fill()
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
        self._fill()
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
        self._fill()
        if name not in self._entries:
            raise UnknownNameError(did_you_mean(name, self._entries, self.kind))
        return self._entries[name].origin

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._fill()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._entries

    def _is_builtin(self, obj: Any) -> bool:
        module = getattr(obj, "__module__", "") or ""
        return bool(self._builtins) and (module == self._builtins or module.startswith(f"{self._builtins}."))

    def _fill(self) -> None:
        """Import the built-ins and register the entry points, once (see the module docstring)."""
        if self._state != "empty":
            return
        self._state = "filling"
        try:
            if self._builtins:
                _import_builtins(self._builtins)
            if self._group and os.environ.get("MTBENCH_DISABLE_PLUGIN_AUTOLOAD") != "1":
                for ep in entry_points(group=self._group):
                    entry = self._entries.get(ep.name)
                    if entry is None or not entry.origin.startswith("built-in"):
                        self.add_lazy(ep.name, ep)
        except BaseException:
            self._state = "empty"
            raise
        self._state = "filled"

    def freeze(self) -> None:
        """Forbid further registration (called once discovery is complete)."""
        self._frozen = True

    def _clear(self) -> None:
        """Empty the registry (tests only)."""
        self._entries.clear()
        self._frozen = False
        self._state = "empty" if self._builtins or self._group else "filled"


def _origin_of(obj: Any) -> str:
    try:
        path = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return getattr(obj, "__module__", "?")
    module = getattr(obj, "__module__", "") or ""
    if module.startswith("mtbench."):  # methods/lora.py, tasks/glue.py, backbones.py: where the source tree has it
        return f"built-in {'/'.join(module.split('.')[1:])}.py:{line}"
    with contextlib.suppress(ValueError):  # outside the working directory: keep the absolute path
        path = str(Path(path).relative_to(Path.cwd()))
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


methods: Registry[Any] = Registry("method", _check_method, builtins="mtbench.methods", group="mtbench.methods")
tasks: Registry[Any] = Registry("task", _check_task, builtins="mtbench.tasks", group="mtbench.tasks")
backbones: Registry[Any] = Registry("backbone", _check_backbone, builtins="mtbench.backbones",
                                   group="mtbench.backbones")
register_method = methods.register
register_task = tasks.register
register_backbone = backbones.register


def discover(plugins: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Load the plugin files of ``MTBENCH_PLUGINS`` and ``plugins`` (each once); the registries fill themselves
    with built-ins and entry points when first read."""
    env_files = [p for p in os.environ.get("MTBENCH_PLUGINS", "").split(os.pathsep) if p]
    for path in [*env_files, *plugins]:
        load_plugin_file(path)


def _import_builtins(name: str) -> None:
    """Import module ``name``, and every public module of it when it is a package."""
    names = [name]
    module = importlib.import_module(name)
    if hasattr(module, "__path__"):
        infos = sorted(pkgutil.iter_modules(module.__path__), key=lambda i: i.name)
        names = [f"{name}.{info.name}" for info in infos if not info.name.startswith("_")]
    for full in names:
        try:
            importlib.import_module(full)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"built-in module {full} failed to import: {exc}") from exc


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
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while it imports: the process stops, the plugin is not at fault
        del sys.modules[module_name]
        raise
    except BaseException as exc:
        del sys.modules[module_name]
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError):
            detail = f"SyntaxError at line {exc.lineno}: {exc.msg}"
        raise RegistryError(f"plugin {path} failed to import ({detail})") from exc
    _loaded_files.add(file)

"""Validation of config values with pydantic: the declared type and constraints of every field, as one-line errors.

Config dataclasses declare their constraints on the fields (``r: Annotated[int, Gt(0)] = 8``, with
``annotated_types`` markers, which pydantic reads natively) and call :func:`validate_fields` from ``__post_init__``,
so a config is checked however it is built (``mtbench run``, a test, a plugin). The checks are strict — an ``int``
field takes no bool, string or float, a ``bool`` field only true/false, a ``str`` field only text — and reject NaN
and ±inf in every float. Two conveniences are kept on top of pydantic: a list or a comma-separated string is
accepted where a tuple is declared (``--set method.target_modules=q,v``).

Errors are :class:`~mtbench.errors.ConfigError` naming the key, what is allowed and what was given, e.g.
``train.lr must be a finite number, got nan`` or ``method.r must be > 0, got 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from .errors import ConfigError


STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", arbitrary_types_allowed=True)
"""pydantic settings of every config schema: strict types, finite floats, no unknown keys."""

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = 6
_short.maxdict, _short.maxlevel = 4, 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a line's worth (a huge or deeply nested value never floods, or stalls, an error message)."""
    return _short.repr(value)


def _as_tuple(value: Any) -> Any:
    """A YAML list, or ``"a,b"`` from ``--set``, where a tuple is declared (strict pydantic takes tuples only)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _strip(hint: Any) -> tuple[Any, list[Any]]:
    """(bare type, constraint metadata) of a possibly ``Annotated`` hint."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        inner, more = _strip(base)
        return inner, [*more, *meta]
    return hint, []


def _lenient(hint: Any) -> Any:
    """``hint`` with :func:`_as_tuple` in front of every tuple (also inside Optional / Annotated)."""
    base, meta = _strip(hint)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        base = typing.Union[tuple(_lenient(a) for a in typing.get_args(base))]  # noqa: UP007 - built from a tuple
    elif origin is tuple:
        base = Annotated[base, BeforeValidator(_as_tuple)]
    return Annotated[(base, *meta)] if meta else base


@functools.cache
def _adapter(cls: type) -> tuple[TypeAdapter[Any], dict[str, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return keyed_adapter(fields, f"{cls.__name__}Fields"), fields


def validate_fields(obj: Any, section: str) -> None:
    """Check every field of the dataclass instance ``obj`` against its declared type and constraints, in place.

    Normalised values (a list to a tuple, an int to a float) are written back to the frozen instance.

    Raises:
        ConfigError: the first bad field, as ``<section>.<field> ...`` (one line).
    """
    adapter, hints = _adapter(type(obj))  # type: ignore[arg-type]  # classes hash; mypy types type[Any] as unhashable
    values = {name: getattr(obj, name) for name in hints}
    clean = validate(adapter, values, section, hints)
    for name, value in clean.items():
        if value is not values[name]:
            object.__setattr__(obj, name, value)


def validate(adapter: TypeAdapter[Any], values: Mapping[str, Any], section: str, hints: Mapping[str, Any]) -> Any:
    """``adapter.validate_python(values)``, a :class:`pydantic.ValidationError` becoming a one-line ConfigError."""
    try:
        return adapter.validate_python(dict(values))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A value that fails every member of a union gives one error per member: report the one that says most.
        first = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
        best = min(first, key=lambda e: 0 if e["type"] in _TELLING else 1)
        raise ConfigError(describe(best, section, hints, values)) from None


def describe(error: Mapping[str, Any], section: str, hints: Mapping[str, Any],
             values: Mapping[str, Any] | None = None) -> str:
    """One line for one pydantic error: the key, what is allowed, what was given."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tuple[", "union[")))]
    name = str(loc[0]) if loc else ""
    key = f"{section}.{name}" if section else name
    key += "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    given = short_repr(error.get("input"))
    kind, ctx = error["type"], error.get("ctx") or {}
    hint = hints.get(name, Any)
    if kind == "finite_number":
        return f"{key} must be a finite number, got {given}"
    if kind in _BOUNDS or kind == "multiple_of":
        return f"{key} must be {allowed(hint, loc[1:]) or _bound(kind, ctx)}, got {given}"
    if kind == "literal_error":
        return f"{key}={given} is not allowed; choose one of {_choices(hint, loc[1:])}"
    if kind in ("too_short", "too_long", "missing"):
        whole = f"{section}.{name}" if section else name
        value = (values or {}).get(name, error.get("input"))
        bound = {"too_short": ("at least", "min_length"), "too_long": ("at most", "max_length")}.get(kind)
        if bound and bound[1] in ctx:
            count = ctx[bound[1]]
            return (f"{whole}={short_repr(value)} has {ctx.get('actual_length', '?')} entries; expected {bound[0]} "
                    f"{count} ({type_name(hint)})")
        return f"{whole}={short_repr(value)} has the wrong length; expected {type_name(hint)}"
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"{key}={given} has the wrong type; expected {type_name(hint)}"


_TELLING = {"finite_number", "literal_error", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
            "multiple_of", "too_short", "too_long"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _bound(kind: str, ctx: Mapping[str, Any]) -> str:
    if kind == "multiple_of":
        return f"a multiple of {ctx.get('multiple_of')}"
    name, op = _BOUNDS[kind]
    return f"{op} {ctx.get(name)}"


def _at(hint: Any, path: list[Any]) -> Any:
    """The hint of the element at ``path`` (tuple positions) inside ``hint``."""
    for step in path:
        base, _ = _strip(hint)
        args = [a for a in typing.get_args(base) if a is not type(None)]
        if typing.get_origin(base) in (typing.Union, types.UnionType) and len(args) == 1:
            base, _ = _strip(args[0])
            args = list(typing.get_args(base))
        if not isinstance(step, int) or typing.get_origin(base) is not tuple or not args:
            return hint
        hint = args[0] if args[-1] is Ellipsis else args[min(step, len(args) - 1)]
    return hint


def allowed(hint: Any, path: list[Any]) -> str:
    """Every declared bound of the value at ``path`` in words: ``>= 0 and < 1``."""
    hint = _at(hint, path)
    base, meta = _strip(hint)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(base) if arg is not type(None)]
        if len(members) > 1:  # each kind with its own bounds: "int >= 1 or float > 0 and <= 1"
            bounds = [allowed(m, []) for m in members]
            kinds = [f"{type_name(_strip(m)[0])} {b}".strip() for m, b in zip(members, bounds, strict=True)]
            return " or ".join(kinds) if any(bounds) else ""
        for arg in members:
            base, meta = _strip(arg)
    parts = []
    for m in meta:
        items = m if isinstance(m, at.Interval) else [m]
        for item in items:
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "a multiple of")):
                if getattr(item, attr, None) is not None:
                    parts.append(f"{op} {getattr(item, attr)}")
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):  # pydantic FieldInfo
            for sub in getattr(m, "metadata", []):
                if getattr(sub, attr, None) is not None:
                    parts.append(f"{op} {getattr(sub, attr)}")
    return " and ".join(dict.fromkeys(parts))


def _choices(hint: Any, path: list[Any]) -> str:
    base, _ = _strip(_at(hint, path))
    found: list[Any] = []
    stack = [base]
    while stack:
        h, _ = _strip(stack.pop(0))
        if typing.get_origin(h) is Literal:
            found.extend(typing.get_args(h))
        elif typing.get_origin(h) in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(h))
    return ", ".join(dict.fromkeys(map(str, found)))


def type_name(hint: Any) -> str:
    """A hint in words: ``int``, ``float | None``, ``tuple[str, ...]``."""
    base, _ = _strip(hint)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(base))
    if base is type(None):
        return "None"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        return "tuple[" + ", ".join("..." if a is Ellipsis else type_name(a) for a in args) + "]"
    if typing.get_origin(base) is not None:
        return str(base).replace("typing.", "")
    return getattr(base, "__name__", None) or str(base).replace("typing.", "")


def keyed_adapter(fields: Mapping[str, Any], name: str) -> TypeAdapter[Any]:
    """A strict adapter for a mapping of the given ``{key: hint}`` (all keys optional, no others)."""
    schema = TypedDict(name, {k: _lenient(v) for k, v in fields.items()}, total=False)  # type: ignore[operator,misc]
    schema.__pydantic_config__ = STRICT  # type: ignore[attr-defined]
    return TypeAdapter(schema)

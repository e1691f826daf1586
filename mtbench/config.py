"""Experiment configuration: defaults, then the task's profile, then a YAML file, then ``--set key=value``.

Every section is validated against a dataclass (``method``, ``task``, ``train``) or against the Lightning Trainer's
signature (``trainer``); unknown keys and ill-typed values are :class:`ConfigError` with a did-you-mean line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, did_you_mean
from .interfaces import LoaderConfig
from .registry import methods, tasks
from .tracking import flatten, protocol_id, safe_params


SECTIONS = ("method", "task", "train", "trainer")
# Lightning Trainer arguments mtbench sets itself (logging, callbacks); a user value would be silently lost.
_RESERVED_TRAINER_KEYS = {"logger", "callbacks", "default_root_dir", "enable_checkpointing"}
DEFAULT_TRAINER: dict[str, Any] = {
    "max_steps": 100,
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoaderConfig):
    """Optimisation and evaluation settings shared by every method and task."""

    lr: float = 1e-3
    """Base learning rate (AdamW)."""
    weight_decay: float = 0.01
    """Weight decay of 2-D+ parameters (the method's ``param_groups`` decides which)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent in linear warm-up (ignored when ``warmup_steps`` > 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps; 0 uses ``warmup_ratio``."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of storing them: less memory for
    about a third more compute (transformers backbones)."""
    on_nonfinite_loss: Literal["fail", "skip"] = "fail"
    """A NaN/Inf loss stops the run as FAILED (``fail``) or the step is skipped (``skip``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ConfigError("train.warmup_ratio must be in [0, 1) and train.warmup_steps >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class Experiment:
    """A fully resolved experiment: registered classes, frozen configs and Trainer arguments."""

    method_name: str
    task_name: str
    profile: str
    seed: int
    method_cls: Any
    task_cls: Any
    method: Any
    task: Any
    train: TrainConfig
    trainer: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what is logged and hashed)."""
        return {
            "method": {"name": self.method_name, **_plain(dataclasses.asdict(self.method))},
            "task": {"name": self.task_name, "version": self.task_cls.version,
                     **_plain(dataclasses.asdict(self.task))},
            "train": _plain(dataclasses.asdict(self.train)),
            "trainer": _plain(self.trainer),
            "profile": self.profile,
            "seed": self.seed,
        }

    def method_config_id(self) -> str:
        """Short hash of the method's configuration: runs sharing it (across seeds) form one leaderboard row."""
        return _digest(self.as_dict()["method"])

    def protocol_id(self) -> str:
        """Short hash of all but the method's config and the seed (see :func:`~mtbench.tracking.protocol_id`)."""
        return protocol_id(safe_params(flatten(self.as_dict())))

    def config_id(self) -> str:
        """Short hash of everything but the seed: identifies a sweep cell."""
        data = self.as_dict()
        data.pop("seed")
        return _digest(data)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``["method.r=16", "trainer.max_steps=5"]`` -> nested dict; values are parsed as YAML scalars or lists."""
    nested: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        section, _, sub = key.partition(".")
        if section not in SECTIONS or not sub:
            raise ConfigError(f"--set key '{key}' must start with one of {', '.join(s + '.' for s in SECTIONS)}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}' ({exc.__class__.__name__})") from exc
        nested.setdefault(section, {})[sub] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML file (sections method/task/train/trainer, optional profile and seed)."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(data) - {*SECTIONS, "profile", "seed"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"config file {path}: " + did_you_mean(key, [*SECTIONS, "profile", "seed"], "section"))
    return data


def resolve(
    method: str | None,
    task: str | None,
    profile: str | None = None,
    seed: int | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
) -> Experiment:
    """Merge defaults, profile, file and ``--set`` overrides into a validated :class:`Experiment`."""
    file = load_yaml(config_file) if config_file else {}
    overrides = parse_sets(sets or [])
    method = method or file.get("method", {}).get("name")
    task = task or file.get("task", {}).get("name")
    if not method or not task:
        raise ConfigError("both a method and a task are required (--method M --task T, or method.name/task.name)")
    method_cls, task_cls = methods.get(method), tasks.get(task)
    profile = profile or file.get("profile") or "smoke"
    if profile not in task_cls.profiles:
        raise ConfigError(did_you_mean(profile, task_cls.profiles, f"profile of task '{task}'"))
    merged: dict[str, dict[str, Any]] = {"method": {}, "task": {}, "train": {}, "trainer": dict(DEFAULT_TRAINER)}
    for layer in (task_cls.profiles[profile], file, overrides):
        for section in SECTIONS:
            merged[section].update({k: v for k, v in (layer.get(section) or {}).items() if k != "name"})
    if "subtasks" in merged["task"] and not merged["task"]["subtasks"]:
        raise ConfigError(f"task.subtasks is empty; name at least one of task '{task}' (see `mtbench ls tasks`)")
    method_cfg = build_dataclass(method_cls.config_cls, merged["method"], "method")
    task_cfg = build_dataclass(task_cls.config_cls, merged["task"], "task")
    train = build_dataclass(TrainConfig, merged["train"], "train")
    train.weights_of(task_cls.selected_subtasks(task_cfg))  # a misspelt subtask fails here, not after loading data
    return Experiment(
        method_name=method,
        task_name=task,
        profile=profile,
        seed=int(seed if seed is not None else file.get("seed", 0)),
        method_cls=method_cls,
        task_cls=task_cls,
        method=method_cfg,
        task=task_cfg,
        train=train,
        trainer=check_trainer_kwargs(merged["trainer"]),
    )


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate a config dataclass from ``values``, rejecting unknown keys and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(did_you_mean(f"{section}.{key}", [f"{section}.{n}" for n in fields], "key"))
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (bool, int, float, str, Literal, tuple, Optional) and convert it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(hint)}")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        if args and args[-1] is not Ellipsis and len(args) != len(items):
            raise ConfigError(f"{key}={value!r} needs exactly {len(args)} values")
        item_types = [args[0]] * len(items) if (args and args[-1] is Ellipsis) else list(args or [Any] * len(items))
        return tuple(coerce(v, t, key) for v, t in zip(items, item_types))
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-2" (no dot) as a string; accept any spelling Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_trainer_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """Accept only arguments of ``lightning.pytorch.Trainer`` that mtbench does not set itself."""
    from lightning.pytorch import Trainer

    allowed = set(inspect.signature(Trainer.__init__).parameters) - {"self"} - _RESERVED_TRAINER_KEYS
    for key in values:
        if key not in allowed:
            raise ConfigError(did_you_mean(f"trainer.{key}", [f"trainer.{a}" for a in allowed], "key"))
    return dict(values)


def config_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, attribute docstring) of a config dataclass, for ``mtbench ls`` and the docs."""
    docs = _attribute_docstrings(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        out.append((f.name, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return out


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right below a field) of ``cls`` and its bases."""
    import ast
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if is_field and is_doc and isinstance(nxt.value.value, str):  # type: ignore[attr-defined]
                docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore[attr-defined]
    return docs

"""Experiment configuration: defaults, then the task's profile, then a YAML file, then ``--set key=value``.

Every section is validated with pydantic (:mod:`mtbench.schema`) against a dataclass whose fields declare their types
and constraints (``method``, ``task``, ``train``) or against the Lightning Trainer's signature (``trainer``); unknown
keys get a did-you-mean, ill-typed, out-of-range and non-finite values a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Interval
from pydantic import TypeAdapter, ValidationError

from .errors import ConfigError, did_you_mean
from .interfaces import LoaderConfig
from .registry import methods, tasks
from .schema import STRICT, keyed_adapter, short_repr, type_name, validate
from .tracking import flatten, protocol_id, safe_params


SECTIONS = ("method", "task", "train", "trainer")
# Lightning Trainer arguments mtbench sets itself (logging, callbacks); a user value would be silently lost.
_RESERVED_TRAINER_KEYS = {"logger", "callbacks", "default_root_dir", "enable_checkpointing"}
# Lightning's signature types these counts and intervals without their ranges; out of range, they fail mid-run (a
# division by zero), so the ranges Lightning means are checked with the rest of the configuration.
_TRAINER_BOUNDS: dict[str, Any] = {
    "accumulate_grad_batches": Annotated[int, Ge(1)],
    "log_every_n_steps": Annotated[int, Ge(1)] | None,
    "check_val_every_n_epoch": Annotated[int, Ge(1)] | None,
    "val_check_interval": Annotated[int, Ge(1)] | Annotated[float, Interval(gt=0, le=1)] | None,
    "max_steps": Annotated[int, Ge(-1)],
    "min_steps": Annotated[int, Ge(0)] | None,
    "max_epochs": Annotated[int, Ge(-1)] | None,
    "min_epochs": Annotated[int, Ge(0)] | None,
    "num_sanity_val_steps": Annotated[int, Ge(-1)] | None,
}
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


_Beta = Annotated[float, Interval(ge=0, lt=1)]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoaderConfig):
    """Optimisation and evaluation settings shared by every method and task."""

    lr: Annotated[float, Gt(0)] = 1e-3
    """Base learning rate (AdamW)."""
    weight_decay: Annotated[float, Ge(0)] = 0.01
    """Weight decay of 2-D+ parameters (the method's ``param_groups`` decides which)."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    eps: Annotated[float, Gt(0)] = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.06
    """Fraction of the steps spent in linear warm-up (ignored when ``warmup_steps`` > 0)."""
    warmup_steps: Annotated[int, Ge(0)] = 0
    """Linear warm-up steps; 0 uses ``warmup_ratio``."""
    min_lr_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0
    """Final learning rate as a fraction of ``lr``."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of storing them: less memory for
    about a third more compute (transformers backbones)."""
    on_nonfinite_loss: Literal["fail", "skip"] = "fail"
    """A NaN/Inf loss stops the run as FAILED (``fail``) or the step is skipped (``skip``)."""


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a config file is concerned (hand-written: PyYAML has no such options).

    - a key given twice in one mapping is an error (PyYAML keeps the last silently);
    - anchors and aliases are refused: a config never needs them, and a "billion laughs" file of nested aliases
      would expand into an exponentially large value wherever it is printed or walked;
    - ``1e-3`` is a float as in YAML 1.2 (YAML 1.1 wants ``1.0e-3``).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not supported",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {short_repr(key)} is given twice",
                                                            key_node.start_mark)
                seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (``line 3, column 5``)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``["method.r=16", "trainer.max_steps=5"]`` -> nested dict; values are parsed as YAML scalars or lists."""
    nested: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {short_repr(item)}")
        section, _, sub = key.partition(".")
        if key in ("seed", "profile"):  # top-level in a config file, options of their own on the command line
            raise ConfigError(f"--set {key}=...: {key} has its own option, --{key} {key.upper()}")
        if section not in SECTIONS or not sub:
            raise ConfigError(f"--set key {short_repr(key)} must start with one of "
                              f"{', '.join(s + '.' for s in SECTIONS)}")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {short_repr(raw)} ({_yaml_error(exc)})") from exc
        if sub in nested.get(section, {}):
            raise ConfigError(f"--set {key} is given twice")
        nested.setdefault(section, {})[sub] = value
    return nested


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in the file ``path`` (empty: ``{}``), read with the strict loader (:class:`_Loader`).

    Raises:
        ConfigError: naming ``what`` and the file: unreadable, not UTF-8, not YAML, a repeated key, an anchor/alias.
    """
    try:
        return _yaml(Path(path).read_bytes().decode("utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_error(exc)}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML file (sections method/task/train/trainer, optional profile and seed).

    Raises:
        ConfigError: unreadable, not UTF-8, not YAML, a repeated key, an anchor/alias, an unknown section, a section
            that is not a mapping.
    """
    data = read_yaml(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(map(str, data)) - {*SECTIONS, "profile", "seed"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"config file {path}: " + did_you_mean(key, [*SECTIONS, "profile", "seed"], "section"))
    for section in SECTIONS:
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ConfigError(f"config file {path}: section '{section}' must be a mapping of keys to values, "
                              f"got {short_repr(data[section])}")
        if not all(isinstance(k, str) for k in data.get(section) or {}):
            key = next(k for k in data[section] if not isinstance(k, str))
            raise ConfigError(f"config file {path}: key {short_repr(key)} of section '{section}' is not a name")
    if "profile" in data and not isinstance(data["profile"], str):
        raise ConfigError(f"config file {path}: profile={short_repr(data['profile'])} must be a profile name")
    for section in ("method", "task"):
        name = (data.get(section) or {}).get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"config file {path}: {section}.name={short_repr(name)} must be a registered name")
    return data


SEED = TypeAdapter(Annotated[int, Interval(ge=0, le=2**32 - 1)], config=STRICT)
"""Seeds: what ``lightning.seed_everything`` (numpy) accepts."""


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer in [0, 2**32 - 1]; else :class:`ConfigError`."""
    try:
        return int(SEED.validate_python(seed))
    except ValidationError:
        raise ConfigError(f"seed={short_repr(seed)} must be an integer in [0, {2**32 - 1}]") from None


def resolve(
    method: str | None,
    task: str | None,
    profile: str | None = None,
    seed: int | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
) -> Experiment:
    """Merge defaults, profile, file and ``--set`` overrides into a validated :class:`Experiment`.

    Raises:
        ConfigError: any unknown key, ill-typed or out-of-range value (see :mod:`mtbench.schema`).
        KeyError: an unknown method, task (:class:`~mtbench.registry.Registry` did-you-mean).
    """
    file = load_yaml(config_file) if config_file else {}
    overrides = parse_sets(sets or [])
    method = method or (file.get("method") or {}).get("name")
    task = task or (file.get("task") or {}).get("name")
    if not method or not task:
        raise ConfigError("both a method and a task are required (--method M --task T, or method.name/task.name)")
    method_cls, task_cls = methods.get(method), tasks.get(task)
    profile = profile or file.get("profile") or "smoke"
    if profile not in task_cls.profiles:
        raise ConfigError(did_you_mean(profile, task_cls.profiles, f"profile of task '{task}'"))
    merged: dict[str, dict[str, Any]] = {"method": {}, "task": {}, "train": {}, "trainer": dict(DEFAULT_TRAINER)}
    shared = task_cls.profiles[profile]
    # A profile's ``methods`` entry gives per-method settings on top of its shared ones: each method at the budget
    # (rank, scale, dropout, ...) its paper compared it at. Then the file, then ``--set``.
    per_method = (shared.get("methods") or {}).get(method) or {}
    for layer in (shared, per_method, file, overrides):
        for section in SECTIONS:
            merged[section].update({k: v for k, v in (layer.get(section) or {}).items() if k != "name"})
    if "subtasks" in merged["task"] and not merged["task"]["subtasks"]:
        raise ConfigError(f"task.subtasks is empty; name at least one of task '{task}' (see `mtbench ls tasks`)")
    method_cfg = build_dataclass(method_cls.config_cls, merged["method"], "method")
    task_cfg = build_dataclass(task_cls.config_cls, merged["task"], "task")
    train = build_dataclass(TrainConfig, merged["train"], "train")
    def user_gave(section: str, key: str) -> bool:
        return any(key in (layer.get(section) or {}) for layer in (file, overrides))

    if method_cfg.lr is not None and user_gave("train", "lr") and not user_gave("method", "lr"):
        # The runner trains at method.lr where it is set: a train.lr the user gave would be ignored without a word
        # (in a sweep, cells that differ only in it would train alike).
        raise ConfigError(f"train.lr={train.lr:g} has no effect on method '{method}': the '{profile}' profile of task "
                          f"'{task}' sets its method.lr={method_cfg.lr:g}, which replaces train.lr; set method.lr "
                          "instead")
    train.weights_of(task_cls.selected_subtasks(task_cfg))  # a misspelt subtask fails here, not after loading data
    return Experiment(
        method_name=method,
        task_name=task,
        profile=profile,
        seed=check_seed(seed if seed is not None else file.get("seed", 0)),
        method_cls=method_cls,
        task_cls=task_cls,
        method=method_cfg,
        task=task_cfg,
        train=train,
        trainer=check_trainer_kwargs(merged["trainer"]),
    )


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate a config dataclass from ``values``: unknown keys get a did-you-mean, and the dataclass's own
    validation (:func:`mtbench.schema.validate_fields`, then its cross-field checks) runs on construction.

    Raises:
        ConfigError: an unknown key, or a value the config rejects.
    """
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in fields:
            raise ConfigError(did_you_mean(f"{section}.{key}", [f"{section}.{n}" for n in fields], "key"))
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section}: {exc}") from exc


@functools.cache
def _trainer_schema() -> tuple[TypeAdapter[Any], dict[str, Any]]:
    """The options of ``lightning.pytorch.Trainer`` with the types its signature declares."""
    from lightning.pytorch import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    params = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    fields = {p: _TRAINER_BOUNDS.get(p, hints.get(p, Any)) for p in params if p not in _RESERVED_TRAINER_KEYS}
    return keyed_adapter(fields, "TrainerOptions"), fields


def check_trainer_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """Accept only arguments of ``lightning.pytorch.Trainer`` that mtbench does not set itself, each of the type
    the Trainer's signature declares (strict: ``max_steps`` takes an int, not a bool or a string; finite floats).

    Raises:
        ConfigError: an unknown or reserved key (did-you-mean), or an ill-typed value.
    """
    adapter, fields = _trainer_schema()
    for key in values:
        if key not in fields:
            raise ConfigError(did_you_mean(f"trainer.{key}", [f"trainer.{a}" for a in fields], "key"))
    validate(adapter, values, "trainer", fields)
    return dict(values)


def config_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type with its declared bounds, default, attribute docstring) of a config dataclass, for ``mtbench ls``
    and the docs: ``("r", "int (> 0)", 8, "Rank of ...")``."""
    from .schema import allowed

    docs = _attribute_docstrings(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        bounds = allowed(hints[f.name], [])
        kind = type_name(hints[f.name]) + (f" ({bounds})" if bounds else "")
        out.append((f.name, kind, default, docs.get(f.name, "")))
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

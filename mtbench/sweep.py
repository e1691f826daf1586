"""Sweeps: methods × tasks × method-config grid × seeds, each cell one tracked run, resumable and shardable.

A cell is skipped when the store already holds a FINISHED run with its result (``result.json``) with the same
resolved config (``mtbench.config_id`` tag, which hashes everything but the seed) and seed; a cell whose run has no
result (it died, failed, or was recorded FINISHED without one by an older version) runs again. ``--shard i/n``
keeps the cells whose position in the grid is ``i`` modulo ``n``, so ``n`` machines sharing one tracking server
split the grid without overlap. A failed cell does
not stop the sweep; an interrupted one (Ctrl-C, SIGTERM) does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, nearest


FILE_KEYS = ("methods", "tasks", "seeds", "profile", "set", "grid")


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep: names, seeds, the profile, overrides applied to every cell and a grid of overrides."""

    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    profile: str | None = None
    sets: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(key, values) pairs; each value is a YAML scalar or flow collection, as after ``--set key=``."""


@dataclass(frozen=True)
class Cell:
    """One combination: a position in the grid, what to run, and the overrides that define it."""

    index: int
    method: str
    task: str
    seed: int
    sets: tuple[str, ...]
    grid_point: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        point = f" [{', '.join(self.grid_point)}]" if self.grid_point else ""
        return f"{self.method} on {self.task} seed {self.seed}{point}"


@dataclass
class SweepReport:
    """What a sweep did, cell by cell."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    would_run: list[str] = field(default_factory=list)
    """Cells a dry run would train (a dry run trains nothing)."""
    interrupted: bool = False


def split_values(text: str) -> list[str]:
    """``"4,8"`` -> ``["4", "8"]``; commas inside brackets or quotes stay (``"[q,v],[k]"`` -> two values)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return [v for v in values if v]


def parse_grid(items: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``["method.r=4,8"]`` -> ``(("method.r", ("4", "8")),)``."""
    grid = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = tuple(split_values(raw))
        if not sep or not key or not values:
            raise ConfigError(f"--grid expects key=v1,v2,..., got '{item}'")
        grid.append((key.strip(), values))
    return tuple(grid)


def qualities(metrics: dict[str, float]) -> str:
    """The qualities a board ranks by, where logged: ``val/avg=0.5348`` and, for tasks with single-task baselines,
    ``val/delta_m=...`` (empty when neither is)."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("val/avg", "val/delta_m"))


def outcome_line(outcome: Any) -> str:
    """``STATUS run ID`` with the run's :func:`qualities` and the error where there is one."""
    summary = qualities(outcome.metrics)
    return (f"{outcome.status} run {outcome.run_id}" + (f" {summary}" if summary else "")
            + (f" ({outcome.error})" if outcome.error else ""))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; ``None`` -> ``(0, 1)``."""
    if not text:
        return 0, 1
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard expects i/n with 0 <= i < n, got '{text}'")
    return i, n


def _names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else split_values(str(value))
    return tuple(str(v).strip() for v in items if str(v).strip())


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML file (keys: methods, tasks, seeds, profile, set, grid)."""
    from .config import read_yaml
    from .registry import did_you_mean

    data = read_yaml(path, "sweep file")  # the config files' strict reader: no repeated keys, no aliases
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping with keys {', '.join(FILE_KEYS)}")
    for key in data:
        if key not in FILE_KEYS:
            raise ConfigError(f"sweep file {path}: " + did_you_mean(str(key), FILE_KEYS, "key"))
    return data


def _yaml_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def make_spec(file: dict[str, Any] | None = None, methods: str | None = None, tasks: str | None = None,
              seeds: str | None = None, profile: str | None = None, sets: Sequence[str] = (),
              grid: Sequence[str] = ()) -> SweepSpec:
    """Merge a sweep file with command-line values (names, seeds and profile from the command line win; ``set``
    and ``grid`` entries add up, a command-line grid key replacing the file's)."""
    from . import registry

    data = file or {}
    method_names = _names(methods if methods is not None else data.get("methods", ()))
    if method_names == ("all",):
        method_names = tuple(registry.methods.names())
    task_names = _names(tasks if tasks is not None else data.get("tasks", ()))
    if not method_names or not task_names:
        raise ConfigError("a sweep needs methods and tasks (--methods a,b --tasks t, or a --file with both)")
    for name in method_names:
        registry.methods.get(name)
    for name in task_names:
        registry.tasks.get(name)
    from .config import check_seed

    given = _names(seeds if seeds is not None else data.get("seeds", [0]))
    parsed = [_integer(s) for s in given]
    if bad := [s for s, value in zip(given, parsed, strict=True) if value is None]:
        raise ConfigError(f"seeds must be integers in [0, 4294967295], got {', '.join(repr(str(s)) for s in bad)}")
    seed_list = tuple(check_seed(value) for value in parsed if value is not None)
    file_sets = data.get("set") or {}
    file_sets = [f"{k}={_yaml_value(v)}" for k, v in file_sets.items()] if isinstance(file_sets, dict) \
        else [str(s) for s in file_sets]
    file_grid = data.get("grid") or {}
    if not isinstance(file_grid, dict):
        raise ConfigError("sweep file: 'grid' must map keys to lists of values, e.g. {method.r: [4, 8]}")
    merged = {k: tuple(_yaml_value(v) for v in (vs if isinstance(vs, list) else [vs])) for k, vs in file_grid.items()}
    merged.update(dict(parse_grid(grid)))
    return SweepSpec(method_names, task_names, seed_list or (0,), profile or data.get("profile"),
                     (*file_sets, *sets), tuple(merged.items()))


def _integer(value: Any) -> int | None:
    """``int(value)``, or ``None`` where ``int`` refuses it."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fields(section: str, name: str) -> set[str]:
    """Field names of the config of method or task ``name`` (``section``: ``"method"`` or ``"task"``)."""
    from . import registry

    entries = registry.methods if section == "method" else registry.tasks
    return {f.name for f in dataclasses.fields(entries.get(name).config_cls)}


def _applies(key: str, method: str, task: str) -> bool:
    """Whether an override ``key`` applies to this method and task (``method.r`` only to methods with an ``r``)."""
    section, _, name = key.partition(".")
    if section in ("method", "task"):
        return name in _fields(section, method if section == "method" else task)
    return True


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the sweep in a fixed order: task, method, grid point, seed.

    ``method.*`` and ``task.*`` keys (in ``sets`` and ``grid``) apply only where the method's or task's config has
    that field, so ``--methods lora,full_ft --grid method.r=4,8`` gives two LoRA configs and one full fine-tuning.
    A key that applies to none of the swept methods or tasks is an error.
    """
    keys = [k.partition("=")[0] for k in spec.sets] + [k for k, _ in spec.grid]
    for key in keys:
        if not any(_applies(key, m, t) for m in spec.methods for t in spec.tasks):
            section, _, name = key.partition(".")
            hint = ""
            if section in ("method", "task"):
                swept = spec.methods if section == "method" else spec.tasks
                close = nearest(name, set().union(*(_fields(section, n) for n in swept)))
                hint = f"; did you mean '{section}.{close}'?" if close else ""
            raise ConfigError(f"override '{key}' applies to none of the swept {section}s{hint}")
    cells: list[Cell] = []
    for task in spec.tasks:
        for method in spec.methods:
            sets = tuple(s for s in spec.sets if _applies(s.partition("=")[0], method, task))
            axes = [[f"{k}={v}" for v in values] for k, values in spec.grid if _applies(k, method, task)]
            for point in itertools.product(*axes):
                for seed in spec.seeds:
                    cells.append(Cell(len(cells), method, task, seed, (*sets, *point), tuple(point)))
    return cells


def shard(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count`` (round robin over the grid order, so shards get similar mixes)."""
    return [c for c in cells if c.index % count == index]


def finished_run(mlflow: Any, experiment_id: str | None, config_id: str, seed: int) -> str | None:
    """Id of a FINISHED run with this resolved config and seed that holds its ``result.json``, if the store has one."""
    if experiment_id is None:
        return None
    runs = mlflow.search_runs(
        [experiment_id], max_results=20,
        filter_string=(f"tags.`mtbench.config_id` = '{config_id}' and tags.`mtbench.seed` = '{seed}' "
                       "and attributes.status = 'FINISHED'"),
    )
    for run in runs:
        if any(item.path == "result.json" for item in mlflow.list_artifacts(run.info.run_id)):
            return run.info.run_id
    return None


def run_sweep(spec: SweepSpec, uri: str | None = None, shard_of: tuple[int, int] = (0, 1), dry_run: bool = False,
              progress: bool = False, say: Callable[[str], None] = print) -> SweepReport:
    """Resolve every cell first (a config error stops the sweep before anything trains), then run the cells of
    this shard that have no FINISHED run yet, one after the other, in this process."""
    from .config import resolve
    from .execute import run_experiment
    from .tracking import EXPERIMENT, client, tracking_uri

    cells = shard(expand(spec), *shard_of)
    resolved = [(cell, resolve(cell.method, cell.task, spec.profile, cell.seed, None, list(cell.sets)))
                for cell in cells]
    uri = tracking_uri(uri)
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    exp_id = experiment.experiment_id if experiment is not None else None
    report = SweepReport()
    total = len(resolved)
    say(f"sweep: {total} cells in shard {shard_of[0]}/{shard_of[1]}" + (" (dry run)" if dry_run else ""))
    for number, (cell, exp) in enumerate(resolved, 1):
        head = f"[{number}/{total}] {cell.label}"
        done = finished_run(mlflow, exp_id, exp.config_id(), cell.seed)
        if done:
            say(f"{head}: skip, already FINISHED as run {done}")
            report.skipped.append(cell.label)
            continue
        if dry_run:
            # Two ids: the cell's (all but the seed; what a rerun skips by) and the method config the board's
            # "config" column shows (the row its runs join).
            say(f"{head}: would run (cell {exp.config_id()}, board config {exp.method_config_id()})")
            report.would_run.append(cell.label)
            continue
        try:
            outcome = run_experiment(exp, uri, progress=progress)
        except KeyboardInterrupt:
            report.interrupted = True
            say(f"{head}: interrupted; {total - number + 1} cells not finished")
            break
        except Exception as exc:  # a broken store or plugin must not end the sweep
            say(f"{head}: FAILED before the run was recorded: {exc.__class__.__name__}: {exc}")
            report.failed.append(f"{cell.label}: {exc.__class__.__name__}: {exc}")
            continue
        exp_id = exp_id or mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        say(f"{head}: {outcome_line(outcome)}")
        if outcome.status == "FINISHED":
            report.finished.append(cell.label)
            if outcome.interrupted:  # the signal came after this cell's evaluation: stop before the next one
                report.interrupted = True
                say(f"sweep interrupted; {total - number} cells not started")
                break
        elif outcome.status == "KILLED":
            report.failed.append(f"{cell.label}: KILLED ({outcome.error})")
            report.interrupted = True
            say(f"sweep interrupted; {total - number} cells not started")
            break
        else:
            report.failed.append(f"{cell.label}: {outcome.error} (run {outcome.run_id})")
    return report

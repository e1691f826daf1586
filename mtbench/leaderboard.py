"""Turn tracked runs (and exported ``result.json`` files) into a leaderboard: one row per (task, task version, metric
versions, method, method config, profile, device) with mean, std, n and a 95 % confidence interval over seeds, a
paired comparison with a reference method, ranks and Pareto fronts within a comparison group, and provenance.

Runs that did not finish are excluded and counted. Rows measured on different devices, or under different task or
metric versions, are never merged and never ranked against each other. Outputs (``leaderboard.csv``,
``leaderboard.json``, ``LEADERBOARD.md``, ``index.html`` and the Pareto plots) are rendered from the same rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import paired, stats
from .errors import MtbenchError
from .results import read_result, verified
from .tracking import flatten, liveness, load_runs, package_versions, protocol_id, safe_params


SCHEMA = "mtbench.leaderboard/1"
KEYS = ["task", "task_version", "metric_versions", "method", "method_config_id", "profile", "protocol_id",
        "device"]
PERF = ["params/adapter", "params/trainable", "params/total", "perf/train_samples_per_s", "perf/train_tokens_per_s",
        "perf/eval_samples_per_s", "perf/peak_mem_mb", "perf/wall_s", "perf/train_compute_samples_per_s",
        "perf/train_data_wait_share", "perf/skipped_batches"]
QUALITY = "val/avg"
DELTA_M = "val/delta_m"
HEAD = ["row_id", "rank", "task", "device", "profile", "protocol_id", "task_version", "metric_versions", "method",
        "method_config_id", "config_note", "n", "seeds", "failed_seeds", "runs", "quality_metric", "quality_mean",
        "quality_std",
        "quality_ci95", "reference", "ref_config", "ref_diff", "ref_ci_low", "ref_ci_high", "ref_n", "p_value",
        "p_holm", "significant", "mdd", "ref_test", "mcnemar", "pareto_params",
        "pareto_memory", "pareto_throughput"]
TAIL = ["quality_per_seed", "method_config", "git_commits", "versions", "run_ids"]


@dataclass
class Leaderboard:
    """Leaderboard rows plus what went into them and what was left out."""

    rows: pd.DataFrame
    finished: int = 0
    excluded: int = 0
    excluded_detail: str = ""
    metric_columns: list[str] = field(default_factory=list)
    directions: dict[str, bool] = field(default_factory=dict)
    """Metric -> higher is better."""
    rejected: list[str] = field(default_factory=list)
    """One line per result file that failed validation (the file name comes first)."""
    ignored_predictions: list[str] = field(default_factory=list)
    """One line per predictions file left out because it does not match its result's digest (its run still counts;
    its comparisons use the seed-level test)."""
    merged: int = 0
    """Finished runs read from result files (not in the store)."""
    duplicates: int = 0
    """Result files skipped because their run is already counted (same run id)."""
    unverified: int = 0
    """Result files counted without an integrity check (written before result files carried a ``sha256``)."""
    references: dict[str, str] = field(default_factory=dict)
    default_reference: str = stats.DEFAULT_REFERENCE
    generated: str = ""

    def provenance(self) -> dict[str, Any]:
        """What the board was built from and how its statistics are defined."""
        return {
            "generator": {"mtbench": package_versions().get("mtbench", "unknown"), "python": platform.python_version(),
                          "pandas": pd.__version__, "platform": sys.platform},
            "runs": {"finished": self.finished, "excluded": self.excluded, "excluded_detail": self.excluded_detail,
                     "merged_from_result_files": self.merged, "duplicate_result_files": self.duplicates,
                     "unverified_result_files": self.unverified, "rejected_result_files": self.rejected,
                     "ignored_predictions_files": self.ignored_predictions},
            "statistics": {
                "replication": "seed: repeated runs of one seed are averaged into that seed's value "
                               f"(repeats={stats.REPEATS}); n counts the seeds with a finite quality, listed in "
                               "seeds; seeds whose quality is NaN are listed in failed_seeds and count in no "
                               "statistic; runs counts every run of the row",
                "aggregate": "mean and sample std (ddof=1) over the per-seed values of a row",
                "interval": f"{stats.CONFIDENCE:.0%} two-sided Student-t interval of the mean "
                            "(quality_ci95 = half-width)",
                "test": paired.BOOTSTRAP.format(resamples=paired.RESAMPLES) + " where both sides have per-example "
                        "predictions and the quality can be recomputed from them (ref_test says which rows); else "
                        + paired.SEED_LEVEL.format(n="the shared", why="ref_test gives the reason"),
                "multiplicity": "significant is decided on p_holm: the p-values of a comparison group's rows "
                                "against its reference, Holm step-down adjusted (family-wise error at most alpha); "
                                "p_value and the ref_ci interval are unadjusted",
                "minimum_detectable_difference": f"mdd: smallest true difference found at alpha {paired.ALPHA} "
                                                 f"with {paired.POWER:.0%} power at the current n",
                "alpha": stats.ALPHA,
                "default_reference": self.default_reference,
                "references": self.references,
            },
            "comparison_group": stats.GROUP,
            "quality": f"{DELTA_M} where every run of the group has it, else {QUALITY}",
            "pareto_axes": {f"pareto_{n}": {"metric": m, "better": "lower" if low else "higher"}
                            for n, m, low in stats.PARETO_AXES},
        }


def collect_results(folders: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Valid results under ``folders`` (files named ``result.json`` or ``*result.json``, recursively), each with
    its path under ``"_path"``; one line per rejected file (see :func:`~mtbench.results.read_result`); one line
    per predictions file left out (:func:`~mtbench.predictions.matches`)."""
    valid: list[dict[str, Any]] = []
    rejected: list[str] = []
    ignored: list[str] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise MtbenchError(f"--from-results: {folder} is not a folder")
        for path in sorted(root.rglob("*result.json")):
            try:
                result = read_result(path) | {"_path": str(path)}
                result["_predictions"] = _checked_predictions(path, result, ignored)
                valid.append(result)
            except MtbenchError as exc:
                rejected.append(str(exc).splitlines()[0])
    return valid, rejected, ignored


def _checked_predictions(result_path: Path, result: dict[str, Any], problems: list[str]) -> str | None:
    """The predictions file ``result`` names, beside its result file (an export keeps one folder per run), when it
    exists and matches the digest the result records; else ``None``, with a line in ``problems`` on a mismatch."""
    from .predictions import matches

    named = result.get("predictions")
    name = named.get("file") if isinstance(named, dict) else None
    path = result_path.parent / name if isinstance(name, str) and name else None
    if path is None or not path.is_file():
        return None
    try:
        problem = matches(path, result)
    except OSError as exc:
        problem = f"{path}: unreadable ({exc.__class__.__name__}); the run's comparisons use the seed-level test"
    if problem:
        problems.append(problem)
        return None
    return str(path)


def build_leaderboard(uri: str | None, result_dirs: Sequence[str | Path] = (),
                      references: Sequence[str] | None = None) -> Leaderboard:
    """Aggregate the store at ``uri`` (``None``: no store) and the result files under ``result_dirs``."""
    runs = load_runs(uri) if uri else pd.DataFrame()
    now = time.time()
    statuses: list[str] = []
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    digests: dict[str, str] = {}
    ignored_predictions: list[str] = []
    for _, run in runs.iterrows():
        seen.add(run["run_id"])
        if isinstance(run.get("tags.mtbench.result_sha256"), str):
            digests[run["run_id"]] = run["tags.mtbench.result_sha256"]
        if run["status"] == "FINISHED" and pd.notna(run.get("tags.mtbench.task")):
            records.append(_store_record(run, ignored_predictions))
        elif run["status"] == "RUNNING":
            # A RUNNING run whose process is gone (SIGKILL, power loss) is shown as dead, never as in progress.
            statuses.append(liveness("RUNNING", run.get("tags.mtbench.host"), run.get("tags.mtbench.pid"),
                                     run.get("tags.mtbench.heartbeat"), now))
        else:
            statuses.append(run["status"] if run["status"] != "FINISHED" else "without mtbench tags")
    results, rejected, ignored = collect_results(result_dirs)
    merged = duplicates = unverified = 0
    for result in results:
        recorded = digests.get(result["run_id"])
        if recorded and result.get("sha256") != recorded:
            rejected.append(f"{result['_path']}: sha256 differs from the one the store recorded for run "
                            f"{result['run_id']} (the file was edited after it was written)")
            continue
        unverified += not verified(result)
        if result["run_id"] in seen:
            duplicates += 1
            continue
        seen.add(result["run_id"])
        if result["status"] == "FINISHED":
            records.append(_file_record(result))
            merged += 1
        else:
            statuses.append(result["status"])
    default, per_task = stats.parse_references(references)
    _check_references(references or [], default, per_task, records)
    counts = Counter(statuses)
    detail = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: (-counts[s], s)))
    board = Leaderboard(pd.DataFrame(), len(records), len(statuses), detail, rejected=rejected,
                        ignored_predictions=ignored_predictions + ignored, merged=merged,
                        duplicates=duplicates, unverified=unverified, references=per_task, default_reference=default,
                        generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if records:
        board.directions = {k: bool(s.get("higher_is_better", True)) for r in records for k, s in r["specs"].items()}
        board.rows, board.metric_columns = _aggregate(pd.DataFrame.from_records(records), default, per_task)
    return board


def _check_references(given: Sequence[str], default: str, per_task: dict[str, str],
                      records: list[dict[str, Any]]) -> None:
    """A reference named on the command line must name a task and a method the board has rows of: a misspelt one
    would silently leave every group without a reference (no difference, interval or p-value column).

    Raises:
        ConfigError: the first such name, with the nearest one and those available.
    """
    from .errors import ConfigError, did_you_mean

    if not records:
        return
    methods, tasks = {r["method"] for r in records}, {r["task"] for r in records}
    named = [(None, default)] if any("=" not in item for item in given) else []
    for task, method in [*named, *per_task.items()]:
        if task is not None and task not in tasks:
            raise ConfigError(f"--reference: {did_you_mean(task, tasks, 'task')} (the tasks with rows on the board)")
        if method not in methods:
            raise ConfigError(f"--reference: {did_you_mean(method, methods, 'method')} (the methods with rows on the "
                              "board)")


def _base_record(specs: dict[str, Any], **values: Any) -> dict[str, Any]:
    record = {
        **values,
        "metric_versions": ",".join(f"{k}@{v.get('version')}" for k, v in sorted(specs.items())),
        "specs": specs,
        "primary": [k for k, s in specs.items() if s.get("primary")],
    }
    record["device"] = record.get("device") or "unknown"
    return record


def _store_record(run: pd.Series, problems: list[str]) -> dict[str, Any]:
    def tag(name: str) -> str:
        value = run.get(f"tags.mtbench.{name}")
        return str(value) if isinstance(value, str) or pd.notna(value) else ""

    dirty = "+dirty" if tag("git_dirty") == "true" else ""
    record = _base_record(
        _json(tag("metric_specs")), task=tag("task"), task_version=tag("task_version"), method=tag("method"),
        method_config_id=tag("method_config_id"), profile=tag("profile"), device=tag("device"), seed=tag("seed"),
        git_commit=(tag("git_commit") or "unknown")[:10] + dirty, versions=_json(tag("versions")),
        run_id=run["run_id"], predictions=_store_predictions(run, problems),
        **_from_params({k.removeprefix("params."): v for k, v in run.items()
                        if isinstance(k, str) and k.startswith("params.") and isinstance(v, str)}),
    )
    for column, value in run.items():
        if isinstance(column, str) and column.startswith("metrics.") and pd.notna(value):
            record[column.removeprefix("metrics.")] = float(value)
    return record


def _file_record(result: dict[str, Any]) -> dict[str, Any]:
    provenance = result["provenance"]
    dirty = "+dirty" if provenance.get("git_dirty") in (True, "true") else ""
    record = _base_record(
        result["metric_specs"], task=result["task"], task_version=result["task_version"], method=result["method"],
        method_config_id=result["method_config_id"], profile=result["profile"], device=provenance.get("device"),
        seed=str(result["seed"]), git_commit=str(provenance.get("git_commit") or "unknown")[:10] + dirty,
        versions=provenance.get("versions") or {}, run_id=result["run_id"],
        predictions=result.get("_predictions"),
        # Flattened and stringified like the store's params, so a config reads the same from either source.
        **_from_params(safe_params(flatten(result["config"]))),
    )
    # Metric keys are namespaced (``val/...``); anything else could overwrite the record's own fields.
    record.update({k: math.nan if v is None else float(v) for k, v in result["metrics"].items() if "/" in k})
    for section in ("params", "perf"):
        record.update({f"{section}/{k}": float(v) for k, v in result[section].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return record


def _store_predictions(run: pd.Series, problems: list[str]) -> str | None:
    """The run's ``predictions.parquet`` when its artifacts are on this filesystem and it matches the digest its
    ``result.json`` records, else ``None`` (that run's comparisons then fall back to the seed-level test)."""
    uri = str(run.get("artifact_uri") or "")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        return None
    if not uri:
        return None
    try:
        result = read_result(Path(uri) / "result.json")
    except MtbenchError:
        result = {"predictions": {"file": "predictions.parquet"}}  # a pre-digest run: the file as it is
    return _checked_predictions(Path(uri) / "result.json", result, problems)


def _from_params(params: dict[str, str]) -> dict[str, Any]:
    """A record's method config and protocol from a run's logged params. The protocol is computed rather than read
    from the ``mtbench.protocol_id`` tag, so runs logged before that tag existed group the same way."""
    return {"method_config": {k.removeprefix("method."): v for k, v in params.items()
                              if k.startswith("method.") and k != "method.name"},
            "protocol_id": protocol_id(params)}


def _json(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _measured(frame: pd.DataFrame) -> list[str]:
    primaries = sorted({k for keys in frame["primary"] for k in keys})
    deltas = sorted(c for c in frame.columns if isinstance(c, str) and c.startswith("val/") and c.endswith("/delta"))
    return [c for c in dict.fromkeys([*primaries, QUALITY, DELTA_M, *deltas, *PERF]) if c in frame.columns]


def _aggregate(frame: pd.DataFrame, default_ref: str, references: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    measured = _measured(frame)
    # Quality is Δm where every run of the comparison group carries it, else the task average.
    frame["quality_metric"] = QUALITY
    if DELTA_M in frame:
        for _, group in frame.groupby(stats.GROUP, dropna=False):
            if group[DELTA_M].notna().all():
                frame.loc[group.index, "quality_metric"] = DELTA_M
    out, per_seed, runs = [], [], []
    for key, group in frame.groupby(KEYS, sort=True, dropna=False):
        row: dict[str, Any] = dict(zip(KEYS, key))
        row["row_id"] = hashlib.sha256(json.dumps([str(k) for k in key]).encode()).hexdigest()[:12]
        metric = row["quality_metric"] = group["quality_metric"].iloc[0]
        quality = stats.per_seed(group["seed"], group[metric] if metric in group else [math.nan] * len(group))
        # The seed is the unit of replication: n counts seeds with a finite quality, repeats are averaged first.
        row["n"] = len(stats.finite_seeds(quality))
        row["seeds"] = ",".join(stats.finite_seeds(quality))
        row["failed_seeds"] = ",".join(stats.failed_seeds(quality))
        row["runs"] = len(group)
        per_seed.append({s: quality[s] for s in stats.finite_seeds(quality)})
        row["quality_per_seed"] = json.dumps(per_seed[-1], sort_keys=True)
        _put(row, "quality", quality.values())
        for column in measured:
            _put(row, column, stats.per_seed(group["seed"], group[column]).values())
        row["method_config"] = json.dumps(group["method_config"].iloc[0], sort_keys=True)
        row["git_commits"] = ",".join(sorted(set(group["git_commit"])))
        row["versions"] = _versions(group["versions"])
        row["run_ids"] = ",".join(sorted(group["run_id"]))
        out.append(row)
        runs.append(list(zip(group["seed"], group["predictions"])))
    rows = stats.annotate(pd.DataFrame(out), per_seed, default_ref, references)
    rows = stats.adjust_multiplicity(paired.annotate_examples(rows, runs, per_seed))
    rows["config_note"] = _config_notes(rows)
    metric_cols = [f"{c}_{s}" for c in measured for s in ("mean", "std", "ci95")]
    rows = rows[[*HEAD, *metric_cols, *TAIL]]
    rows = rows.sort_values([*stats.GROUP, "rank", "method", "method_config_id"], na_position="last")
    return rows.reset_index(drop=True), measured


def _config_notes(rows: pd.DataFrame) -> list[str]:
    """What tells a row's method config apart from the method's other configs on the board (``r=4``)."""
    configs = [json.loads(c) for c in rows["method_config"]]
    notes = []
    for method, config in zip(rows["method"], configs):
        others = [c for m, c in zip(rows["method"], configs) if m == method]
        keys = sorted({k for c in others for k in c if any(o.get(k) != c.get(k) for o in others)})
        notes.append(", ".join(f"{k}={config.get(k, '–')}" for k in keys))
    return notes


def _put(row: dict[str, Any], name: str, values: Iterable[float]) -> None:
    summary = stats.summarize(values)
    row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_ci95"] = summary.mean, summary.std, summary.ci


def _versions(values: Iterable[dict[str, str]]) -> str:
    seen: dict[str, set[str]] = {}
    for versions in values:
        for package, version in versions.items():
            seen.setdefault(package, set()).add(str(version))
    return ", ".join(f"{p}={'|'.join(sorted(v))}" for p, v in sorted(seen.items()))

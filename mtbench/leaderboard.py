"""Turn tracked runs into a leaderboard: one row per (task, task version, metric versions, method, method config,
profile, device), mean ± std over seeds with n, each subtask's headline metric, the task average, trainable
parameters, throughput, peak memory.

Runs that did not finish are excluded and counted. Rows measured on different devices, or under different task or
metric versions, are never merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .results import atomic_write
from .tracking import EXPERIMENT, client


KEYS = ["task", "task_version", "metric_versions", "method", "method_config_id", "profile", "device"]


@dataclass
class Leaderboard:
    """Leaderboard rows plus what was excluded."""

    rows: pd.DataFrame
    finished: int = 0
    excluded: int = 0
    excluded_detail: str = ""
    metric_columns: list[str] = field(default_factory=list)


def load_runs(uri: str) -> pd.DataFrame:
    """All mtbench runs in the store as one frame (``status``, ``metrics.*``, ``tags.*``)."""
    import mlflow

    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")


def build_leaderboard(uri: str) -> Leaderboard:
    """Aggregate the store at ``uri`` into leaderboard rows."""
    runs = load_runs(uri)
    if runs.empty:
        return Leaderboard(pd.DataFrame())
    done = runs[runs["status"] == "FINISHED"]
    others = runs[runs["status"] != "FINISHED"]["status"].value_counts()
    detail = ", ".join(f"{n} {s}" for s, n in others.items())
    records = [_record(r) for _, r in done.iterrows()]
    frame = pd.DataFrame.from_records(records)
    rows, columns = _aggregate(frame)
    return Leaderboard(rows, len(done), int(others.sum()), detail, columns)


def _record(run: pd.Series) -> dict[str, Any]:
    specs = json.loads(run.get("tags.mtbench.metric_specs") or "{}")
    versions = ",".join(f"{k}@{v['version']}" for k, v in sorted(specs.items()))
    record = {
        "task": run["tags.mtbench.task"], "task_version": run["tags.mtbench.task_version"],
        "metric_versions": versions, "method": run["tags.mtbench.method"],
        "method_config_id": run["tags.mtbench.method_config_id"], "profile": run["tags.mtbench.profile"],
        "device": run.get("tags.mtbench.device") or "unknown", "seed": run["tags.mtbench.seed"],
        "git_commit": str(run.get("tags.mtbench.git_commit", ""))[:10], "run_id": run["run_id"],
        "primary": [k for k, s in specs.items() if s.get("primary")],
    }
    for column, value in run.items():
        if isinstance(column, str) and column.startswith("metrics.") and pd.notna(value):
            record[column.removeprefix("metrics.")] = float(value)
    return record


def _aggregate(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    primaries = sorted({k for keys in frame["primary"] for k in keys})
    perf = ["params/adapter", "params/trainable", "params/total", "perf/train_samples_per_s",
            "perf/train_tokens_per_s", "perf/eval_samples_per_s", "perf/peak_mem_mb", "perf/wall_s"]
    measured = [c for c in [*primaries, "val/avg", *perf] if c in frame.columns]
    out = []
    for key, group in frame.groupby(KEYS, sort=True, dropna=False):
        row: dict[str, Any] = dict(zip(KEYS, key))
        row["n"] = len(group)
        row["seeds"] = ",".join(sorted(group["seed"].astype(str)))
        row["git_commits"] = ",".join(sorted(set(group["git_commit"])))
        for column in measured:
            values = group[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
        out.append(row)
    rows = pd.DataFrame(out)
    if "val/avg_mean" in rows:
        rows = rows.sort_values(["task", "device", "val/avg_mean"], ascending=[True, True, False])
    return rows.reset_index(drop=True), measured


def write_leaderboard(board: Leaderboard, out: str | Path) -> list[Path]:
    """Write ``leaderboard.csv`` (numbers) and ``LEADERBOARD.md`` (mean ± std per task) atomically."""
    folder = Path(out)
    csv_path, md_path = folder / "leaderboard.csv", folder / "LEADERBOARD.md"
    atomic_write(csv_path, board.rows.to_csv(index=False))
    atomic_write(md_path, to_markdown(board))
    return [csv_path, md_path]


def _fmt(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def to_markdown(board: Leaderboard) -> str:
    """One table per task: headline metrics (×100), average, params, throughput, memory, device."""
    lines = ["# mtbench leaderboard", ""]
    if board.rows.empty:
        return "\n".join([*lines, "No finished runs yet.", ""])
    lines.append(f"Mean ± std over seeds (n runs per row). Scores ×100. {board.finished} finished runs; "
                 f"{board.excluded} excluded ({board.excluded_detail or 'none'}).")
    for task, rows in board.rows.groupby("task", sort=True):
        metrics = [c.removesuffix("_mean") for c in rows.columns
                   if c.startswith("val/") and c.endswith("_mean") and c != "val/avg_mean" and rows[c].notna().any()]
        head = ["method", "config", *[m.removeprefix("val/") for m in metrics], "avg", "n", "trainable (M)",
                "% of total", "train samples/s", "peak mem (MB)", "device", "profile", "task v"]
        lines += ["", f"## {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in rows.iterrows():
            share = 100 * r.get("params/trainable_mean", float("nan")) / r.get("params/total_mean", float("nan"))
            cells = [r["method"], r["method_config_id"], *[_fmt(r[f"{m}_mean"], r[f"{m}_std"], 100) for m in metrics],
                     _fmt(r.get("val/avg_mean"), r.get("val/avg_std", 0.0), 100), str(r["n"]),
                     f"{r.get('params/trainable_mean', float('nan')) / 1e6:.3f}", f"{share:.2f}",
                     _fmt(r.get("perf/train_samples_per_s_mean"), r.get("perf/train_samples_per_s_std", 0.0), 1, 1),
                     f"{r.get('perf/peak_mem_mb_mean', float('nan')):.0f}", r["device"], r["profile"],
                     r["task_version"]]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"

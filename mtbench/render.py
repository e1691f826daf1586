"""Render a leaderboard: Markdown tables, Pareto-front plots (PNG), a self-contained HTML page, and the files.

Rendering depends on the leaderboard model (:class:`mtbench.leaderboard.Leaderboard`), never the reverse.

Markdown and HTML share one set of column definitions, so the two show the same numbers with the same rounding.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import stats
from .leaderboard import SCHEMA, Leaderboard
from .reported import ReportedTable, reported_for
from .results import atomic_write_bytes


# --- Rendering: one set of column definitions for Markdown and HTML ------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A displayed column: header, cell text, sort value (HTML ``data-v``) and whether it sorts as a number."""

    key: str
    header: str
    text: Any
    value: Any
    numeric: bool = True


def _scale(metric: str, directions: dict[str, bool]) -> float:
    """Scores (higher is better, in [0, 1]) are shown ×100; errors and deltas as logged."""
    return 100.0 if directions.get(metric, True) and "delta" not in metric else 1.0


def _num(value: Any) -> float:
    return float(value) if value is not None and value is not pd.NA and pd.notna(value) else math.nan


def fmt(mean: Any, std: Any, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (scaled); only the mean when std is undefined (one run); ``–`` when there is no value."""
    mean, std = _num(mean), _num(std)
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _interval(row: pd.Series, scale: float) -> str:
    mean, half = _num(row["quality_mean"]), _num(row["quality_ci95"])
    if math.isnan(mean) or math.isnan(half):
        return "n/a"
    return f"[{(mean - half) * scale:.2f}, {(mean + half) * scale:.2f}]"


def _versus(row: pd.Series, scale: float) -> str:
    if row["significant"] == "ref" or not row["reference"]:
        return "ref" if row["significant"] == "ref" else "–"
    diff = _num(row["ref_diff"])
    if math.isnan(diff):
        return "n/a"
    note = {"no": " (n.s.)", "n/a": " (n/a)"}.get(row["significant"], "")
    return f"{diff * scale:+.2f}{note}"


def _metric_column(metric: str, directions: dict[str, bool]) -> Column:
    scale = _scale(metric, directions)
    name = metric.removeprefix("val/").replace("delta_m", "Δm") + ("" if directions.get(metric, True) else " ↓")
    return Column(metric, name, lambda r: fmt(r.get(f"{metric}_mean"), r.get(f"{metric}_std"), scale),
                  lambda r: r.get(f"{metric}_mean"))


def _columns(rows: pd.DataFrame, board: Leaderboard) -> list[Column]:
    """The columns shown for ``rows``: metrics that have a value in at least one of them."""
    metrics = [m for m in board.metric_columns if m.startswith("val/") and rows[f"{m}_mean"].notna().any()]
    def qscale(r: pd.Series) -> float:
        return _scale(str(r["quality_metric"]), board.directions)

    def share(r: pd.Series) -> float:
        return 100 * _num(r.get("params/trainable_mean")) / _num(r.get("params/total_mean"))

    pareto = [Column(f"pareto_{n}", n[0].upper(), lambda r, n=n: "●" if r[f"pareto_{n}"] else "",
                     lambda r, n=n: int(bool(r[f"pareto_{n}"]))) for n, _, _ in stats.PARETO_AXES]
    # Batches skipped for a non-finite loss (train.on_nonfinite_loss=skip): shown wherever a row has any.
    skipped = [Column("perf/skipped_batches", "skipped batches",
                      lambda r: f"{_num(r.get('perf/skipped_batches_mean')):.1f}",
                      lambda r: r.get("perf/skipped_batches_mean"))] \
        if "perf/skipped_batches_mean" in rows and (rows["perf/skipped_batches_mean"].fillna(0) > 0).any() else []
    return [
        Column("rank", "rank", lambda r: "–" if pd.isna(r["rank"]) else str(r["rank"]), lambda r: r["rank"]),
        Column("method", "method", lambda r: r["method"], lambda r: r["method"], False),
        Column("method_config_id", "config", _config_text, lambda r: r["method_config_id"], False),
        *[_metric_column(m, board.directions) for m in metrics],
        Column("quality_ci95", "95 % CI", lambda r: _interval(r, qscale(r)), lambda r: r["quality_ci95"]),
        Column("ref_diff", "Δ vs ref", lambda r: _versus(r, qscale(r)), lambda r: r["ref_diff"]),
        Column("ref_ci", "Δ 95 % CI", lambda r: _delta_interval(r, qscale(r)), lambda r: r.get("ref_ci_low")),
        Column("p_value", "p", lambda r: "n/a" if math.isnan(_num(r["p_value"])) else f"{r['p_value']:.3f}",
               lambda r: r["p_value"]),
        Column("p_holm", "p Holm", lambda r: "n/a" if math.isnan(_num(r.get("p_holm"))) else f"{r['p_holm']:.3f}",
               lambda r: r.get("p_holm")),
        Column("mdd", "MDD", lambda r: _mdd(r, qscale(r)), lambda r: r.get("mdd")),
        Column("n", "n", lambda r: str(r["n"]), lambda r: r["n"]),
        Column("params/trainable", "trainable (M)", lambda r: f"{_num(r.get('params/trainable_mean')) / 1e6:.3f}",
               lambda r: r.get("params/trainable_mean")),
        Column("share", "% of total", lambda r: f"{share(r):.2f}", share),
        Column("perf/train_samples_per_s", "train samples/s",
               lambda r: fmt(r.get("perf/train_samples_per_s_mean"), r.get("perf/train_samples_per_s_std"), 1, 1),
               lambda r: r.get("perf/train_samples_per_s_mean")),
        Column("perf/peak_mem_mb", "peak mem (MB)", lambda r: f"{_num(r.get('perf/peak_mem_mb_mean')):.0f}",
               lambda r: r.get("perf/peak_mem_mb_mean")),
        *skipped,
        *pareto,
    ]


def _delta_interval(row: pd.Series, scale: float) -> str:
    low, high = _num(row.get("ref_ci_low")), _num(row.get("ref_ci_high"))
    return "–" if math.isnan(low) or math.isnan(high) else f"[{low * scale:+.2f}, {high * scale:+.2f}]"


def _mdd(row: pd.Series, scale: float) -> str:
    value = _num(row.get("mdd"))
    return "–" if math.isnan(value) else f"{value * scale:.2f}"


def _config_text(row: pd.Series) -> str:
    return f"{row['method_config_id']} ({row['config_note']})" if row["config_note"] else str(row["method_config_id"])


def _text(key: str, header: str) -> Column:
    return Column(key, header, lambda r: str(r[key]), lambda r: r[key], False)


def _groups(rows: pd.DataFrame) -> list[pd.DataFrame]:
    """Comparison groups in row order (rows are sorted by group, then rank)."""
    order = list(dict.fromkeys(tuple(r) for r in rows[stats.GROUP].astype(str).itertuples(index=False)))
    keyed = rows[stats.GROUP].astype(str).apply(tuple, axis=1)
    return [rows[keyed == key] for key in order]


def _summary(board: Leaderboard) -> str:
    merged = f"{board.merged} merged from result files" + (
        f", {len(board.rejected)} result files rejected" if board.rejected else "") + (
        f", {len(board.ignored_predictions)} predictions files ignored" if board.ignored_predictions else "")
    return (f"{board.finished} finished runs; {board.excluded} excluded ({board.excluded_detail or 'none'}); "
            f"{merged}.")


NOTES = ("Mean ± std over seeds (n = seeds with a finite quality; repeated runs of a seed are averaged first, "
         "seeds whose quality is NaN are listed apart); 95 % CI: Student-t interval of the quality mean. Scores "
         "(higher is better) ×100; errors (↓) and deltas as logged. Δ vs ref: mean paired difference to the "
         "reference (mean over shared seeds) with its 95 % interval and p: from a paired bootstrap over examples and "
         "seeds where both rows have per-example predictions, else from a paired t-test over seeds (each group says "
         "which); p Holm: p adjusted for the group's comparisons by Holm's step-down method, which keeps the "
         "chance of any false significant row in a group at most 0.05; (n.s.) p Holm ≥ 0.05 (the Δ interval and p "
         "are not adjusted, so an interval that excludes 0 can still be n.s.), (n/a) no test (a seed-level test "
         "with fewer than two shared seeds). MDD: the smallest true difference the "
         "comparison detects at α = 0.05 with 80 % power at the current n; an n.s. Δ with a large MDD means no "
         "evidence either way, not no difference. "
         "Pareto ● : on the front of quality vs trainable params (P), peak memory (M), train throughput (T). Rows "
         "are ranked only within a group (task, task version, metric versions, profile, protocol, device); the "
         "protocol is a hash of every logged setting but the method's and the seed (tag mtbench.protocol_id).")


_MD_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def _md(text: Any) -> str:
    """A Markdown table cell or heading that shows ``text`` literally: HTML escaped, Markdown punctuation (links,
    emphasis, code, pipes) backslash-escaped, one line."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def to_markdown(board: Leaderboard) -> str:
    """One section per task, one table per comparison group, each followed by its provenance table."""
    lines = ["# mtbench leaderboard", ""]
    if board.rows.empty:
        return "\n".join([*lines, f"No finished runs yet. {_summary(board)}", ""])
    lines += [f"Generated {board.generated}. {_summary(board)}", "", NOTES]
    task = None
    for rows in _groups(board.rows):
        first = rows.iloc[0]
        if first["task"] != task:
            task = first["task"]
            lines += ["", f"## {_md(task)}"]
        ref = f"{_md(first['reference'])} (config {_md(first['ref_config'])})" if first["reference"] else "none"
        title = (f"{_md(first['device'])} · profile {_md(first['profile'])} · protocol {_md(first['protocol_id'])} · "
                 f"task v{_md(first['task_version'])}")
        lines += ["", f"### {title}", "", f"Quality: `{first['quality_metric']}`. Reference: {ref}. "
              f"Metric versions: {_md(first['metric_versions'])}. {_md(_test_note(rows))}", ""]
        lines += _md_table(_columns(rows, board), rows)
        lines += ["", "Provenance:", ""]
        lines += _md_table([_text("rank", "rank"), _text("method", "method"), _text("method_config_id", "config"),
                            _text("runs", "runs"), _text("failed_seeds", "NaN seeds"), _text("seeds", "seeds"),
                            _text("git_commits", "git commits"),
                            _text("versions", "package versions"), _text("mcnemar", "McNemar per seed")], rows)
        if _last_of_task(board.rows, rows):
            lines += _md_reported(reported_for(str(task)))
    return "\n".join(lines) + "\n"


def _last_of_task(all_rows: pd.DataFrame, rows: pd.DataFrame) -> bool:
    later = all_rows.loc[all_rows.index > rows.index.max(), "task"]
    return later.empty or later.iloc[0] != rows["task"].iloc[0]


REPORTED_NOTE = ("Reported in papers: published numbers, copied with their citation. Other models, data, budgets and "
                 "evaluation protocols: never ranked, compared or put on a Pareto front with the measured rows.")


def _reported_cell(value: float) -> str:
    return f"{value:.2f}"


def _md_reported(tables: list[ReportedTable]) -> list[str]:
    """The task's reported tables, after its measured groups."""
    if not tables:
        return []
    lines = ["", "### Reported in papers (not ranked)", "", REPORTED_NOTE]
    for table in tables:
        lines += ["", f"**{_md(table.paper)}**, {_md(table.table)}. {_md(table.setting)}. "
                      f"Source: {_md(table.provenance)}", ""]
        if not table.rows:
            lines.append("No numbers recorded for this table.")
            continue
        headers = ["reported in paper", "mtbench method", *[c.header + ("" if c.higher_is_better else " ↓")
                                                            for c in table.columns]]
        lines += ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
        for row in table.rows:
            label = row.label + (f" ({row.note})" if row.note else "")
            cells = [label, row.method or "–", *[_reported_cell(row.values[c.key]) for c in table.columns]]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return lines


def _md_table(columns: list[Column], rows: pd.DataFrame) -> list[str]:
    out = ["| " + " | ".join(_md(c.header) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in rows.iterrows():
        out.append("| " + " | ".join(_md(c.text(row)) for c in columns) + " |")
    return out


# --- Pareto plots ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One comparison group's Pareto plot; ``group`` is the key of its group (:func:`group_key`)."""

    name: str
    caption: str
    png: bytes
    group: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def group_key(first: pd.Series) -> str:
    """Short stable hash of a comparison group (its :data:`stats.GROUP` values)."""
    return hashlib.sha256(json.dumps([str(first[k]) for k in stats.GROUP]).encode()).hexdigest()[:6]


def _on_cpu(rows: pd.DataFrame) -> bool:
    return any(str(d).lower().startswith("cpu") for d in rows["device"])


def plot_caption(rows: pd.DataFrame) -> str:
    """What a group's Pareto plot shows, and how far its memory and throughput axes can be trusted."""
    first = rows.iloc[0]
    caption = (f"{first['task']} · profile {first['profile']} · protocol {first['protocol_id']} · "
               f"{first['device']} · task v{first['task_version']}. Points: mean quality with its 95 % CI; "
               "red: on the Pareto front.")
    if _on_cpu(rows):
        caption += (" Memory and throughput were measured on a CPU: peak memory is the process's peak resident set "
                    "size and throughput depends on whatever else the machine ran (a shared CPU slows a run and "
                    "spreads its seeds), so compare them only between runs made one at a time on the same idle "
                    "machine.")
    return caption


def pareto_plots(board: Leaderboard) -> list[Plot]:
    """Quality against trainable params, peak memory and throughput, one PNG per comparison group.

    Labels are placed by adjustText (no overlaps, kept inside the axes); the legend sits below the panels, outside
    every axis, so it never hides a point; the parameter axis is logarithmic with plain-number ticks.
    """
    if board.rows.empty:
        return []
    plots = []
    for rows in _groups(board.rows):
        if rows["quality_mean"].isna().all():
            continue
        first = rows.iloc[0]
        key = group_key(first)
        buffer = io.BytesIO()
        pareto_figure(board, rows).savefig(buffer, format="png", dpi=90, metadata={"Software": None})
        name = f"pareto-{_slug(str(first['task']))}-{_slug(str(first['profile']))}-{_slug(str(first['device']))}-{key}"
        plots.append(Plot(f"{name}.png", plot_caption(rows), buffer.getvalue(), key))
    return plots


def pareto_figure(board: Leaderboard, rows: pd.DataFrame) -> Any:
    """The three-panel Pareto figure (a drawn matplotlib ``Figure``) of one comparison group's ``rows``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    first = rows.iloc[0]
    fig = Figure(figsize=(15, 4.8), layout="constrained", dpi=90)
    FigureCanvasAgg(fig)
    scale = _scale(str(first["quality_metric"]), board.directions)
    points = [_draw(ax, rows, name, metric, lower, scale)
              for ax, (name, metric, lower) in zip(fig.subplots(1, 3), stats.PARETO_AXES)]
    fig.axes[0].set_ylabel(f"{first['quality_metric']}" + (" ×100" if scale != 1 else "") + " (higher is better)",
                           parse_math=False)
    fig.suptitle(f"{first['task']} · profile {first['profile']} · protocol {first['protocol_id']} · "
                 f"{first['device']}", parse_math=False)
    handles = [Line2D([], [], marker="o", linestyle="none", color="C3", label="on the Pareto front"),
               Line2D([], [], marker="o", linestyle="none", color="0.55", label="dominated"),
               Line2D([], [], color="C3", linewidth=1, alpha=0.6, label="front")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    # Lay the panels out first and freeze that layout, so the labels are placed on the final axes.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    for ax, (x, y, labels) in zip(fig.axes, points):
        _label(ax, x, y, labels)
    fig.canvas.draw()
    return fig


def _si(value: float, _pos: Any = None) -> str:
    """Tick label of a count: 340k, 2.7M, 22.7M."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _point_label(method: Any, note: str) -> str:
    text = f"{str(method)[:24]} {note}".strip()
    return text if len(text) <= 40 else text[:39] + "…"


def _draw(ax: Any, rows: pd.DataFrame, name: str, metric: str, lower: bool,
          scale: float) -> tuple[list[float], list[float], list[str]]:
    """Points, error bars and front line of one panel; returns the labelled points (x, y, label)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    labels = {"params": "trainable parameters, log scale (fewer is better)",
              "memory": "peak memory, MB (less is better)", "throughput": "train samples/s (more is better)"}
    ax.set_xlabel(labels[name], parse_math=False)
    column = f"{metric}_mean"
    x = rows[column].astype(float) if column in rows else pd.Series(math.nan, index=rows.index)
    y = rows["quality_mean"].astype(float) * scale
    err = rows["quality_ci95"].astype(float).fillna(0.0) * scale
    ok = x.notna() & y.notna()
    if not ok.any():
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return [], [], []
    on = rows[f"pareto_{name}"].astype(bool) & ok
    ax.errorbar(x[ok & ~on], y[ok & ~on], yerr=err[ok & ~on], fmt="o", color="0.55", capsize=2)
    ax.errorbar(x[on], y[on], yerr=err[on], fmt="o", color="C3", capsize=2)
    front = sorted(zip(x[on], y[on]))
    ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", linewidth=1, alpha=0.6)
    if name == "params" and (x[ok] > 0).all():
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_si))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
    elif name == "params":
        ax.xaxis.set_major_formatter(FuncFormatter(_si))
    # Room around the points so their labels fit inside the axes.
    ax.margins(x=0.18, y=0.22)
    ax.grid(True, alpha=0.3)
    return list(x[ok]), list(y[ok]), [_point_label(m, n) for m, n in zip(rows["method"][ok], rows["config_note"][ok])]


def _label(ax: Any, x: list[float], y: list[float], labels: list[str]) -> None:
    """Label the points; adjustText moves the labels off each other and the points, inside the axes."""
    import numpy as np
    from adjustText import adjust_text

    texts = [ax.text(xi, yi, label, fontsize=8, parse_math=False) for xi, yi, label in zip(x, y, labels)]
    if texts:
        # The same board must draw the same plot: adjustText otherwise stops after one second of wall-clock time
        # (fewer moves on a busy machine) and jitters coincident points with numpy's global generator. A fixed
        # iteration budget and a seeded generator, whose state is put back, make the placement reproducible.
        state = np.random.get_state()
        np.random.seed(0)
        try:
            adjust_text(texts, x=x, y=y, ax=ax, ensure_inside_axes=True, iter_lim=1000,
                        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
        finally:
            np.random.set_state(state)


# --- HTML --------------------------------------------------------------------------------------------------------


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 1.5em;color:#222;max-width:1600px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.25em;margin:.6em 0 .3em}h3{font-size:1.05em;margin:1em 0 .3em}
table{border-collapse:collapse;font-size:13px;margin:.3em 0}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;text-align:left;vertical-align:bottom}table.board th{cursor:pointer}
table.board td,table.subtasks td{white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}td.num{text-align:right}
td.config{max-width:16em;overflow:hidden;text-overflow:ellipsis}small{color:#555}
table.prov td{white-space:normal;overflow-wrap:anywhere;max-width:40em;vertical-align:top}
.wrap{overflow-x:auto}img{max-width:100%}.notes{max-width:75em;color:#444;font-size:13px}
nav.tabs{border-bottom:2px solid #555;margin:.8em 0}nav.tabs a{display:inline-block;padding:.35em 1em;
margin-right:.2em;border:1px solid #aaa;border-bottom:none;border-radius:4px 4px 0 0;text-decoration:none;color:#222}
nav.tabs a[aria-current=page]{background:#555;color:#fff}details{margin:.4em 0}summary{cursor:pointer}
tr.ref td{background:#f6f6ff}.group{margin-bottom:1.5em}figure{margin:.5em 0}figcaption{font-size:13px;color:#444}
"""

_JS = """
(function () {
  "use strict";
  var sections = document.querySelectorAll("section.task");
  var links = document.querySelectorAll("nav.tabs a");
  function show() {
    var wanted = decodeURIComponent(location.hash.slice(1)), found = false, i;
    for (i = 0; i < sections.length; i++) { if (sections[i].getAttribute("data-tab") === wanted) { found = true; } }
    for (i = 0; i < sections.length; i++) {
      sections[i].hidden = found ? sections[i].getAttribute("data-tab") !== wanted : i !== 0;
    }
    var shown = found ? wanted : (sections.length ? sections[0].getAttribute("data-tab") : "");
    for (i = 0; i < links.length; i++) {
      var on = links[i].getAttribute("href") === "#" + shown;
      if (on) { links[i].setAttribute("aria-current", "page"); } else { links[i].removeAttribute("aria-current"); }
    }
  }
  function sortable(table) {
    var body = table.tBodies[0], heads = table.tHead.rows[0].cells, index = {};
    for (var i = 0; i < heads.length; i++) { index[heads[i].getAttribute("data-col")] = i; }
    function value(row, col) {
      var raw = row.cells[index[col]].getAttribute("data-v");
      if (raw === null || raw === "") { return null; }
      return heads[index[col]].getAttribute("data-type") === "num" ? parseFloat(raw) : raw.toLowerCase();
    }
    function order(row) { return parseInt(row.getAttribute("data-order"), 10); }
    function sortBy(col, dir) {
      var rows = Array.prototype.slice.call(body.rows), sign = dir === "asc" ? 1 : -1;
      rows.sort(function (a, b) {
        var va = value(a, col), vb = value(b, col);
        if (va === null || vb === null) { return va === vb ? order(a) - order(b) : (va === null ? 1 : -1); }
        if (va < vb) { return -sign; }
        if (va > vb) { return sign; }
        return order(a) - order(b);
      });
      rows.forEach(function (r) { body.appendChild(r); });
      for (var k = 0; k < heads.length; k++) { heads[k].removeAttribute("aria-sort"); }
      heads[index[col]].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
      table.setAttribute("data-sort-col", col);
      table.setAttribute("data-sort-dir", dir);
    }
    Array.prototype.forEach.call(heads, function (th) {
      th.addEventListener("click", function () {
        var col = th.getAttribute("data-col");
        var asc = table.getAttribute("data-sort-col") === col && table.getAttribute("data-sort-dir") === "asc";
        sortBy(col, asc ? "desc" : "asc");
      });
    });
    sortBy(table.getAttribute("data-default-sort"), "asc");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), sortable);
  window.addEventListener("hashchange", show);
  show();
  document.body.setAttribute("data-ready", "1");
}());
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _sort_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    number = _num(value)
    return "" if math.isnan(number) else repr(number)


def task_anchor(task: str) -> str:
    """The fragment that opens a task's tab (``index.html#glue``). The section's own id is ``task-<fragment>``,
    so opening the tab does not scroll the page to it."""
    return _slug(task)


def _tasks(rows: pd.DataFrame) -> list[tuple[str, list[pd.DataFrame]]]:
    """Comparison groups per task, in row order."""
    out: dict[str, list[pd.DataFrame]] = {}
    for group in _groups(rows):
        out.setdefault(str(group["task"].iloc[0]), []).append(group)
    return list(out.items())


def to_html(board: Leaderboard, plots: Sequence[Plot] = ()) -> str:
    """A self-contained page, one section (tab) per task: the deciding columns first, per-subtask scores and
    provenance in collapsible tables, the group's Pareto plot, then the task's reported-in-paper rows. No network
    access (the Content-Security-Policy forbids any)."""
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>mtbench leaderboard</title><style>{_CSS}</style></head><body>",
             "<h1>mtbench leaderboard</h1>",
             f"<p>Generated {_e(board.generated)}. {_e(_summary(board))}</p>"]
    if board.rows.empty:
        parts.append("<p>No finished runs yet.</p>")
    else:
        tasks = _tasks(board.rows)
        parts.append('<nav class="tabs">' + "".join(
            f'<a href="#{_e(task_anchor(task))}">{_e(task)}</a>' for task, _ in tasks) + "</nav>")
        by_group = {plot.group: plot for plot in plots}
        for task, groups in tasks:
            parts.append(f'<section class="task" id="task-{_e(task_anchor(task))}" data-tab="{_e(task_anchor(task))}" '
                         f'data-task="{_e(task)}">')
            parts.append(f"<h2>{_e(task)}</h2>")
            for rows in groups:
                parts += _html_group(board, rows, by_group.get(group_key(rows.iloc[0])))
            parts += _html_reported(reported_for(task))
            parts.append("</section>")
    parts.append(f'<details><summary>How to read this board</summary><p class="notes">{_e(NOTES)} '
                 "Click a header to sort.</p></details>")
    for title, lines in (("Rejected result files", board.rejected),
                         ("Ignored predictions files", board.ignored_predictions)):
        if lines:
            parts.append(f"<h2>{title}</h2><ul>")
            parts += [f"<li>{_e(line)}</li>" for line in lines]
            parts.append("</ul>")
    parts.append("<details><summary>Provenance of the board</summary>")
    parts += _key_value_table(_flat(board.provenance()))
    parts.append("</details>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _flat(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested provenance as (dotted key, readable value) pairs."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "–")] if prefix else []
        return [pair for k, v in value.items() for pair in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, (list, tuple)):
        return [(prefix, "; ".join(map(str, value)) if value else "none")]
    return [(prefix, str(value))]


def _key_value_table(pairs: list[tuple[str, str]]) -> list[str]:
    body = "".join(f"<tr><th scope=\"row\">{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return [f'<table class="prov"><tbody>{body}</tbody></table>']


def _deciding_columns(rows: pd.DataFrame, board: Leaderboard) -> list[Column]:
    """rank, method, config, quality ± CI, Δ vs reference (interval, p), trainable params (%), throughput, memory."""
    first = rows.iloc[0]
    qscale = _scale(str(first["quality_metric"]), board.directions)
    metric = str(first["quality_metric"]).removeprefix("val/").replace("delta_m", "Δm")
    ref = str(first["reference"]) or "reference"

    def share(r: pd.Series) -> float:
        return 100 * _num(r.get("params/trainable_mean")) / _num(r.get("params/total_mean"))

    def trainable(r: pd.Series) -> str:
        count = _num(r.get("params/trainable_mean"))
        return "–" if math.isnan(count) else f"{_si(count)} ({share(r):.2f} %)"

    return [
        Column("rank", "rank", lambda r: "–" if pd.isna(r["rank"]) else str(r["rank"]), lambda r: r["rank"]),
        Column("method", "method", lambda r: r["method"], lambda r: r["method"], False),
        Column("method_config_id", "config", _config_text, lambda r: r["method_config_id"], False),
        Column("quality", f"{metric}{' ×100' if qscale != 1 else ''} ± 95 % CI",
               lambda r: fmt(r["quality_mean"], r["quality_ci95"], qscale), lambda r: r["quality_mean"]),
        Column("n", "seeds", lambda r: str(r["n"]), lambda r: r["n"]),
        Column("ref_diff", f"Δ vs {ref} [95 % CI]", lambda r: _delta(r, qscale), lambda r: r["ref_diff"]),
        Column("p_value", "p", lambda r: _p_text(r, "p_value", False), lambda r: r["p_value"]),
        Column("p_holm", "p Holm", lambda r: _p_text(r, "p_holm", True), lambda r: r.get("p_holm")),
        Column("mdd", "MDD", lambda r: _mdd(r, qscale), lambda r: r.get("mdd")),
        Column("params/trainable", "trainable params (% of total)", trainable,
               lambda r: r.get("params/trainable_mean")),
        Column("perf/train_samples_per_s", "end-to-end train samples/s",
               lambda r: fmt(r.get("perf/train_samples_per_s_mean"), math.nan, 1, 1),
               lambda r: r.get("perf/train_samples_per_s_mean")),
        Column("perf/peak_mem_mb", "peak mem (MB)", lambda r: fmt(r.get("perf/peak_mem_mb_mean"), math.nan, 1, 0),
               lambda r: r.get("perf/peak_mem_mb_mean")),
    ]


def _delta(row: pd.Series, scale: float) -> str:
    if row["significant"] == "ref":
        return "reference"
    diff = _num(row["ref_diff"])
    if math.isnan(diff):
        return "n/a"
    low, high = _num(row.get("ref_ci_low")), _num(row.get("ref_ci_high"))
    interval = "" if math.isnan(low) or math.isnan(high) else f" [{low * scale:+.2f}, {high * scale:+.2f}]"
    return f"{diff * scale:+.2f}{interval}"


def _p_text(row: pd.Series, column: str, star: bool) -> str:
    """A p-value cell; ``star`` marks a significant row (``significant``, decided on the Holm-adjusted p)."""
    if row["significant"] == "ref":
        return ""
    p = _num(row.get(column))
    return "n/a" if math.isnan(p) else f"{p:.3f}" + (" *" if star and row["significant"] == "yes" else "")


def _detail_columns(rows: pd.DataFrame, board: Leaderboard) -> list[Column]:
    """Per-subtask scores (mean ± std over seeds) and the Pareto markers."""
    metrics = [m for m in board.metric_columns if m.startswith("val/") and rows[f"{m}_mean"].notna().any()]
    pareto = [Column(f"pareto_{n}", f"front: {n}", lambda r, n=n: "●" if r[f"pareto_{n}"] else "",
                     lambda r, n=n: int(bool(r[f"pareto_{n}"]))) for n, _, _ in stats.PARETO_AXES]
    return [Column("method", "method", lambda r: r["method"], lambda r: r["method"], False),
            *[_metric_column(m, board.directions) for m in metrics], *pareto,
            Column("mcnemar", "McNemar vs reference, per seed", lambda r: str(r.get("mcnemar") or "–"),
                   lambda r: str(r.get("mcnemar") or ""), False)]


def _provenance_columns() -> list[Column]:
    return [_text("method", "method"), _text("method_config_id", "config"),
            Column("method_config", "method settings", _settings_text, lambda r: r["method_config"], False),
            _text("runs", "runs"), _text("seeds", "seeds"), _text("failed_seeds", "NaN seeds"),
            _text("device", "device"), _text("task_version", "task v"), _text("metric_versions", "metric versions"),
            _text("git_commits", "git commits"), _text("versions", "package versions"), _text("run_ids", "run ids")]


def _settings_text(row: pd.Series) -> str:
    config = json.loads(row["method_config"]) if row["method_config"] else {}
    return ", ".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


def _html_group(board: Leaderboard, rows: pd.DataFrame, plot: Plot | None) -> list[str]:
    first = rows.iloc[0]
    ref = f"{first['reference']} (config {first['ref_config']})" if first["reference"] else "none"
    out = [f'<div class="group" data-group="{_e(group_key(first))}">',
           f"<h3>{_e(first['device'])} · profile {_e(first['profile'])} · protocol {_e(first['protocol_id'])}</h3>",
           f"<p class=\"notes\">Quality: <code>{_e(first['quality_metric'])}</code>; reference: {_e(ref)}; "
           f"task v{_e(first['task_version'])}. {_e(_test_note(rows))}</p>"]
    out += _html_table(_deciding_columns(rows, board), rows, "board", sortable=True)
    out.append("<details><summary>Per-subtask scores (mean ± std over seeds)</summary>")
    out += _html_table(_detail_columns(rows, board), rows, "subtasks")
    out.append("</details><details><summary>Provenance of these rows</summary>")
    out += _html_table(_provenance_columns(), rows, "prov")
    out.append("</details>")
    if plot is not None:
        import base64

        data = base64.b64encode(plot.png).decode("ascii")
        out.append(f'<figure><img alt="Pareto fronts: {_e(plot.caption)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{_e(plot.caption)}</figcaption></figure>")
    out.append("</div>")
    return out


def _test_note(rows: pd.DataFrame) -> str:
    """How Δ, its interval and p were computed for this group (from the rows' ``ref_test`` column, if any)."""
    tests = [t for t in dict.fromkeys(rows.get("ref_test", pd.Series(dtype=str)).fillna("").astype(str)) if t]
    if tests:
        return "Δ vs reference, interval and p: " + " | ".join(tests) + ". MDD: minimum detectable difference " \
            "(α 0.05, 80 % power)."
    return ("Δ vs reference: mean paired difference over shared seeds, paired t-test p (* Holm-adjusted p < 0.05); "
            "the interval needs per-example predictions.")


def _html_table(columns: list[Column], rows: pd.DataFrame, kind: str, sortable: bool = False) -> list[str]:
    head = "".join(f'<th data-col="{_e(c.key)}" data-type="{"num" if c.numeric else "text"}">{_e(c.header)}</th>'
                   for c in columns)
    default = ' data-default-sort="rank"' if sortable else ""
    out = [f'<div class="wrap"><table class="{kind}"{default}><thead><tr>{head}</tr></thead><tbody>']
    # Rows leave the server alphabetical; the script ranks sortable tables on load.
    order = rows.sort_values(["method", "method_config_id"]) if sortable else rows
    for position, (_, row) in enumerate(order.iterrows()):
        cells = []
        for column in columns:
            text = column.text(row)
            kind_of = "num" if column.numeric else ("config" if column.key == "method_config_id" else "")
            title = f' title="{_e(text)}"' if kind_of == "config" else ""
            cells.append(f'<td class="{kind_of}" data-v="{_e(_sort_value(column.value(row)))}"{title}>{_e(text)}</td>')
        ref = ' class="ref"' if row["significant"] == "ref" else ""
        out.append(f'<tr{ref} data-row="{_e(row["row_id"])}" data-order="{position}" data-task="{_e(row["task"])}" '
                   f'data-device="{_e(row["device"])}">{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return out


def _html_reported(tables: list[ReportedTable]) -> list[str]:
    if not tables:
        return []
    out = ['<div class="reported">', "<h3>Reported in papers (not ranked)</h3>",
           f'<p class="notes">{_e(REPORTED_NOTE)}</p>']
    for table in tables:
        out.append(f'<details open><summary><b>{_e(table.paper)}</b>, {_e(table.table)}</summary>'
                   f'<p class="notes">{_e(table.setting)}. Source: {_e(table.provenance)}</p>')
        if table.rows:
            head = "".join(f"<th>{_e(h)}</th>" for h in ["reported in paper", "mtbench method", *[
                c.header + ("" if c.higher_is_better else " ↓") for c in table.columns]])
            body = []
            for row in table.rows:
                label = row.label + (f" ({row.note})" if row.note else "")
                cells = [f"<td>{_e(label)}</td><td>{_e(row.method or '–')}</td>",
                         *[f'<td class="num">{_reported_cell(row.values[c.key])}</td>' for c in table.columns]]
                body.append(f'<tr data-reported="{_e(table.id)}">{"".join(cells)}</tr>')
            out.append(f'<div class="wrap"><table class="reported"><thead><tr>{head}</tr></thead><tbody>'
                       f'{"".join(body)}</tbody></table></div>')
        else:
            out.append("<p>No numbers recorded for this table.</p>")
        out.append("</details>")
    out.append("</div>")
    return out


# --- Outputs -------------------------------------------------------------------------------------------------------


GENERATED = ("leaderboard.csv", "leaderboard.json", "LEADERBOARD.md", "index.html", "pareto-*.png")
"""The files :func:`write_leaderboard` owns in its folder; anything else there (a README) is kept."""


def write_leaderboard(board: Leaderboard, out: str | Path) -> list[Path]:
    """Write ``leaderboard.csv``, ``leaderboard.json``, ``LEADERBOARD.md``, ``index.html`` and one
    ``pareto-*.png`` per comparison group, as a set: every file is rendered in memory first, written to a staging
    folder beside ``out``, and the staging folder replaces ``out`` by rename, so a failure at any point leaves the
    previous board whole (never some new files beside old ones). Other files in ``out`` are carried over.

    Raises:
        MtbenchError: ``out`` is a file, or its parent folder cannot be written.
    """
    folder = Path(out)
    plots = pareto_plots(board)
    files = {
        "leaderboard.csv": to_csv(board).encode("utf-8"),
        "leaderboard.json": (json.dumps(to_json(board), indent=1, allow_nan=False) + "\n").encode("utf-8"),
        "LEADERBOARD.md": to_markdown(board).encode("utf-8"),
        "index.html": to_html(board, plots).encode("utf-8"),
        **{plot.name: plot.png for plot in plots},
    }
    _replace_folder(folder, files)
    return [folder / name for name in files]


def _replace_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Make ``folder`` hold ``files`` (plus its other, non-generated files) in one swap.

    Hand-written: no library we use swaps a folder; POSIX gives atomic rename of one path, so the new set is built
    beside the old one and the two are exchanged with two renames (the old folder is kept until the new one is in
    place, and restored if the second rename fails).
    """
    import shutil
    import tempfile

    from .errors import MtbenchError

    if folder.exists() and not folder.is_dir():
        raise MtbenchError(f"--out {folder} is a file; name a folder (it is created if missing)")
    if folder.is_symlink():  # replace the folder it points to, not the link
        folder = folder.resolve()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    except OSError as exc:
        raise MtbenchError(f"--out {folder}: cannot write beside it ({exc.strerror})") from exc
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it 0700; the board is published
        for name, data in files.items():
            atomic_write_bytes(stage / name, data)
        if folder.is_dir():
            _carry_over(folder, stage)
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        try:
            os.replace(stage, folder)
        except OSError:
            if old is not None:
                os.replace(old / folder.name, folder)
            raise
    except OSError as exc:
        raise MtbenchError(f"--out {folder}: cannot write the leaderboard ({exc.strerror or exc}); the previous "
                           "board is unchanged") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)



def _carry_over(folder: Path, stage: Path) -> None:
    """Copy what ``folder`` holds besides the generated files (a README, say) into ``stage``."""
    import shutil

    for item in folder.iterdir():
        if not any(item.match(pattern) for pattern in GENERATED) and not (stage / item.name).exists():
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, stage / item.name, symlinks=True)
            else:
                shutil.copy2(item, stage / item.name, follow_symlinks=False)

_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def to_csv(board: Leaderboard) -> str:
    """``leaderboard.csv``: the rows; a text cell that a spreadsheet would run as a formula (``=…``, ``+…``,
    ``-…``, ``@…``) gets a leading ``'`` (OWASP's CSV-injection rule); numbers are written as numbers."""
    rows = board.rows.copy()
    for column in rows.columns:
        if not pd.api.types.is_numeric_dtype(rows[column]):
            rows[column] = [f"'{v}" if isinstance(v, str) and v.startswith(_CSV_FORMULA) else v for v in rows[column]]
    return rows.to_csv(index=False)


def to_json(board: Leaderboard) -> dict[str, Any]:
    """The ``leaderboard.json`` document: schema, generation time, rows (the CSV's columns) and provenance."""
    rows = []
    for record in board.rows.to_dict(orient="records"):
        row = {k: _plain(v) for k, v in record.items()}
        row["quality_per_seed"] = json.loads(record["quality_per_seed"])
        rows.append(row)
    return {
        "schema": SCHEMA,
        "generated": board.generated,
        "columns": list(board.rows.columns),
        "rows": rows,
        "reported": [t.model_dump(mode="json", by_alias=True)
                     for t in board_reported(board)],
        "provenance": board.provenance(),
    }


def board_reported(board: Leaderboard) -> list[ReportedTable]:
    """Reported tables of the tasks that have measured rows on the board (display only, never ranked)."""
    tasks = list(dict.fromkeys(board.rows["task"].astype(str))) if not board.rows.empty else []
    return [t for task in tasks for t in reported_for(task)]


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

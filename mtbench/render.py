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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import stats
from .leaderboard import SCHEMA, Leaderboard
from .results import atomic_write, atomic_write_bytes


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
    return [
        Column("rank", "rank", lambda r: "–" if pd.isna(r["rank"]) else str(r["rank"]), lambda r: r["rank"]),
        Column("method", "method", lambda r: r["method"], lambda r: r["method"], False),
        Column("method_config_id", "config", _config_text, lambda r: r["method_config_id"], False),
        *[_metric_column(m, board.directions) for m in metrics],
        Column("quality_ci95", "95 % CI", lambda r: _interval(r, qscale(r)), lambda r: r["quality_ci95"]),
        Column("ref_diff", "Δ vs ref", lambda r: _versus(r, qscale(r)), lambda r: r["ref_diff"]),
        Column("p_value", "p", lambda r: "n/a" if math.isnan(_num(r["p_value"])) else f"{r['p_value']:.3f}",
               lambda r: r["p_value"]),
        Column("n", "n", lambda r: str(r["n"]), lambda r: r["n"]),
        Column("params/trainable", "trainable (M)", lambda r: f"{_num(r.get('params/trainable_mean')) / 1e6:.3f}",
               lambda r: r.get("params/trainable_mean")),
        Column("share", "% of total", lambda r: f"{share(r):.2f}", share),
        Column("perf/train_samples_per_s", "train samples/s",
               lambda r: fmt(r.get("perf/train_samples_per_s_mean"), r.get("perf/train_samples_per_s_std"), 1, 1),
               lambda r: r.get("perf/train_samples_per_s_mean")),
        Column("perf/peak_mem_mb", "peak mem (MB)", lambda r: f"{_num(r.get('perf/peak_mem_mb_mean')):.0f}",
               lambda r: r.get("perf/peak_mem_mb_mean")),
        *pareto,
    ]


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
        f", {len(board.rejected)} result files rejected" if board.rejected else "")
    return (f"{board.finished} finished runs; {board.excluded} excluded ({board.excluded_detail or 'none'}); "
            f"{merged}.")


NOTES = ("Mean ± std over seeds (n = seeds with a finite quality; repeated runs of a seed are averaged first, "
         "seeds whose quality is NaN are listed apart); 95 % CI: Student-t interval of the quality mean. Scores "
         "(higher is better) ×100; errors (↓) and deltas as logged. Δ vs ref: mean paired difference to the "
         "reference method over shared seeds, paired t-test p; (n.s.) p ≥ 0.05, (n/a) fewer than two shared seeds. "
         "Pareto ● : on the front of quality vs trainable params (P), peak memory (M), train throughput (T). Rows "
         "are ranked only within a group (task, task version, metric versions, profile, protocol, device); the "
         "protocol is a hash of every logged setting but the method's and the seed (tag mtbench.protocol_id).")


def _md(text: Any) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


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
              f"Metric versions: {_md(first['metric_versions'])}.", ""]
        lines += _md_table(_columns(rows, board), rows)
        lines += ["", "Provenance:", ""]
        lines += _md_table([_text("rank", "rank"), _text("method", "method"), _text("method_config_id", "config"),
                            _text("runs", "runs"), _text("failed_seeds", "NaN seeds"), _text("seeds", "seeds"),
                            _text("git_commits", "git commits"),
                            _text("versions", "package versions")], rows)
    return "\n".join(lines) + "\n"


def _md_table(columns: list[Column], rows: pd.DataFrame) -> list[str]:
    out = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in rows.iterrows():
        out.append("| " + " | ".join(_md(c.text(row)) for c in columns) + " |")
    return out


# --- Pareto plots ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One comparison group's Pareto plot."""

    name: str
    caption: str
    png: bytes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def pareto_plots(board: Leaderboard) -> list[Plot]:
    """Quality against trainable params, peak memory and throughput, one PNG per comparison group."""
    if board.rows.empty:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = []
    for rows in _groups(board.rows):
        if rows["quality_mean"].isna().all():
            continue
        first = rows.iloc[0]
        key = hashlib.sha256(json.dumps([str(first[k]) for k in stats.GROUP]).encode()).hexdigest()[:6]
        caption = (f"{first['task']} · profile {first['profile']} · protocol {first['protocol_id']} · "
                   f"{first['device']} · task v{first['task_version']}")
        fig = Figure(figsize=(13, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        scale = _scale(str(first["quality_metric"]), board.directions)
        for ax, (name, metric, lower) in zip(fig.subplots(1, 3), stats.PARETO_AXES):
            _draw(ax, rows, name, metric, lower, scale)
        fig.axes[0].set_ylabel(f"{first['quality_metric']}" + (" ×100" if scale != 1 else ""), parse_math=False)
        fig.suptitle(caption, parse_math=False)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
        name = f"pareto-{_slug(str(first['task']))}-{_slug(str(first['profile']))}-{_slug(str(first['device']))}-{key}"
        plots.append(Plot(f"{name}.png", caption, buffer.getvalue()))
    return plots


def _draw(ax: Any, rows: pd.DataFrame, name: str, metric: str, lower: bool, scale: float) -> None:
    labels = {"params": "trainable parameters (fewer is better)", "memory": "peak memory, MB (less is better)",
              "throughput": "train samples/s (more is better)"}
    ax.set_xlabel(labels[name], parse_math=False)
    column = f"{metric}_mean"
    x = rows[column].astype(float) if column in rows else pd.Series(math.nan, index=rows.index)
    y = rows["quality_mean"].astype(float) * scale
    err = rows["quality_ci95"].astype(float).fillna(0.0) * scale
    ok = x.notna() & y.notna()
    if not ok.any():
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    on = rows[f"pareto_{name}"].astype(bool) & ok
    ax.errorbar(x[ok & ~on], y[ok & ~on], yerr=err[ok & ~on], fmt="o", color="0.55", capsize=2, label="dominated")
    ax.errorbar(x[on], y[on], yerr=err[on], fmt="o", color="C3", capsize=2, label="Pareto front")
    front = sorted(zip(x[on], y[on]))
    ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", linewidth=1, alpha=0.6)
    for xi, yi, method, note in zip(x[ok], y[ok], rows["method"][ok], rows["config_note"][ok]):
        ax.annotate(f"{str(method)[:24]} {note[:24]}".strip(), (xi, yi), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, parse_math=False)
    if name == "params" and (x[ok] > 0).all():
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


# --- HTML --------------------------------------------------------------------------------------------------------


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:12.5px}th,td{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}td.num{text-align:right}tr.first td{border-top:2px solid #555}
.wrap{overflow-x:auto}.filters{margin:1em 0}.filters label{margin-right:1.5em}img{max-width:100%}
td.long{max-width:28em;overflow:hidden;text-overflow:ellipsis}.notes{max-width:70em;color:#444}
"""

_JS = """
(function () {
  "use strict";
  var table = document.getElementById("board");
  if (!table) { document.body.setAttribute("data-ready", "1"); return; }
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
      var ga = a.getAttribute("data-group"), gb = b.getAttribute("data-group");
      if (ga !== gb) { return ga < gb ? -1 : 1; }
      var va = value(a, col), vb = value(b, col);
      if (va === null || vb === null) { return va === vb ? order(a) - order(b) : (va === null ? 1 : -1); }
      if (va < vb) { return -sign; }
      if (va > vb) { return sign; }
      return order(a) - order(b);
    });
    var last = null;
    rows.forEach(function (r) {
      r.className = r.getAttribute("data-group") !== last ? "first" : "";
      last = r.getAttribute("data-group");
      body.appendChild(r);
    });
    for (var k = 0; k < heads.length; k++) { heads[k].removeAttribute("aria-sort"); }
    heads[index[col]].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sort-col", col);
    table.setAttribute("data-sort-dir", dir);
  }
  function filter() {
    var task = document.getElementById("filter-task").value;
    var device = document.getElementById("filter-device").value, shown = 0;
    Array.prototype.forEach.call(body.rows, function (r) {
      var ok = (!task || r.getAttribute("data-task") === task) &&
        (!device || r.getAttribute("data-device") === device);
      r.hidden = !ok;
      shown += ok ? 1 : 0;
    });
    document.getElementById("shown").textContent = shown + " of " + body.rows.length + " rows";
  }
  Array.prototype.forEach.call(heads, function (th) {
    th.addEventListener("click", function () {
      var col = th.getAttribute("data-col");
      var asc = table.getAttribute("data-sort-col") === col && table.getAttribute("data-sort-dir") === "asc";
      sortBy(col, asc ? "desc" : "asc");
    });
  });
  document.getElementById("filter-task").addEventListener("change", filter);
  document.getElementById("filter-device").addEventListener("change", filter);
  sortBy(table.getAttribute("data-default-sort"), "asc");
  filter();
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


def to_html(board: Leaderboard, plots: Sequence[Plot] = ()) -> str:
    """A self-contained page: sortable, filterable table, embedded Pareto plots, provenance; no network access."""
    import base64

    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>mtbench leaderboard</title><style>{_CSS}</style></head><body>",
             "<h1>mtbench leaderboard</h1>",
             f"<p>Generated {_e(board.generated)}. {_e(_summary(board))}</p>",
             f'<p class="notes">{_e(NOTES)} Click a header to sort (within each group).</p>']
    if board.rows.empty:
        parts.append("<p>No finished runs yet.</p>")
    else:
        parts += _html_table(board)
    if plots:
        parts.append("<h2>Pareto fronts</h2>")
        for plot in plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(f'<figure><img alt="Pareto front: {_e(plot.caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_e(plot.caption)}</figcaption></figure>")
    if board.rejected:
        parts.append("<h2>Rejected result files</h2><ul>")
        parts += [f"<li>{_e(line)}</li>" for line in board.rejected]
        parts.append("</ul>")
    parts.append("<h2>Provenance</h2>")
    parts.append(f"<pre>{_e(json.dumps(board.provenance(), indent=1))}</pre>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _html_table(board: Leaderboard) -> list[str]:
    rows = board.rows
    columns = [_text("task", "task"), _text("device", "device"), _text("profile", "profile"),
               _text("protocol_id", "protocol"), *_columns(rows, board), _text("task_version", "task v"),
               _text("metric_versions", "metric versions"), _text("runs", "runs"),
               _text("failed_seeds", "NaN seeds"), _text("seeds", "seeds"),
               _text("git_commits", "git commits"), _text("versions", "package versions")]
    out = ['<div class="filters">']
    for key, label in (("task", "Task"), ("device", "Device")):
        options = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in sorted(rows[key].astype(str).unique()))
        out.append(f'<label>{label} <select id="filter-{key}"><option value="">all</option>{options}</select></label>')
    out.append('<span id="shown"></span></div><div class="wrap">')
    head = "".join(f'<th data-col="{_e(c.key)}" data-type="{"num" if c.numeric else "text"}">{_e(c.header)}</th>'
                   for c in columns)
    out.append(f'<table id="board" data-default-sort="rank"><thead><tr>{head}</tr></thead><tbody>')
    group_of = {}
    for number, rows_of_group in enumerate(_groups(rows)):
        group_of.update({i: f"{number:04d}" for i in rows_of_group.index})
    # Rows leave the server grouped but alphabetical within a group; the script ranks them on load.
    order = rows.assign(_g=[group_of[i] for i in rows.index]).sort_values(["_g", "method", "method_config_id"])
    for position, (i, row) in enumerate(order.iterrows()):
        cells = []
        for column in columns:
            text = column.text(row)
            kind = "num" if column.numeric else ("long" if len(text) > 40 else "")
            title = f' title="{_e(text)}"' if kind == "long" else ""
            cells.append(f'<td class="{kind}" data-v="{_e(_sort_value(column.value(row)))}"{title}>{_e(text)}</td>')
        out.append(f'<tr data-row="{_e(row["row_id"])}" data-group="{group_of[i]}" data-order="{position}" '
                   f'data-task="{_e(row["task"])}" data-device="{_e(row["device"])}">{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return out


# --- Outputs -------------------------------------------------------------------------------------------------------


def write_leaderboard(board: Leaderboard, out: str | Path) -> list[Path]:
    """Write ``leaderboard.csv``, ``leaderboard.json``, ``LEADERBOARD.md``, ``index.html`` and one
    ``pareto-*.png`` per comparison group, each atomically."""
    folder = Path(out)
    plots = pareto_plots(board)
    paths = [folder / "leaderboard.csv", folder / "leaderboard.json", folder / "LEADERBOARD.md", folder / "index.html"]
    atomic_write(paths[0], board.rows.to_csv(index=False))
    atomic_write(paths[1], json.dumps(to_json(board), indent=1, allow_nan=False) + "\n")
    atomic_write(paths[2], to_markdown(board))
    atomic_write(paths[3], to_html(board, plots))
    for stale in folder.glob("pareto-*.png"):
        if stale.name not in {plot.name for plot in plots}:
            stale.unlink()
    for plot in plots:
        atomic_write_bytes(folder / plot.name, plot.png)
        paths.append(folder / plot.name)
    return paths


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
        "provenance": board.provenance(),
    }


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

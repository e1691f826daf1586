"""GLUE and SuperGLUE text classification: 9 GLUE + 6 SuperGLUE subtasks behind one encoder with per-subtask heads.

Data. GLUE (Wang et al. 2018; hub ``nyu-mll/glue``): cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli. SuperGLUE
(Wang et al. 2019; hub ``aps/super_glue``): boolq, cb, copa, wic, wsc (``wsc.fixed``), multirc. SuperGLUE RTE is the
same data as GLUE RTE, so it is the one ``rte`` subtask (its SuperGLUE jsonl layout is accepted). ReCoRD (span
extraction over entities) is out of scope. We train on ``train`` and evaluate on the labelled dev / ``validation``
split (test labels are hidden); MNLI is scored on matched (``acc``) and, with ``task.mnli_mismatched``, mismatched
(``acc_mm``). Licenses are per dataset (research use via GLUE; BoolQ CC BY-SA 3.0, COPA BSD-2, WiC CC BY-NC 4.0, WSC
CC BY 4.0); see each folder's SOURCE.md.

Local layout (``task.data_root`` / ``$MTBENCH_DATA``), first match wins: the layout mtbench is tested on
(``rte/{train,dev}.tsv``, ``mrpc/{train,dev}.tsv``, ``cola/train_part.tsv + val_part.tsv`` and ``dev.tsv``,
``sst2/train_part.tsv + val_part.tsv`` and ``glue_dev.tsv``, ``boolq/dev.jsonl``, ``fewglue/<Task>/train.jsonl``), the
official GLUE layout ``<Task>/{train,dev}.tsv`` (MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv``) and the SuperGLUE
layout ``<Task>/{train,val}.jsonl``. FewGLUE has 32 train examples per task (MultiRC: 32 questions, 154 answers) and
no dev set here, so a local boolq run trains on 32 examples and cb/copa/wic/wsc/multirc need a ``val.jsonl`` first.

Inputs. Sentence pairs go to the tokenizer as pairs; COPA is multiple choice (each (premise + question, choice) pair
gets one score, cross-entropy over the two choices); WSC pairs the text with "<pronoun> refers to <noun>"; WiC
prefixes the word to sentence 1; MultiRC pairs the paragraph with question + answer, one binary row per answer.

Metrics (``huggingface/datasets`` glue / super_glue definitions, torchmetrics, [0, 1] scale; correlations in
[-1, 1]): CoLA ``mcc``; SST-2, QNLI, RTE, WNLI, BoolQ, COPA, WiC, WSC ``acc``; MRPC, QQP ``acc`` + ``f1`` (positive =
paraphrase / duplicate); STS-B ``pearson`` + ``spearman``; MNLI ``acc`` + ``acc_mm``; CB ``acc`` + ``macro_f1``;
MultiRC ``em`` (every answer of a question right) + ``f1a`` (binary F1 over all answers). Primary metrics follow the
PEFT papers (LoRA, Hu et al. 2021, Table 2; LoRA+, Hayou et al. 2024): CoLA mcc, STS-B pearson, MultiRC f1a, MNLI
matched acc, accuracy elsewhere (CB too). MCC (version 2) is 0 when the model answers one class only, as the GLUE
reference's scikit-learn computes it (version 1, torchmetrics' epsilon convention, gave such a model 0.0256 on CoLA's
dev set). The ``paper`` profile follows the LoRA+ GLUE scripts (roberta-base, batch 32,
max length 128, linear schedule, lr 5e-5, 3 epochs, fp16) on the 8 GLUE tasks PEFT papers report (no WNLI).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from mtbench.backbones import TextBackbone, build
from mtbench.errors import ConfigError
from mtbench.interfaces import MetricSpec, MultiTaskModel, Task, TaskConfig, task_rows
from mtbench.registry import did_you_mean, register_task

from . import _glue_data as gd
from ._glue_data import Subtask, classes, in_folders, superglue_files


if TYPE_CHECKING:
    import torchmetrics

    from mtbench.data import LoaderConfig, MultiTaskDataModule


_GLUE, _SUPER = "nyu-mll/glue", "aps/super_glue"
_BOOL = classes("false", "true")
SUBTASKS: dict[str, Subtask] = {s.name: s for s in (
    Subtask("cola", (_GLUE, "cola"), (("sentence",),), ("label",), classes("unacceptable", "acceptable"), ("mcc",),
            "mcc", (("cola/train_part.tsv", "cola/val_part.tsv"), *in_folders("train.tsv", "cola", "CoLA")),
            in_folders("dev.tsv", "cola", "CoLA"), pair=None,
            headerless=("source", "label", "original_mark", "sentence")),
    Subtask("sst2", (_GLUE, "sst2"), (("sentence",),), ("label",), classes("negative", "positive"), ("acc",), "acc",
            (("sst2/train_part.tsv", "sst2/val_part.tsv"), *in_folders("train.tsv", "sst2", "SST-2")),
            (("sst2/glue_dev.tsv",), *in_folders("dev.tsv", "sst2", "SST-2")), pair=None),
    Subtask("mrpc", (_GLUE, "mrpc"), (("sentence1", "#1 String"), ("sentence2", "#2 String")), ("label", "Quality"),
            classes("not_equivalent", "equivalent"), ("acc", "f1"), "acc", in_folders("train.tsv", "mrpc", "MRPC"),
            in_folders("dev.tsv", "mrpc", "MRPC")),
    Subtask("qqp", (_GLUE, "qqp"), (("question1",), ("question2",)), ("label", "is_duplicate"),
            classes("not_duplicate", "duplicate"), ("acc", "f1"), "acc", in_folders("train.tsv", "qqp", "QQP"),
            in_folders("dev.tsv", "qqp", "QQP")),
    Subtask("stsb", (_GLUE, "stsb"), (("sentence1",), ("sentence2",)), ("label", "score"), None,
            ("pearson", "spearman"), "pearson", in_folders("train.tsv", "stsb", "STS-B"),
            in_folders("dev.tsv", "stsb", "STS-B")),
    Subtask("mnli", (_GLUE, "mnli"), (("premise", "sentence1"), ("hypothesis", "sentence2")), ("label", "gold_label"),
            classes("entailment", "neutral", "contradiction"), ("acc", "acc_mm"), "acc",
            in_folders("train.tsv", "mnli", "MNLI"), in_folders("dev_matched.tsv", "mnli", "MNLI"),
            hub_eval="validation_matched", mm_files=in_folders("dev_mismatched.tsv", "mnli", "MNLI"),
            hub_mm="validation_mismatched"),
    Subtask("qnli", (_GLUE, "qnli"), (("question",), ("sentence",)), ("label",),
            classes("entailment", "not_entailment"), ("acc",), "acc", in_folders("train.tsv", "qnli", "QNLI"),
            in_folders("dev.tsv", "qnli", "QNLI")),
    Subtask("rte", (_GLUE, "rte"), (("sentence1", "premise"), ("sentence2", "hypothesis")), ("label",),
            classes("entailment", "not_entailment"), ("acc",), "acc",
            (*in_folders("train.tsv", "rte", "RTE"), ("RTE/train.jsonl",)),
            (*in_folders("dev.tsv", "rte", "RTE"), ("RTE/val.jsonl",))),
    Subtask("wnli", (_GLUE, "wnli"), (("sentence1",), ("sentence2",)), ("label",),
            classes("not_entailment", "entailment"), ("acc",), "acc", in_folders("train.tsv", "wnli", "WNLI"),
            in_folders("dev.tsv", "wnli", "WNLI")),
    Subtask("boolq", (_SUPER, "boolq"), (("question",), ("passage",)), ("label", "answer"), _BOOL, ("acc",), "acc",
            *superglue_files("boolq", "BoolQ")),
    Subtask("cb", (_SUPER, "cb"), (("premise",), ("hypothesis",)), ("label",),
            classes("entailment", "contradiction", "neutral"), ("acc", "macro_f1"), "acc",
            *superglue_files("cb", "CB")),
    Subtask("copa", (_SUPER, "copa"), (("premise",), ("question",), ("choice1",), ("choice2",)), ("label",),
            classes("choice1", "choice2"), ("acc",), "acc", *superglue_files("copa", "COPA"),
            text="{0} What was the {1}?", choices=("{2}", "{3}")),
    Subtask("wic", (_SUPER, "wic"), (("word",), ("sentence1",), ("sentence2",)), ("label",), _BOOL, ("acc",), "acc",
            *superglue_files("wic", "WiC"), text="{0} : {1}", pair="{2}"),
    Subtask("wsc", (_SUPER, "wsc.fixed"), (("text",), ("span2_text",), ("span1_text",)), ("label",), _BOOL, ("acc",),
            "acc", *superglue_files("wsc", "WSC"), pair="{1} refers to {2}"),
    Subtask("multirc", (_SUPER, "multirc"), (("paragraph",), ("question",), ("answer",)), ("label",), _BOOL,
            ("em", "f1a"), "f1a", *superglue_files("multirc", "MultiRC"), pair="{1} {2}", group="qid"),
)}
GLUE_PEFT = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
"""The 8 GLUE tasks PEFT papers report (WNLI left out, as in LoRA Table 2)."""


def metric_class(path: str) -> Any:
    """``"module:Class"`` of torchmetrics (or of this package's ``_text_metrics``), imported when first called:
    importing torchmetrics loads torchvision, scipy and transformers, which listing tasks never needs."""
    module, _, name = path.partition(":")
    package = "mtbench.tasks" if module.startswith(".") else None
    return getattr(importlib.import_module(module, package), name)


METRICS: dict[str, Any] = {
    "acc": lambda n: partial(metric_class("torchmetrics.classification:MulticlassAccuracy"), num_classes=n,
                             average="micro"),
    "acc_mm": lambda n: partial(metric_class("torchmetrics.classification:MulticlassAccuracy"), num_classes=n,
                                average="micro"),
    "f1": lambda n: metric_class("torchmetrics.classification:BinaryF1Score"),
    "f1a": lambda n: metric_class("torchmetrics.classification:BinaryF1Score"),
    # 0 for a one-class confusion matrix, as the GLUE reference evaluation (torchmetrics' own class is not).
    "mcc": lambda n: metric_class("._text_metrics:MatthewsCorrCoef"),
    "macro_f1": lambda n: partial(metric_class("torchmetrics.classification:MulticlassF1Score"), num_classes=n,
                                  average="macro"),
    "pearson": lambda n: metric_class("torchmetrics.regression:PearsonCorrCoef"),
    "spearman": lambda n: metric_class("torchmetrics.regression:SpearmanCorrCoef"),
    "em": lambda n: metric_class("._text_metrics:GroupExactMatch"),  # torchmetrics has no grouped EM
}
"""Metric name -> (number of classes -> metric factory). Every metric here is higher-is-better."""
GROUPED_METRIC_VERSION = "2"
METRIC_VERSIONS = {"mcc": "2"}
"""Metrics whose definition changed: mcc 2 is 0 for a one-class confusion matrix (1: torchmetrics' epsilon value)."""
"""Version of the metrics of a grouped subtask (MultiRC): 2 since ``task.eval_limit`` counts whole questions (1 kept
the first N answer rows, which could cut a question in half)."""


def first_groups(examples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The examples of the first ``limit`` distinct groups (in order of first appearance), each group whole: the
    evaluation cap of a subtask scored per group (MultiRC questions), stable across seeds."""
    kept: set[int] = set()
    for ex in examples:
        if len(kept) == limit:
            break
        kept.add(ex["group"])
    return [ex for ex in examples if ex["group"] in kept]


def example_chars(example: dict[str, Any]) -> int:
    """Characters of all an example's inputs: a cheap proxy of its padded cost, for length bucketing."""
    return sum(len(text) + len(pair or "") for text, pair in example["inputs"])


@dataclass(frozen=True, kw_only=True)
class GlueConfig(TaskConfig):
    """GLUE / SuperGLUE options."""

    backbone: str = "tiny_bert"
    """Backbone: a registered name (tiny_bert, minilm_l6), a hub id (roberta-base) or a local directory."""
    max_length: Annotated[int, Gt(0)] = 128
    """Token cap per (pair of) sentence(s); batches are padded to their longest row, truncating longest-first."""
    pooling: Literal["cls", "mean"] = "cls"
    """Sentence vector fed to the heads: the first token's state, or the mean over non-padding tokens."""
    head_dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    """Dropout before each subtask's linear head."""
    source: Literal["auto", "local", "hub", "synthetic"] = "auto"
    """Data source; ``auto`` = local when task.data_root or $MTBENCH_DATA is set, else the hub."""
    synthetic_size: Annotated[int, Gt(0)] = 64
    """Generated examples per subtask and split with ``source=synthetic`` (MultiRC: answer rows)."""
    train_limit: Annotated[int, Ge(0)] = 0
    """Cap on training examples per subtask, a seeded random subset (0 = all)."""
    eval_limit: Annotated[int, Ge(0)] = 0
    """Cap on evaluation examples per subtask (and per MNLI split), the first N (0 = all). MultiRC counts questions,
    each kept with all its answers, so its per-question metric never sees half a question."""
    mnli_mismatched: bool = True
    """Also evaluate MNLI on the mismatched dev set (metric ``acc_mm``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.subtasks:
            if name == "record":
                raise ConfigError("task.subtasks: ReCoRD (entity span extraction) is out of scope of the glue task")
            if name not in SUBTASKS:
                raise ConfigError(f"task.subtasks: {did_you_mean(name, SUBTASKS, 'glue subtask')}")
        if len(set(self.subtasks)) != len(self.subtasks):
            raise ConfigError(f"task.subtasks must not repeat a subtask, got {list(self.subtasks)}")
        if not self.backbone:
            raise ConfigError("task.backbone must name a backbone (tiny_bert, minilm_l6, a hub id or a folder)")


_LORA_PLUS_GLUE = {"r": 8, "alpha": 8.0, "dropout": 0.1}
"""LoRA's settings in the LoRA+ paper's GLUE runs (roberta-base): rank 8, alpha 8 (scale 1), dropout 0.1."""


def _label_text(value: float | int) -> str:
    """A class index as ``"1"``, a regression value with 6 significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@register_task("glue")
class Glue(Task):
    """GLUE + SuperGLUE on one text encoder: pooled sentence vector, one dropout + linear head per subtask.

    Batches (from :meth:`collate`) hold ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    makes them), and per row: ``task_ids`` (index into :attr:`subtasks`), ``labels`` (float: class index, STS-B score,
    or for COPA the example's gold choice on each of its choice rows), ``group_ids`` (MultiRC question / example index
    within its subtask split; a COPA example's choice rows share it) and ``split_ids`` (1 = MNLI mismatched); and
    ``task_rows`` (:func:`~mtbench.interfaces.task_rows`: each present subtask's row positions).
    """

    config_cls = GlueConfig
    version = "1"
    default_subtasks = GLUE_PEFT
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "task_ids", "labels", "group_ids",
                                             "split_ids", "example_ids")  # per-row tensors; plus task_rows
    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "smoke": {
            "task": {"backbone": "tiny_bert", "source": "synthetic", "subtasks": list(SUBTASKS), "synthetic_size": 32,
                     "max_length": 32},
            "train": {"lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "batch_size": 16,
                      "eval_batch_size": 32, "sampler": "round_robin", "temperature": 2.0, "batch_mode": "mixed"},
            "trainer": {"max_steps": 30, "val_check_interval": 10, "num_sanity_val_steps": 0},
        },
        "cpu": {
            "task": {"backbone": "minilm_l6", "source": "local", "subtasks": ["rte", "mrpc", "cola", "sst2"],
                     "pooling": "mean", "max_length": 128, "train_limit": 0, "eval_limit": 0},
            # length_grouping 32 cuts padded training tokens by 29% on these four (207k -> 147k in 200 batches).
            # Measured on 2 CPU cores (LoRA r8, full dev sets, seeds 0-2), one-task batches in turn at lr 1e-3. RTE,
            # the smallest and hardest, needs the most passes: with equal turns for 800 steps (1.3 RTE epochs) it
            # reached only 0.566 +- 0.027. With rte=3 (half the batches) for 1000 steps (3.2 RTE epochs), encoder
            # dropout on (commit 0a9d800): RTE 0.597 +- 0.016, MRPC 0.728 +- 0.007, SST-2 0.814 +- 0.006, 7 min a
            # run. rte=4 for 1500 steps was no better and 50% slower. At lr 2e-3 and 4e-3 every subtask collapsed.
            "train": {"lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.06, "schedule": "linear", "batch_size": 16,
                      "eval_batch_size": 64, "sampler": "round_robin", "temperature": 2.0,
                      "batch_mode": "homogeneous", "length_grouping": 32, "task_weights": ["rte=3"]},
            "trainer": {"max_steps": 1000, "num_sanity_val_steps": 0},
            # Rates measured on this profile's 800-step predecessor (leaderboard/README.md): at the adapter rate
            # 1e-3 MTLoRA's defaults (r 64, fixed scale 4: ~16x LoRA r 8's step in weight space) and LoRA+ at
            # eta_A 5e-4 (eta_B 8e-3) collapsed every subtask to one class, and a fully trained encoder needs a
            # fine-tuning rate. LoRASC: one stage per epoch never ends in 1,000 steps, so five stages of 200.
            "methods": {
                "mtlora": {"method": {"lr": 1e-4}},
                "lora_plus": {"method": {"lr": 1.25e-4}},
                "full_ft": {"method": {"lr": 1e-4}},
                "lorasc": {"method": {"stage_steps": 200}},
            },
        },
        # The LoRA+ GLUE setup (loraplus glue/scripts/run_roberta_lora.sh and glue/src/arguments.py, methods.md §3):
        # LoRA on query and value, r 8, alpha 8, dropout 0.1 (the arguments' default, not set by the script), AdamW
        # betas (0.9, 0.99); LoRA+ the same with lambda = 80. The other LoRA-family methods run at LoRA's budget.
        "paper": {
            "method": {"target_modules": ["q", "v"]},
            "task": {"backbone": "roberta-base", "source": "auto", "subtasks": list(GLUE_PEFT), "pooling": "cls",
                     "max_length": 128, "head_dropout": 0.1},
            "train": {"lr": 5e-5, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "linear", "batch_size": 32,
                      "eval_batch_size": 128, "sampler": "proportional", "temperature": 1.0, "batch_mode": "mixed",
                      "betas": [0.9, 0.99]},
            "trainer": {"max_epochs": 3, "max_steps": -1, "precision": "16-mixed", "val_check_interval": 500},
            "methods": {
                "lora": {"method": _LORA_PLUS_GLUE},
                "lora_plus": {"method": {**_LORA_PLUS_GLUE, "lr_ratio": 80.0}},
                "lorasc": {"method": _LORA_PLUS_GLUE},
                "multilora": {"method": {**_LORA_PLUS_GLUE, "n": 2, "equal_budget": True}},
                "mosld": {"method": {"r": 8, "alpha": 8.0, "dropout": 0.1}},
                "mtlora": {"method": {"r": 8, "scale": 1.0, "dropout": 0.1}},
            },
        },
    }

    cfg: GlueConfig

    def __init__(self, cfg: GlueConfig) -> None:
        super().__init__(cfg)
        self._tokenizer: Any = None
        self._hidden_size: int | None = None

    def backbone(self) -> nn.Module:
        """A fresh encoder from ``task.backbone``; its tokenizer is kept for :meth:`collate`."""
        built = build(self.cfg.backbone)
        if not isinstance(built, TextBackbone):
            raise ConfigError(f"task.backbone={self.cfg.backbone!r} is not a text backbone ({type(built).__name__})")
        self._tokenizer, self._hidden_size = built.tokenizer, built.hidden_size
        return built.model

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (builds the backbone once if :meth:`backbone` was not called yet)."""
        if self._tokenizer is None:
            self.backbone()
        return self._tokenizer

    def heads(self, backbone: nn.Module) -> nn.ModuleDict:
        """Dropout + ``Linear(hidden, num_labels)`` per subtask (1 output for STS-B and per COPA choice)."""
        config: Any = getattr(backbone, "config", None)  # a backbone built elsewhere: read its HF config
        hidden = self._hidden_size or int(config.hidden_size)
        return nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(self.cfg.head_dropout), nn.Linear(hidden, SUBTASKS[name].num_labels))
            for name in self.subtasks
        })

    def forward(self, model: MultiTaskModel, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """One backbone pass over the whole batch; per present subtask its head's outputs.

        Returns:
            subtask -> logits ``(n, C)``; STS-B scores ``(n,)``; COPA choice scores ``(n_examples, n_choices)``.
        """
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model.backbone(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        outputs = {}
        for i, rows in batch["task_rows"].items():  # positions built on the host: no device sync (see task_rows)
            name, spec = self.subtasks[i], SUBTASKS[self.subtasks[i]]
            logits = model.heads[name](pooled.index_select(0, rows))
            # Rows of one COPA example are adjacent (collate emits them together), so a reshape regroups them.
            outputs[name] = logits.view(-1, len(spec.choices)) if spec.choices else (
                logits.squeeze(-1) if spec.regression else logits)
        return outputs

    def _targets(self, name: str, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(targets, group ids, split ids) aligned with ``forward``'s outputs for ``name``."""
        spec, rows = SUBTASKS[name], batch["task_rows"][self.subtasks.index(name)]
        labels, groups, splits = (batch[k].index_select(0, rows) for k in ("labels", "group_ids", "split_ids"))
        if spec.choices:
            k = len(spec.choices)
            labels, groups, splits = labels[::k], groups[::k], splits[::k]
        return (labels.float() if spec.regression else labels.long()), groups, splits

    def loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Mean loss per present subtask: cross-entropy (over choices for COPA), MSE for STS-B."""
        losses = {}
        for name, logits in outputs.items():
            target = self._targets(name, batch)[0]
            # Losses in fp32: fp16 logits under autocast overflow in MSE on 0-5 scores.
            if SUBTASKS[name].regression:
                losses[name] = F.mse_loss(logits.float(), target)
            else:
                losses[name] = F.cross_entropy(logits.float(), target)
        return losses

    def metrics(self) -> dict[str, dict[str, MetricSpec]]:
        """Subtask -> metric name -> spec; see the module docstring for definitions and primaries."""
        out = {}
        for name in self.subtasks:
            spec = SUBTASKS[name]
            names = [m for m in spec.metrics if m != "acc_mm" or self.cfg.mnli_mismatched]
            out[name] = {m: MetricSpec(METRICS[m](spec.num_classes), higher_is_better=True, primary=m == spec.primary,
                                       version=GROUPED_METRIC_VERSION if spec.group else METRIC_VERSIONS.get(m, "1"))
                         for m in names}
        return out

    def update_metrics(
        self,
        metrics: Mapping[str, Mapping[str, torchmetrics.Metric]],
        model: MultiTaskModel,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
    ) -> None:
        """Update each present subtask's metrics; ``*_mm`` metrics see MNLI-mismatched rows, the others the rest."""
        for name, logits in outputs.items():
            if name not in metrics:
                continue
            preds = logits.detach().float() if SUBTASKS[name].regression else logits.detach().argmax(-1)
            target, groups, splits = self._targets(name, batch)
            for metric_name, metric in metrics[name].items():
                keep = splits == int(metric_name.endswith("_mm"))
                if not bool(keep.any()):
                    continue
                args = (preds[keep], target[keep]) + ((groups[keep],) if metric_name == "em" else ())
                metric.update(*args)

    def example_records(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per evaluated example: predicted and gold class (or STS-B score), correct, the example's loss
        (cross-entropy; squared error for STS-B). ``example_id`` is ``<split>:<index in the split file>`` (split 1 =
        MNLI mismatched). ``aggregate`` says how the rows give the headline metric: accuracy is the mean of
        ``correct``, MCC and F1 come from the (prediction, target) pairs; grouped, correlation and macro metrics are
        ``none``, as are MNLI-mismatched rows (they feed ``acc_mm``, not the headline). Every subtask counts in the
        headline (the mean of the primary metrics)."""
        records: list[dict[str, Any]] = []
        for name, logits in outputs.items():
            spec = SUBTASKS[name]
            target, _, splits = self._targets(name, batch)
            ids = batch["example_ids"].index_select(0, batch["task_rows"][self.subtasks.index(name)])
            ids = ids[:: len(spec.choices)] if spec.choices else ids
            logits = logits.detach().float()
            if spec.regression:
                preds, losses = logits, (logits - target) ** 2
                correct = torch.full_like(preds, math.nan)
            else:
                preds = logits.argmax(-1)
                losses = F.cross_entropy(logits, target, reduction="none")
                correct = (preds == target).float()
            kind = {"acc": "mean", "mcc": "mcc", "f1": "f1"}.get(spec.primary, "none")
            for i, p, t, c, loss, split in zip(ids.tolist(), preds.tolist(), target.tolist(), correct.tolist(),
                                               losses.tolist(), splits.tolist()):
                records.append({"subtask": name, "example_id": f"{split}:{i}", "prediction": _label_text(p),
                                "target": _label_text(t), "correct": c, "score": c, "loss": loss,
                                "aggregate": kind if split == 0 else "none", "headline": True})
        return records

    def datamodule(self, loader: LoaderConfig, seed: int = 0) -> MultiTaskDataModule:
        """Train and evaluation examples of every subtask, batched by :class:`~mtbench.data.MultiTaskDataModule`."""
        if self._source() == "local":  # fail on a missing file before spending time reading the others
            for name, part in itertools.product(self.subtasks, ("train", "eval")):
                gd.local_files(SUBTASKS[name], self._root(), part)
        train = {name: self.examples(name, "train", seed) for name in self.subtasks}
        # Longest first, so evaluation batches hold similar lengths (and memory peaks at once); metrics ignore order.
        val = {name: sorted(self.examples(name, "eval", seed), key=example_chars, reverse=True)
               for name in self.subtasks}
        from mtbench.data import MultiTaskDataModule  # Lightning: imported by a run, not by listing

        return MultiTaskDataModule(self.subtasks, train, val, self.collate, loader, seed, length=example_chars)

    def examples(self, name: str, split: Literal["train", "eval"], seed: int = 0) -> list[dict[str, Any]]:
        """Examples of one subtask's split from the configured source, after ``train_limit`` / ``eval_limit``.

        Evaluation examples of MNLI include the mismatched set (``split`` 1) when ``task.mnli_mismatched``.

        Raises:
            DataError: missing files or folder, an unreachable hub, or malformed data.
        """
        spec = SUBTASKS[name]
        parts: list[tuple[str, int]] = [(split, 0)]
        if split == "eval" and spec.hub_mm and self.cfg.mnli_mismatched:
            parts.append(("eval_mm", 1))
        limit = self.cfg.train_limit if split == "train" else self.cfg.eval_limit
        out: list[dict[str, Any]] = []
        for part, split_id in parts:
            examples = gd.to_examples(spec, self._records(spec, part, seed), split_id)
            if limit and split == "eval":
                examples = first_groups(examples, limit) if spec.group else examples[:limit]
            elif limit and len(examples) > limit:
                # A seeded random subset, so the cap does not keep only the first source file's rows.
                keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
                examples = [examples[i] for i in keep]
            out += examples
        return out

    def _records(self, spec: Subtask, part: str, seed: int) -> list[tuple[str, list]]:
        source = self._source()
        if source == "synthetic":
            return [(f"synthetic {spec.name}/{part}", gd.synthetic_records(spec, part, self.cfg.synthetic_size, seed))]
        if source == "hub":
            hub_split = {"train": "train", "eval": spec.hub_eval, "eval_mm": spec.hub_mm}[part]
            return [(f"hub {spec.hub[0]}/{spec.hub[1]}:{hub_split}", gd.hub_records(spec, hub_split))]
        return [(str(path), gd.read_file(spec, path)) for path in gd.local_files(spec, self._root(), part)]

    def _root(self) -> Path | None:
        root = self.cfg.data_root or os.environ.get("MTBENCH_DATA", "")
        return Path(root).expanduser() if root else None

    def _source(self) -> str:
        if self.cfg.source == "auto":
            return "local" if self._root() else "hub"
        return self.cfg.source

    def subtask_examples(self, batch: Mapping[str, Any]) -> Tensor:
        """Examples per subtask: a multiple-choice example (COPA) counts once, not once per choice row."""
        rows = super().subtask_examples(batch)
        per_example = torch.tensor([len(SUBTASKS[name].choices) or 1 for name in self.subtasks], device=rows.device)
        return torch.div(rows, per_example, rounding_mode="floor")

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Tokenize to the longest row (capped at ``task.max_length``); choices become consecutive rows."""
        texts: list[Any] = []
        task_ids, labels, groups, splits, ids = [], [], [], [], []
        for ex in examples:
            for text, pair in ex["inputs"]:
                texts.append(text if pair is None else (text, pair))
                task_ids.append(ex["task_id"])
                labels.append(ex["label"])
                groups.append(ex["group"])
                splits.append(ex["split"])
                ids.append(ex.get("index", -1))
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return {
            **dict(enc),
            "task_ids": torch.tensor(task_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.float32),
            "group_ids": torch.tensor(groups, dtype=torch.long),
            "split_ids": torch.tensor(splits, dtype=torch.long),
            "example_ids": torch.tensor(ids, dtype=torch.long),
            "task_rows": task_rows(task_ids),
        }

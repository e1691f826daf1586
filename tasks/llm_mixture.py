"""LLM instruction mixture: one causal LM fine-tuned on Alpaca, MMLU, GSM8K and SuperGLUE written as instructions.

The setting of MultiLoRA (Wang et al. 2023: instruction following + NLU + world knowledge on LLaMA) with GSM8K added
for reasoning; every subtask trains on its prompts with the loss on response tokens only.

Data (hub ids in brackets; local layout under ``task.data_root`` / ``$MTBENCH_DATA`` = the files of shared/data):

* ``alpaca`` [``tatsu-lab/alpaca`` train]: ``alpaca/alpaca_data.json`` (then ``alpaca_data_cleaned.json``,
  ``alpaca_small_2k.json``, ``alpaca_data_1k.json``; a JSON array of ``{instruction, input, output}``). A fixed
  ``task.alpaca_eval_fraction`` (seed 0, the same for every run) is held out for loss / perplexity.
* ``mmlu`` [``cais/mmlu`` all]: ``mmlu/{dev,val,test}/<subject>_<split>.csv`` (headerless: question, A-D, answer).
  We train on ``task.mmlu_train_splits`` (default ``val``; ``dev`` and, on the hub, ``auxiliary_train`` allowed),
  take few-shot exemplars from ``dev`` (the first k of the subject) and evaluate on ``test``.
* ``gsm8k`` [``openai/gsm8k`` main]: ``gsm8k/{train,test}.jsonl``; train on train, evaluate on test.
* SuperGLUE ``boolq, rte, wic, cb, multirc`` (default) and ``copa, wsc`` [``aps/super_glue``; RTE from GLUE]: the
  GLUE task's files and readers (``tasks/glue.py``): e.g. ``fewglue/<Task>/train.jsonl``, ``boolq/dev.jsonl``,
  ``rte/{train,dev}.tsv``, ``<task>/{train,val}.jsonl``. Locally only BoolQ and RTE have dev sets; with
  ``task.holdout_missing_eval`` > 0 a subtask without one evaluates on a fixed held-out share of its train file
  (FewGLUE: 32 examples, so a handful of test items; a stand-in, not the benchmark).

Prompts: MMLU uses the standard ``"The following are multiple choice questions (with answers) about <subject>."``
header and ``"<question>\\nA. ..\\nD. ..\\nAnswer:"``; GSM8K ``"Question: <q>\\nAnswer:"`` (calculator annotations
``<<..>>`` removed from targets unless ``task.gsm8k_calculator``); SuperGLUE one yes/no (CB: yes/no/maybe) question
per example (templates in ``SUPERGLUE``). With a chat template every prompt is a user turn (few-shot exemplars are
earlier user/assistant turns) and the response the assistant turn; without one, ``"<prompt> <response>"``.

Evaluation (each metric ``version="1"``, bump it with any change of prompt or scoring):

* ``alpaca``: ``ppl`` (primary) and ``loss``, token-level NLL on held-out responses, lower is better.
* ``mmlu``: ``acc_<k>shot`` for each k of ``task.mmlu_shots`` (default 0 and 5; the last one is primary),
  argmax of the log-likelihood of the answer letter, micro-averaged over questions, plus ``acc_<k>shot_<category>``
  (stem, humanities, social_sciences, other; lm-eval's groups) or ``..._<subject>`` (``task.mmlu_breakdown``).
* ``gsm8k``: ``em_strict`` (primary; the number after ``#### ``) and ``em_flexible`` (the last number), lm-eval
  ``gsm8k`` v3 extraction and normalisation, greedy generation up to ``task.max_new_tokens`` with ``task.stop``;
  the extracted answer and the gold one are compared as numbers (``29.00`` = ``29``, ``-0`` = ``0``, trailing
  periods dropped), where lm-eval compares strings: metric version 2 (version 1 compared strings).
* SuperGLUE: the answer word with the highest summed log-likelihood (not length-normalised): ``acc``; CB also
  ``macro_f1``; MultiRC ``em`` (per question) and ``f1a`` (primary, binary F1 over answers).

Headline (``val/avg``, version ``mean-acc-1``): the quality measure of MultiLoRA (Wang et al. 2023) and MoSLD (Zhao
et al. 2025), the mean accuracy over MMLU, BoolQ, MultiRC, RTE and WiC, over those of the five the run has (MMLU at
its primary shot count, MultiRC with its primary F1a: the papers' MultiRC score, there being no per-question
accuracy). A run with none of the five averages its other higher-is-better primaries (GSM8K, CB, ...); Alpaca
perplexity points the other way and stays its own column.

Mixing: ``task.mix`` (``subtask=weight``) resizes each training set to ``weight · K`` virtual examples (repeating
examples, never dropping any; K the smallest size that keeps every real example reachable), so under
``train.sampler=proportional`` subtask t is drawn with probability ``weight_t`` exactly. Padding: every batch is padded
to its own longest row (dynamic padding); ``train.length_grouping`` (on in the cpu profile) buckets training rows by
length; evaluation sets are sorted by length so their batches hold similar lengths.
The vocabulary projection runs only on scored positions (see ``_llm_eval``).

Paper profile unknowns: MultiLoRA's exact data sizes, shot counts, rank and learning rate are not public (methods.md
§4); we follow its re-implementation (LLaMA-2-7B, lr 3e-4, batch 8, 3 epochs, cutoff 512) and MoSLD's bf16 7B setup;
MoSLD's own multiple-choice suite (OBQA, CSQA, RACE, ...) is a different task. Alpaca quality needs a judge and is out
of scope: held-out loss / perplexity only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from annotated_types import Ge, Interval, MinLen
from torch import Tensor, nn
from torch.utils.data import Dataset

from mtbench.backbones import TextBackbone, build, hf_causal_lm
from mtbench.errors import ConfigError
from mtbench.interfaces import MetricSpec, MultiTaskModel, Task, TaskConfig
from mtbench.registry import backbones, did_you_mean, register_task

from . import _llm_data as ld
from . import _llm_eval as le
from .glue import SUBTASKS as GLUE_SUBTASKS


if TYPE_CHECKING:
    import torchmetrics

    from mtbench.data import LoaderConfig, MultiTaskDataModule


_YN, _NY = ("yes", "no"), ("no", "yes")
SUPERGLUE: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "boolq": ("{1}\nQuestion: {0}?\nAnswer yes or no.", _NY),
    "rte": ('{0}\nQuestion: Does this imply that "{1}"? Answer yes or no.', _YN),
    "cb": ('{0}\nQuestion: Does this imply that "{1}"? Answer yes, no, or maybe.', ("yes", "no", "maybe")),
    "wic": ('Sentence 1: {1}\nSentence 2: {2}\nQuestion: Is the word "{0}" used with the same meaning in both '
            "sentences? Answer yes or no.", _NY),
    "multirc": ("{0}\nQuestion: {1}\nCandidate answer: {2}\nIs the candidate answer correct? Answer yes or no.", _NY),
    "copa": ("Premise: {0}\nWhat was the {1}? Answer with the more plausible alternative.", None),
    "wsc": ('{0}\nQuestion: In the passage above, does the pronoun "{1}" refer to "{2}"? Answer yes or no.', _NY),
}
"""SuperGLUE prompt (``str.format`` over the GLUE task's field slots) and answer word per class (COPA: choices)."""
SUBTASKS = ("alpaca", "mmlu", "gsm8k", *SUPERGLUE)
DEFAULT_SUBTASKS = ("alpaca", "mmlu", "gsm8k", "boolq", "rte", "wic", "cb", "multirc")
MMLU_HEADER = "The following are multiple choice questions (with answers) about {}."
HEADLINE_SUBTASKS = ("mmlu", "boolq", "multirc", "rte", "wic")
"""Subtasks whose accuracy MultiLoRA and MoSLD average into their quality measure (the task's ``val/avg``)."""


@dataclass(frozen=True, kw_only=True)
class LLMMixtureConfig(TaskConfig):
    """LLM mixture options."""

    backbone: str = "tiny_llama"
    """Causal LM: a registered name (tiny_llama, smollm2_135m), a hub id (meta-llama/Llama-2-7b-hf) or a folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the backbone weights are loaded in (adapters keep fp32)."""
    source: Literal["auto", "local", "hub", "synthetic"] = "auto"
    """Data source; ``auto`` = local when task.data_root or $MTBENCH_DATA is set, else the hub."""
    chat_template: bool = True
    """Format prompts with the tokenizer's chat template when it has one (false: plain text)."""
    max_length: Annotated[int, Ge(8)] = 512
    """Token cap per training or scoring sequence (contexts are cut from the left)."""
    mix: tuple[str, ...] = ()
    """Mixing weights ``subtask=weight`` for every selected subtask (empty: natural dataset sizes)."""
    train_limit: Annotated[int, Ge(0)] = 0
    """Cap on training examples per subtask, a seeded random subset (0 = all)."""
    eval_limit: Annotated[int, Ge(0)] = 0
    """Cap on evaluation examples per subtask (MultiRC: questions), a fixed random subset (0 = all)."""
    eval_limits: tuple[str, ...] = ()
    """Per-subtask overrides of eval_limit, ``subtask=N``."""
    synthetic_size: Annotated[int, Ge(4)] = 32
    """Generated examples per subtask and split with ``source=synthetic``."""
    alpaca_eval_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.05
    """Share of the Alpaca file held out (fixed seed) for loss / perplexity."""
    holdout_missing_eval: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """SuperGLUE subtasks without a local validation file evaluate on this held-out share of train (0 = error)."""
    mmlu_shots: Annotated[tuple[Annotated[int, Interval(ge=0, le=5)], ...], MinLen(1)] = (0, 5)
    """MMLU few-shot settings, each a metric acc_<k>shot; the last is the primary metric."""
    mmlu_train_splits: tuple[str, ...] = ("val",)
    """MMLU splits trained on: dev, val, auxiliary_train (hub only); test is always the evaluation split."""
    mmlu_subjects: tuple[str, ...] = ()
    """MMLU subjects (empty = all 57)."""
    mmlu_breakdown: Literal["none", "category", "subject"] = "category"
    """Extra MMLU metrics per category (4) or per subject (57), each micro-averaged within the group."""
    gsm8k_shots: Annotated[int, Ge(0)] = 0
    """GSM8K exemplars (the first k training problems) before each test question."""
    gsm8k_calculator: bool = False
    """Keep GSM8K's <<a+b=c>> calculator annotations in training targets."""
    max_new_tokens: Annotated[int, Ge(1)] = 256
    """Generation budget per GSM8K answer (greedy)."""
    stop: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
    """Stop strings of GSM8K generation (the tokenizer's EOS always stops too)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.subtasks:
            if name not in SUBTASKS:
                raise ConfigError(f"task.subtasks: {did_you_mean(name, SUBTASKS, 'llm_mixture subtask')}")
        if len(set(self.subtasks)) != len(self.subtasks):
            raise ConfigError(f"task.subtasks must not repeat a subtask, got {list(self.subtasks)}")
        if not self.backbone:
            raise ConfigError("task.backbone must name a causal LM (tiny_llama, smollm2_135m, a hub id or a folder)")
        if len(set(self.mmlu_shots)) != len(self.mmlu_shots):
            raise ConfigError(f"task.mmlu_shots must be distinct counts in 0-5 (dev has 5 per subject), "
                              f"got {list(self.mmlu_shots)}")
        if bad := [s for s in self.mmlu_train_splits if s not in ("dev", "val", "auxiliary_train")]:
            raise ConfigError(f"task.mmlu_train_splits: {bad[0]!r} is not one of dev, val, auxiliary_train")
        if bad := [s for s in self.mmlu_subjects if s not in le.MMLU_SUBJECTS]:
            raise ConfigError(f"task.mmlu_subjects: {did_you_mean(bad[0], le.MMLU_SUBJECTS, 'MMLU subject')}")
        parse_pairs(self.mix, "task.mix", float)
        parse_pairs(self.eval_limits, "task.eval_limits", int)


def parse_pairs(items: tuple[str, ...], key: str, kind: type) -> dict[str, Any]:
    """``("a=1", "b=2")`` -> ``{a: 1, b: 2}``, checking names against the known subtasks and values."""
    out = {}
    for item in items:
        name, sep, raw = str(item).partition("=")
        name = name.strip()
        if not sep or name not in SUBTASKS:
            raise ConfigError(f"{key}: expected subtask=value entries, got {item!r} ({', '.join(SUBTASKS)})")
        try:
            value = kind(raw)
        except (ValueError, OverflowError):
            value = -1
        if not (value > 0 or kind is int and value == 0) or value == float("inf"):
            raise ConfigError(f"{key}: {name} needs a {'positive number' if kind is float else 'count >= 0'}, "
                              f"got {raw!r}")
        out[name] = value
    return out


class _Resized(Dataset):
    """A list seen as ``size`` examples (index wraps around), so the proportional sampler draws it ∝ ``size``."""

    def __init__(self, data: list[dict[str, Any]], size: int) -> None:
        self.data, self.size = data, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data[i % len(self.data)]


_SMOKE_TRAIN = {"lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "batch_size": 8,
                "eval_batch_size": 8, "sampler": "proportional", "temperature": 1.0, "batch_mode": "mixed"}


def _example_id(example: Mapping[str, Any]) -> str:
    """A digest of what an evaluation example asks and expects: the same example gets the same id in every run."""
    import hashlib
    import json

    content = {k: example.get(k) for k in ("user", "contexts", "choices", "response", "gold", "label")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_task("llm_mixture")
class LLMMixture(Task):
    """Causal-LM instruction mixture; heads are empty (the LM head belongs to the backbone and stays frozen).

    Batches carry ``mode``: ``lm`` (training and Alpaca evaluation: ``input_ids``, ``attention_mask``, ``labels``),
    ``choice`` (``input_ids``, ``attention_mask``, then ``cand_ids`` or ``labels``, ``n_settings``, ``n_choices``,
    ``answer``, ``group_ids``, ``subject_ids``) or ``generate`` (left-padded prompts and ``gold`` answers); all carry
    ``task_ids`` and ``task_rows`` (:func:`~mtbench.interfaces.task_rows`, over examples). Rows of a choice batch
    are example-major, so per-example task routing repeats onto them.
    """

    config_cls = LLMMixtureConfig
    version = "1"
    headline_version = "mean-acc-1"
    default_subtasks = DEFAULT_SUBTASKS
    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "smoke": {
            "task": {"backbone": "tiny_llama", "source": "synthetic", "subtasks": list(SUBTASKS), "synthetic_size": 16,
                     "max_length": 256, "max_new_tokens": 12, "mmlu_shots": [0, 2],
                     "mix": [f"{s}={1 if s in ('alpaca', 'mmlu', 'gsm8k') else 0.5}" for s in SUBTASKS]},
            "train": _SMOKE_TRAIN,
            "trainer": {"max_steps": 10, "num_sanity_val_steps": 0},
        },
        # Measured on 2 CPU cores (LoRA r8, seed 0): 200 steps in 22 min + evaluation, 28 min in all, 13 GB peak RSS.
        # Untuned -> LoRA: Alpaca ppl 7.16 -> 6.49, BoolQ 0.37 -> 0.65, CB 0.50 -> 0.75, MultiRC F1a 0.17 -> 0.46;
        # MMLU (0/5-shot 0.18/0.27 -> 0.20/0.22), RTE, WiC and GSM8K (0 strict) stay at a 135M model's chance level.
        "cpu": {
            "task": {"backbone": "smollm2_135m", "source": "local", "subtasks": list(DEFAULT_SUBTASKS),
                     "max_length": 512, "holdout_missing_eval": 0.25, "eval_limit": 100,
                     "eval_limits": ["gsm8k=25", "alpaca=50"], "max_new_tokens": 160, "mmlu_shots": [0, 5],
                     "mix": ["alpaca=0.25", "mmlu=0.2", "gsm8k=0.2", "boolq=0.07", "rte=0.07", "wic=0.07",
                             "cb=0.07", "multirc=0.07"]},
            # Length bucketing: 38% fewer padded tokens (523k -> 322k over 200 batches of 8, max_length 512).
            "train": {"lr": 2e-4, "weight_decay": 0.0, "warmup_ratio": 0.05, "schedule": "cosine", "batch_size": 8,
                      "eval_batch_size": 8, "sampler": "proportional", "temperature": 1.0, "batch_mode": "mixed",
                      "length_grouping": 16},
            "trainer": {"max_steps": 200, "num_sanity_val_steps": 0},
        },
        "paper": {
            "task": {"backbone": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16", "source": "auto",
                     "subtasks": list(DEFAULT_SUBTASKS), "max_length": 512, "eval_limit": 0, "mmlu_shots": [0, 5],
                     "max_new_tokens": 256, "chat_template": False},
            "train": {"lr": 3e-4, "weight_decay": 0.0, "warmup_ratio": 0.03, "schedule": "cosine", "batch_size": 8,
                      "eval_batch_size": 16, "sampler": "proportional", "temperature": 1.0, "batch_mode": "mixed"},
            "trainer": {"max_epochs": 3, "max_steps": -1, "precision": "bf16-mixed", "val_check_interval": 2000},
        },
    }

    cfg: LLMMixtureConfig

    def __init__(self, cfg: LLMMixtureConfig) -> None:
        super().__init__(cfg)
        self._tokenizer: Any = None
        self._prompter: le.Prompter | None = None

    # -- model ---------------------------------------------------------------------------------------------------

    def backbone(self) -> nn.Module:
        """A fresh causal LM from ``task.backbone``; its tokenizer is kept for :meth:`collate`."""
        spec, dtype = self.cfg.backbone, self.cfg.dtype
        try:
            built = (build(spec, **({"dtype": dtype} if dtype != "float32" else {})) if spec in backbones
                     else hf_causal_lm(spec, dtype=dtype))
        except TypeError as exc:
            raise ConfigError(f"task.backbone={spec!r} does not take task.dtype={dtype!r}: {exc}") from exc
        model = built.model if isinstance(built, TextBackbone) else None
        if model is None or not hasattr(model, "generate") or model.get_output_embeddings() is None:  # type: ignore
            raise ConfigError(f"task.backbone={spec!r} is not a causal LM with an LM head")
        self._tokenizer, self._prompter = built.tokenizer, None
        return model

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (builds the backbone once if :meth:`backbone` was not called yet)."""
        if self._tokenizer is None:
            self.backbone()
        return self._tokenizer

    @property
    def prompter(self) -> le.Prompter:
        """Prompt rendering and tokenization for the backbone's tokenizer."""
        if self._prompter is None:
            self._prompter = le.Prompter(self.tokenizer, self.cfg.chat_template, self.cfg.max_length)
        return self._prompter

    def heads(self, backbone: nn.Module) -> nn.ModuleDict:
        """No heads: the LM head is the backbone's own output layer."""
        return nn.ModuleDict()

    def forward(self, model: MultiTaskModel, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Per present subtask: response NLL (``lm``), choice log-likelihoods (``choice``) or answer matches."""
        mode = batch["mode"]
        if mode == "generate":
            strict, flexible = self.generate_matches(model, batch)
            per_row = {"strict": strict, "flexible": flexible}
        elif mode == "choice":
            per_row = {"scores": le.choice_scores(model.backbone, dict(batch))}
        else:
            sums, counts = le.token_logprobs(model.backbone, batch)
            per_row = {"nll": -sums, "tokens": counts}
        # Row positions built on the host (mtbench.interfaces.task_rows): selecting with them never waits for a GPU.
        return {self.subtasks[i]: {k: v.index_select(0, rows) for k, v in per_row.items()}
                for i, rows in batch["task_rows"].items()}

    def generate_matches(self, model: MultiTaskModel, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Greedy answers to left-padded prompts, scored against ``gold`` by strict and flexible extraction."""
        tok, stops = self.tokenizer, [s for s in self.cfg.stop if s]
        generate: Any = model.backbone.generate  # type: ignore[operator]
        out = generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                       max_new_tokens=self.cfg.max_new_tokens, stop_strings=stops or None, tokenizer=tok,
                       pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [le.cut_at_stop(t, stops) for t in texts]
        self._generated = texts  # for example_records: the answers of this batch
        strict = [le.exact_match(le.extract_strict(t), g) for t, g in zip(texts, batch["gold"])]
        flexible = [le.exact_match(le.extract_flexible(t), g) for t, g in zip(texts, batch["gold"])]
        device = batch["task_ids"].device
        return torch.tensor(strict, device=device), torch.tensor(flexible, device=device)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Mean NLL over the response tokens of each present subtask (token-level within the subtask)."""
        return {sub: out["nll"].sum() / out["tokens"].sum().clamp_min(1) for sub, out in outputs.items()
                if "nll" in out}

    # -- metrics -------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, dict[str, MetricSpec]]:
        """Subtask -> metric -> spec; see the module docstring."""
        from torchmetrics.classification import BinaryF1Score, MulticlassF1Score  # heavy: here, not at the top

        from . import _text_metrics as tm

        acc = MetricSpec(tm.Accuracy, higher_is_better=True)
        out: dict[str, dict[str, MetricSpec]] = {}
        for sub in self.subtasks:
            if sub == "alpaca":
                out[sub] = {"ppl": MetricSpec(partial(tm.TokenNLL, exp=True), higher_is_better=False, primary=True),
                            "loss": MetricSpec(tm.TokenNLL, higher_is_better=False)}
            elif sub == "mmlu":
                out[sub] = {}
                for k in self.cfg.mmlu_shots:
                    out[sub][f"acc_{k}shot"] = dataclasses.replace(acc, primary=k == self.cfg.mmlu_shots[-1])
                    out[sub].update({f"acc_{k}shot_{g}": acc for g in self._mmlu_groups()})
            elif sub == "gsm8k":
                gsm = dataclasses.replace(acc, version=le.GSM8K_METRIC_VERSION)
                out[sub] = {"em_strict": dataclasses.replace(gsm, primary=True), "em_flexible": gsm}
            elif sub == "cb":
                out[sub] = {"acc": dataclasses.replace(acc, primary=True), "macro_f1": MetricSpec(
                    partial(MulticlassF1Score, num_classes=3, average="macro"), higher_is_better=True)}
            elif sub == "multirc":
                out[sub] = {"em": MetricSpec(tm.GroupExactMatch, higher_is_better=True),
                            "f1a": MetricSpec(BinaryF1Score, higher_is_better=True, primary=True)}
            else:
                out[sub] = {"acc": dataclasses.replace(acc, primary=True)}
        return out

    def headline(self, values: Mapping[str, float]) -> float | None:
        """Mean of the primary metrics of the run's subtasks among :data:`HEADLINE_SUBTASKS` (MMLU, BoolQ,
        MultiRC, RTE, WiC: MultiLoRA's and MoSLD's quality measure); without any of them, the mean of the other
        higher-is-better primaries; ``None`` when there is none (Alpaca alone)."""
        specs = self.metrics()
        keys = [f"val/{s}/{name}" for s in self.headline_subtasks() for name, m in specs[s].items() if m.primary]
        found = [values[k] for k in keys if k in values]
        return sum(found) / len(found) if found else None

    def headline_subtasks(self) -> list[str]:
        """The run's subtasks whose primary metrics :meth:`headline` averages."""
        specs = self.metrics()
        return [s for s in self.subtasks if s in HEADLINE_SUBTASKS] or \
            [s for s in self.subtasks if all(m.higher_is_better for m in specs[s].values() if m.primary)]

    def _mmlu_groups(self) -> list[str]:
        if self.cfg.mmlu_breakdown == "category":
            return list(le.MMLU_CATEGORIES)
        return list(self._mmlu_subjects()) if self.cfg.mmlu_breakdown == "subject" else []

    def _mmlu_subjects(self) -> tuple[str, ...]:
        return self.cfg.mmlu_subjects or le.MMLU_SUBJECTS

    def update_metrics(
        self,
        metrics: Mapping[str, Mapping[str, torchmetrics.Metric]],
        model: MultiTaskModel,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
    ) -> None:
        """Update each present subtask's metrics from :meth:`forward`'s outputs."""
        for sub, out in outputs.items():
            if sub not in metrics:
                continue
            m = metrics[sub]
            if "nll" in out:
                for metric in m.values():
                    metric.update(out["nll"], out["tokens"])
            elif "strict" in out:
                m["em_strict"].update(out["strict"].float())
                m["em_flexible"].update(out["flexible"].float())
            else:
                rows = batch["task_rows"][self.subtasks.index(sub)]
                answer, groups, subjects = (batch[k].index_select(0, rows)
                                            for k in ("answer", "group_ids", "subject_ids"))
                self._update_choice(sub, m, out["scores"].argmax(-1), answer, groups, subjects)

    def example_records(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per evaluated example (``example_id``: a digest of its prompt and answer, stable across seeds and
        orders). Choice subtasks: predicted and gold option (MMLU: at the last shot setting, the headline), correct,
        loss = cross-entropy of the options' log-likelihoods; GSM8K: the generated text (cut at the stop strings),
        the gold number, strict exact match as correct and score, generated tokens; Alpaca: summed response NLL as
        loss and the scored tokens (``aggregate`` ``token_mean``: perplexity is exp(Σ loss / Σ tokens))."""
        records: list[dict[str, Any]] = []
        headline = set(self.headline_subtasks())
        ids = list(batch.get("example_ids") or [])
        task_ids = batch["task_ids"].tolist()
        for sub, out in outputs.items():
            index = self.subtasks.index(sub)
            mine = [ids[i] if i < len(ids) else "" for i, t in enumerate(task_ids) if t == index]
            if "nll" in out:
                for i, nll, n in zip(mine, out["nll"].tolist(), out["tokens"].tolist()):
                    records.append({"subtask": sub, "example_id": i, "loss": nll, "tokens": n,
                                    "aggregate": "token_mean", "headline": sub in headline})
            elif "strict" in out:
                texts = getattr(self, "_generated", [""] * len(mine))
                gold = [g for g, t in zip(batch["gold"], task_ids) if t == index]
                tok = self.tokenizer
                for i, text, g, ok in zip(mine, texts, gold, out["strict"].tolist()):
                    records.append({"subtask": sub, "example_id": i, "prediction": text, "target": g,
                                    "correct": float(ok), "score": float(ok),
                                    "tokens": len(tok(text, add_special_tokens=False)["input_ids"]),
                                    "aggregate": "mean", "headline": sub in headline})
            else:
                scores = out["scores"].detach().float()
                setting = -1 if sub == "mmlu" else 0  # MMLU's headline is the last shot setting
                scores = scores[:, setting] if scores.dim() == 3 else scores
                target = batch["answer"].index_select(0, batch["task_rows"][index])
                preds = scores.argmax(-1)
                losses = -scores.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
                primary = next(n for n, spec in self.metrics()[sub].items() if spec.primary)
                kind = "f1" if primary == "f1a" else "mean" if primary.startswith("acc") else "none"
                for i, p, t, loss in zip(mine, preds.tolist(), target.tolist(), losses.tolist()):
                    records.append({"subtask": sub, "example_id": i, "prediction": str(p), "target": str(t),
                                    "correct": float(p == t), "score": float(p == t), "loss": loss,
                                    "aggregate": kind, "headline": sub in headline})
        return records

    def _update_choice(self, sub: str, m: Mapping[str, torchmetrics.Metric], preds: Tensor, target: Tensor,
                       groups: Tensor, subjects: Tensor) -> None:
        if sub == "mmlu":
            names = le.MMLU_SUBJECTS
            by_group = {g: torch.tensor([(le.CATEGORY_OF.get(names[s]) if self.cfg.mmlu_breakdown == "category"
                                          else names[s]) == g for s in subjects.tolist()], device=preds.device)
                        for g in self._mmlu_groups()}
            for s, k in enumerate(self.cfg.mmlu_shots):
                correct = (preds[:, s] == target).float()
                m[f"acc_{k}shot"].update(correct)
                for g, rows in by_group.items():
                    if bool(rows.any()):
                        m[f"acc_{k}shot_{g}"].update(correct[rows])
            return
        pred = preds[:, 0]
        for name, metric in m.items():
            if name == "acc":
                metric.update((pred == target).float())
            elif name == "em":
                metric.update(pred, target, groups)
            else:
                metric.update(pred, target)

    # -- data ----------------------------------------------------------------------------------------------------

    def datamodule(self, loader: LoaderConfig, seed: int = 0) -> MultiTaskDataModule:
        """Train and evaluation examples of every subtask; ``task.mix`` resizes the training sets."""
        train: dict[str, Any] = {}
        val: dict[str, Any] = {}
        for sub in self.subtasks:
            train[sub], val[sub] = ld.build_examples(self.cfg, sub, self.source(), self.root(), seed,
                                                     GLUE_SUBTASKS.get(sub), SUPERGLUE.get(sub))
            for example in val[sub]:
                example["id"] = _example_id(example)
        weights = parse_pairs(self.cfg.mix, "task.mix", float)
        if weights:
            if missing := [s for s in self.subtasks if s not in weights]:
                raise ConfigError(f"task.mix names no weight for {', '.join(missing)}; give every selected subtask "
                                  "one (subtask=weight) or leave task.mix empty")
            total = sum(weights[s] for s in self.subtasks)
            scale = max(len(train[s]) * total / weights[s] for s in self.subtasks)
            train = {s: _Resized(train[s], max(len(train[s]), round(scale * weights[s] / total)))
                     for s in self.subtasks}
        from mtbench.data import MultiTaskDataModule  # Lightning: imported by a run, not by listing

        return MultiTaskDataModule(self.subtasks, train, val, self.collate, loader, seed, length=ld.length_key)

    def root(self) -> Path | None:
        """The local data root (``task.data_root``, else ``$MTBENCH_DATA``), or ``None``."""
        root = self.cfg.data_root or os.environ.get("MTBENCH_DATA", "")
        return Path(root).expanduser() if root else None

    def source(self) -> str:
        """The resolved data source: local, hub or synthetic."""
        if self.cfg.source == "auto":
            return "local" if self.root() else "hub"
        return self.cfg.source

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Tokenize one batch (layouts in the class docstring), padded to its longest row."""
        return le.collate(self.prompter, examples)



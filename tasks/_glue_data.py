"""GLUE / SuperGLUE records from local files, the hub or a seeded generator, and MultiRC's EM (helpers of glue.py).

Every source yields the same *raw records* (``(line, {column: value})``); one converter, :func:`to_examples`, turns
them into examples, so a local TSV, a hub split and the synthetic smoke data go through the same validation.
An example is ``{"inputs": [(text, pair | None), ...], "label": float, "group": int, "split": int, "index": int}``
(``index``: position in its split file(s), the stable example id of per-example predictions): one input per
choice for multiple choice (COPA), ``group`` is the MultiRC question (else the example index), ``split`` is 1 for
MNLI-mismatched evaluation rows and 0 otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtbench.backbones import SMOKE_WORDS
from mtbench.errors import ConfigError, DataError

from ._files import data_folder, is_file, read_text


Record = tuple[int, dict[str, Any]]
"""A raw record: its 1-based line in the source (row number for the hub) and its columns."""


@dataclass(frozen=True)
class Subtask:
    """One GLUE / SuperGLUE subtask: where its data lives and how a raw record becomes model inputs.

    Attributes:
        name: subtask name (the CLI name, lowercase).
        hub: (dataset id, config) on the Hugging Face hub.
        fields: text columns, each slot a tuple of accepted column names (first = canonical / hub name).
        label: accepted label column names.
        classes: raw label (lower-cased string) -> class index; ``None`` means regression.
        metrics: metric names; see ``glue.METRICS``.
        primary: the headline metric (one of ``metrics``).
        train_files: local candidates for the train split, relative to the data root; each candidate is a tuple of
            files concatenated in order; the first candidate whose files all exist wins.
        eval_files: local candidates for the evaluation (dev / validation) split.
        text: first segment, a ``str.format`` template over the field slots.
        pair: second segment template, or ``None`` for single-sentence tasks.
        choices: multiple choice: one second-segment template per choice (COPA); ``pair`` is then unused.
        group: column holding the group (MultiRC question) id, or ``None``.
        headerless: column names of TSVs that may come without a header (CoLA).
        score_range: allowed regression targets (STS-B).
        hub_eval: hub split used for evaluation.
        mm_files: local candidates of the second evaluation split (MNLI mismatched).
        hub_mm: hub split of the second evaluation split.
    """

    name: str
    hub: tuple[str, str]
    fields: tuple[tuple[str, ...], ...]
    label: tuple[str, ...]
    classes: Mapping[str, int] | None
    metrics: tuple[str, ...]
    primary: str
    train_files: tuple[tuple[str, ...], ...]
    eval_files: tuple[tuple[str, ...], ...]
    text: str = "{0}"
    pair: str | None = "{1}"
    choices: tuple[str, ...] = ()
    group: str | None = None
    headerless: tuple[str, ...] = ()
    score_range: tuple[float, float] = (0.0, 5.0)
    hub_eval: str = "validation"
    mm_files: tuple[tuple[str, ...], ...] = ()
    hub_mm: str = ""

    @property
    def regression(self) -> bool:
        """Whether the target is a real number (one-output head, MSE)."""
        return self.classes is None

    @property
    def num_classes(self) -> int:
        """Classes the metrics see: choices for multiple choice, 1 for regression."""
        if self.choices:
            return len(self.choices)
        return 1 if self.classes is None else len(set(self.classes.values()))

    @property
    def num_labels(self) -> int:
        """Outputs of the head: one score per choice row for multiple choice, else one per class."""
        return 1 if self.choices else self.num_classes

    def columns(self) -> list[str]:
        """Canonical column names (fields, label, group) for messages and synthetic records."""
        return [f[0] for f in self.fields] + [self.label[0]] + ([self.group] if self.group else [])


def classes(*names: str) -> dict[str, int]:
    """Label map accepting each class by name and by index: ``classes("no", "yes") -> {no: 0, yes: 1, 0: 0, 1: 1}``."""
    out = {str(i): i for i in range(len(names))}
    out.update({n.lower(): i for i, n in enumerate(names)})
    return out


def in_folders(file: str, *folders: str) -> tuple[tuple[str, ...], ...]:
    """One single-file candidate per folder: ``in_folders("dev.tsv", "rte", "RTE")``."""
    return tuple((f"{folder}/{file}",) for folder in folders)


def superglue_files(folder: str, official: str) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """(train, eval) jsonl candidates: own folder, official layout, then FewGLUE's 32-shot train (no FewGLUE dev)."""
    return ((*in_folders("train.jsonl", folder, official), (f"fewglue/{official}/train.jsonl",)),
            in_folders("val.jsonl", folder, official) + in_folders("dev.jsonl", folder))


def find_files(root: Path, candidates: Sequence[tuple[str, ...]]) -> tuple[Path, ...] | None:
    """The first candidate (a tuple of relative paths) whose files all exist under ``root``.

    Raises:
        DataError: a folder on the way cannot be entered (rather than reading as "missing").
    """
    for candidate in candidates:
        paths = tuple(root / rel for rel in candidate)
        if all(is_file(p) for p in paths):
            return paths
    return None


def local_files(spec: Subtask, root: Path | None, part: str) -> tuple[Path, ...]:
    """The local files of one split (``train``, ``eval``, ``eval_mm``) of a subtask under ``root``.

    Raises:
        ConfigError: no data root is configured.
        DataError: the root folder or the split's files are missing (the message says what to put where), the root
            is a file, or a folder cannot be read.
    """
    if root is None:
        raise ConfigError("task.source=local needs task.data_root or $MTBENCH_DATA (a folder with the GLUE files)")
    data_folder(root, f"create it and put the GLUE / SuperGLUE files there, e.g. {root}/rte/train.tsv and "
                      f"{root}/rte/dev.tsv (layouts in tasks/glue.py), or use task.source=hub or synthetic")
    candidates = {"train": spec.train_files, "eval": spec.eval_files, "eval_mm": spec.mm_files}[part]
    found = find_files(root, candidates)
    if found is None:
        what = {"train": "train", "eval": "dev / validation", "eval_mm": "mismatched dev"}[part]
        tried = ", ".join(" + ".join(c) for c in candidates)
        extra = " or task.mnli_mismatched=false" if part == "eval_mm" else ""
        fmt = "a SuperGLUE jsonl" if candidates[0][0].endswith(".jsonl") else "a GLUE TSV"
        raise DataError(f"subtask '{spec.name}': no local {what} data under {root}; tried {tried}. Put the {what} "
                        f"split at {root / candidates[0][0]} ({fmt}; columns {', '.join(spec.columns())}), or drop "
                        f"'{spec.name}' from task.subtasks, or use task.source=hub{extra}")
    return found


def read_file(spec: Subtask, path: Path) -> list[Record]:
    """Raw records of a local ``.jsonl`` (SuperGLUE) or ``.tsv`` (GLUE) file."""
    if path.suffix == ".jsonl":
        return _flatten(_read_jsonl(path))
    return _read_tsv(spec, path)


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line_no, line in enumerate(read_text(path, "a SuperGLUE jsonl file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise DataError(f"{path} line {line_no}: malformed JSON ({msg}), expected an object") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line_no}: malformed row, expected a JSON object, got {row!r:.40}")
        records.append((line_no, row))
    return records


def _read_tsv(spec: Subtask, path: Path) -> list[Record]:
    import pandas as pd

    # GLUE TSVs are unquoted: sentences hold stray quotes (MRPC) that csv quoting would swallow across lines.
    # A cheap pre-scan counts fields per line, because pandas fills short rows silently and drops line numbers. It
    # also normalises what pandas would take for rows: CRLF line ends, and blank lines (also "\r" alone) anywhere.
    text = read_text(path, f"a GLUE TSV with columns {', '.join(spec.columns())}")
    lines = [(i, line.removesuffix("\r")) for i, line in enumerate(text.split("\n"), 1)]
    lines = [(i, line) for i, line in lines if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty; expected a GLUE TSV with columns {', '.join(spec.columns())}")
    known = {name for slot in spec.fields for name in slot} | set(spec.label)
    first = lines[0][1].split("\t")
    header = not spec.headerless or bool(known & set(first))
    names = first if header else list(spec.headerless)
    rows = lines[1:] if header else lines
    for i, line in rows:
        n = line.count("\t") + 1
        if n != len(names):
            raise DataError(f"{path} line {i}: malformed row with {n} tab-separated fields, expected {len(names)} "
                            f"({', '.join(names)})")
    clean = "\n".join(line for _, line in lines) + "\n"
    df = pd.read_csv(io.StringIO(clean), sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                     lineterminator="\n", header=0 if header else None, names=None if header else names)
    if len(df) != len(rows):
        raise DataError(f"{path}: pandas read {len(df)} rows but the file has {len(rows)} data lines; "
                        "expected a plain tab-separated file with one example a line")
    return list(zip([i for i, _ in rows], df.to_dict("records")))


def hub_records(spec: Subtask, split: str) -> list[Record]:
    """Raw records of a hub split (``datasets.load_dataset``)."""
    dataset, config = spec.hub
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, config, split=split).to_list()
    except Exception as exc:
        raise DataError(
            f"could not load {dataset} ({config}, split {split}) for subtask '{spec.name}' from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; set task.data_root or $MTBENCH_DATA to "
            "a local copy (task.source=local), or use task.source=synthetic for a smoke run"
        ) from exc
    return _flatten((i, row) for i, row in enumerate(rows, 1))


def _flatten(records: Iterable[Record]) -> list[Record]:
    """Bring nested SuperGLUE records to flat columns: WSC ``target`` spans, MultiRC passages (one row per answer)."""
    out: list[Record] = []
    for line, row in records:
        if isinstance(row.get("target"), dict):
            row = {**{k: v for k, v in row.items() if k != "target"}, **row["target"]}
        passage = row.get("passage")
        if isinstance(passage, dict):
            for q_no, question in enumerate(passage.get("questions", [])):
                for answer in question.get("answers", []):
                    out.append((line, {"paragraph": passage.get("text"), "question": question.get("question"),
                                       "answer": answer.get("text"), "label": answer.get("label"),
                                       "qid": f"{row.get('idx', line)}/{question.get('idx', q_no)}"}))
            continue
        if isinstance(row.get("idx"), dict):  # hub MultiRC: already one row per answer, ids nested
            row = {**row, "qid": f"{row['idx'].get('paragraph')}/{row['idx'].get('question')}"}
        out.append((line, row))
    return out


def to_examples(spec: Subtask, parts: Sequence[tuple[str, list[Record]]], split_id: int = 0) -> list[dict[str, Any]]:
    """Validate raw records and build examples.

    Args:
        spec: the subtask.
        parts: (where, records) per source file, concatenated in order; ``where`` names the file in messages.
        split_id: 1 for the MNLI-mismatched evaluation rows, else 0.

    Raises:
        DataError: a missing column, a label outside the allowed values, or a malformed value (naming file and line).
    """
    examples: list[dict[str, Any]] = []
    groups: dict[Any, int] = {}
    for where, records in parts:
        for line, row in records:
            slots = [_text(spec, where, line, row, aliases) for aliases in spec.fields]
            label = _label(spec, where, line, _get(spec, where, line, row, spec.label))
            if spec.group:
                group = groups.setdefault(_get(spec, where, line, row, (spec.group,)), len(groups))
            else:
                group = len(examples)
            text = spec.text.format(*slots)
            inputs: list[tuple[str, str | None]]
            if spec.choices:
                inputs = [(text, choice.format(*slots)) for choice in spec.choices]
            else:
                inputs = [(text, spec.pair.format(*slots) if spec.pair else None)]
            examples.append({"inputs": inputs, "label": label, "group": group, "split": split_id,
                             "index": len(examples)})
    if not examples:
        raise DataError(f"no examples for subtask '{spec.name}' in {', '.join(w for w, _ in parts)}")
    return examples


def _get(spec: Subtask, where: str, line: int, row: Mapping[str, Any], aliases: Sequence[str]) -> Any:
    for name in aliases:
        if name in row:
            return row[name]
    accepted = " or ".join(repr(a) for a in aliases)
    raise DataError(f"{where} line {line}: missing column {accepted} for subtask '{spec.name}'; expected columns "
                    f"{', '.join(spec.columns())}; found {', '.join(map(str, row))}")


def _text(spec: Subtask, where: str, line: int, row: Mapping[str, Any], aliases: Sequence[str]) -> str:
    value = _get(spec, where, line, row, aliases)
    if not isinstance(value, str):
        raise DataError(f"{where} line {line}: malformed row, column '{aliases[0]}' of subtask '{spec.name}' should "
                        f"be text, got {value!r}")
    return value


def _label(spec: Subtask, where: str, line: int, value: Any) -> float:
    if spec.classes is None:
        lo, hi = spec.score_range
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not lo <= score <= hi:  # also rejects NaN
            raise DataError(f"{where} line {line}: label {value!r} of subtask '{spec.name}' is not allowed; "
                            f"allowed values: a number in [{lo:g}, {hi:g}]")
        return score
    if isinstance(value, bool):
        key = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        key = str(int(value))
    else:
        key = str(value).strip().lower()
    if key not in spec.classes:
        raise DataError(f"{where} line {line}: label {value!r} of subtask '{spec.name}' is not allowed; "
                        f"allowed values: {', '.join(spec.classes)}")
    return float(spec.classes[key])


# Cue families by class index: binary label 1 (positive, paraphrase, true) reads as the "good" words.
_CUES = (("bad", "awful", "poor", "sad", "terrible"), ("good", "great", "fine", "nice", "happy"),
         ("red", "blue", "green"))
_FILLER = tuple(w for w in SMOKE_WORDS if all(w not in cue for cue in _CUES))


def synthetic_records(spec: Subtask, split: str, n: int, seed: int) -> list[Record]:
    """``n`` seeded raw records in the subtask's own columns, learnable from one cue word.

    The class is told by which cue family (negative / positive / colour) a word in the last text slot comes from;
    STS-B's score by how many of its three cue words are positive; COPA's answer is the choice with a positive cue;
    MultiRC's answers come three to a question sharing paragraph and question.
    """
    rng = random.Random(f"{seed}/{spec.name}/{split}")
    cols = [f[0] for f in spec.fields]
    choice_slots = [int(m) for t in spec.choices for m in re.findall(r"\{(\d+)\}", t)]
    records: list[Record] = []
    shared: dict[str, str] = {}
    for i in range(n):
        if not spec.group or i % 3 == 0:
            shared = {c: _phrase(rng) for c in cols}
        row: dict[str, Any] = dict(shared)
        cue_slot = len(cols) - 1
        if spec.choices:
            label = rng.randrange(len(spec.choices))
            for k, slot in enumerate(choice_slots):
                row[cols[slot]] = _phrase(rng, (rng.choice(_CUES[1 if k == label else 0]),))
            row[spec.label[0]] = str(label)
        elif spec.classes is None:
            k = rng.randint(0, 3)
            row[cols[cue_slot]] = _phrase(rng, _CUES[1][:k] + _CUES[0][: 3 - k])
            lo, hi = spec.score_range
            row[spec.label[0]] = str(lo + (hi - lo) * k / 3)
        else:
            label = rng.randrange(spec.num_classes)
            row[cols[cue_slot]] = _phrase(rng, (rng.choice(_CUES[label]),))
            row[spec.label[0]] = str(label)
        if spec.group:
            row[spec.group] = i // 3
        records.append((i + 1, row))
    return records


def _phrase(rng: random.Random, cues: Sequence[str] = ()) -> str:
    words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 6))]
    for cue in cues:
        words.insert(rng.randint(0, len(words)), cue)
    return " ".join(words)

"""LLM-mixture data: rows from local files, the hub or a seeded generator, instruction prompts, and token ids.

Every source yields the same rows per benchmark (Alpaca ``instruction/input/output``, GSM8K ``question/answer``,
MMLU ``question/choices/answer/subject``; SuperGLUE goes through the GLUE task's readers and validation), so local
files, hub splits and the smoke data share one validation path. :class:`Prompter` turns (few-shot turns, user text,
response) into token ids, through the tokenizer's chat template when it has one and plain text otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtbench.backbones import SMOKE_WORDS
from mtbench.errors import DataError

from . import _glue_data as gd
from ._files import data_folder, is_file, is_folder, read_text
from ._llm_eval import MMLU_SUBJECTS, Turn, gsm8k_gold


Row = tuple[int, dict[str, Any]]
"""A raw row: its 1-based line in the source file (row number for the hub and the generator) and its columns."""

ALPACA_FILES = ("alpaca/alpaca_data.json", "alpaca/alpaca_data_cleaned.json", "alpaca/alpaca_small_2k.json",
                "alpaca/alpaca_data_1k.json")
"""Local Alpaca candidates under the data root, first found wins (the full 52K file, then the subsets)."""
GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
MMLU_DIRS = ("mmlu", "mmlu/data")
"""Local MMLU folders holding ``{dev,val,test}/<subject>_<split>.csv`` (the hendrycks/test layout)."""
MMLU_HUB_SPLITS = {"dev": "dev", "val": "validation", "test": "test", "auxiliary_train": "auxiliary_train"}
HUB = {"alpaca": ("tatsu-lab/alpaca", None), "gsm8k": ("openai/gsm8k", "main"), "mmlu": ("cais/mmlu", "all")}
LETTERS = ("A", "B", "C", "D")


# -- readers ---------------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[Row]:
    """Rows of a ``.jsonl`` file or of a ``.json`` array of objects, each with its line number."""
    text = read_text(path, "a JSON array of objects" if path.suffix == ".json" else "one JSON object a line")
    rows = _json_array(path, text) if path.suffix == ".json" else _jsonl(path, text)
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line}: malformed row, expected a JSON object, got {row!r:.40}")
    return rows


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((line_no, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise DataError(f"{path} line {line_no}: malformed JSON ({msg}), expected one object a line") from exc
    return rows


def _json_array(path: Path, text: str) -> list[Row]:
    """Parse ``[{...}, {...}]`` item by item so every row keeps the line it starts on."""
    decoder, rows, i, line = json.JSONDecoder(), [], 0, 1

    def skip(j: int) -> int:
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        return j

    def fail(j: int, what: str) -> DataError:
        return DataError(f"{path} line {text.count(chr(10), 0, j) + 1}: malformed JSON ({what}); expected an array "
                         "of objects with instruction, input, output")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise fail(i, "the file does not start with '['")
    i, counted = skip(i + 1), 0
    while i < len(text) and text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from exc
        except RecursionError as exc:
            raise fail(i, "nested too deeply") from exc
        rows.append((line, obj))
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i >= len(text) or text[i] != "]":
            raise fail(i, "expected ',' or ']' after an item")
    return rows


def read_mmlu_csv(path: Path, subject: str) -> list[Row]:
    """Rows of a headerless MMLU CSV (question, A, B, C, D, answer letter) as ``question/choices/answer/subject``."""
    rows = []
    text = read_text(path, "a headerless MMLU CSV (question, A, B, C, D, answer letter)")
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines: report where the row starts
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != 6 or fields[5].strip().upper() not in LETTERS:
                raise DataError(f"{path} line {line}: malformed MMLU row, expected 6 comma-separated fields "
                                f"(question, A, B, C, D, answer letter A-D), got {len(fields)}: {fields[-1]!r:.40}")
            rows.append((line, {"question": fields[0], "choices": fields[1:5],
                                "answer": LETTERS.index(fields[5].strip().upper()), "subject": subject}))
    except csv.Error as exc:
        raise DataError(f"{path} line {start}: malformed CSV ({exc})") from exc
    return rows


def field(where: str, line: int, row: dict[str, Any], name: str, expected: Sequence[str], kind: type = str) -> Any:
    """``row[name]`` checked for presence and type; errors name the file, line and expected columns."""
    if name not in row:
        raise DataError(f"{where} line {line}: missing column '{name}'; expected columns {', '.join(expected)}; "
                        f"found {', '.join(map(str, row))}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where} line {line}: column '{name}' should be {kind.__name__}, got {value!r:.40}")
    return value


def hub_rows(subtask: str, dataset: str, config: str | None, split: str) -> list[Row]:
    """Rows of a hub split through ``datasets.load_dataset``."""
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, config, split=split).to_list()
    except Exception as exc:
        raise DataError(
            f"could not load {dataset} ({config or 'default'}, split {split}) for subtask '{subtask}' from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; set task.data_root or $MTBENCH_DATA to "
            "a local copy (layouts in tasks/llm_mixture.py), or use task.source=synthetic for a smoke run"
        ) from exc
    return list(enumerate(rows, 1))


def local_file(root: Path, candidates: Sequence[str], subtask: str, what: str, fmt: str) -> Path:
    """The first existing candidate under ``root``; otherwise a :class:`DataError` saying what to put where."""
    for rel in candidates:
        if is_file(root / rel):
            return root / rel
    raise DataError(f"subtask '{subtask}': no local {what} under {root}; tried {', '.join(candidates)}. Put {fmt} at "
                    f"{root / candidates[0]}, or drop '{subtask}' from task.subtasks, or use task.source=hub")


def mmlu_files(root: Path, split: str, subjects: Sequence[str]) -> list[tuple[Path, str]]:
    """``(csv path, subject)`` of one MMLU split for every subject; all must exist."""
    for folder in MMLU_DIRS:
        base = root / folder / split
        if is_folder(base):
            missing = [s for s in subjects if not is_file(base / f"{s}_{split}.csv")]
            if missing:
                raise DataError(f"subtask 'mmlu': {base} lacks {len(missing)} subject file(s), e.g. "
                                f"{base / f'{missing[0]}_{split}.csv'}; add them or restrict task.mmlu_subjects")
            return [(base / f"{s}_{split}.csv", s) for s in subjects]
    raise DataError(f"subtask 'mmlu': no local '{split}' split under {root}; tried "
                    f"{', '.join(f'{d}/{split}/' for d in MMLU_DIRS)}. Put the hendrycks/test CSVs at "
                    f"{root / 'mmlu' / split}/<subject>_{split}.csv (headerless: question, A, B, C, D, answer), or "
                    "drop 'mmlu' from task.subtasks, or use task.source=hub")


# -- normalised items ------------------------------------------------------------------------------------------------


def alpaca_items(where: str, rows: list[Row]) -> list[dict[str, str]]:
    """Validated ``{instruction, input, output}`` items (``input`` may be absent or empty)."""
    cols = ("instruction", "input", "output")
    out = []
    for line, row in rows:
        item = {c: field(where, line, row, c, cols) for c in ("instruction", "output")}
        item["input"] = field(where, line, row, "input", cols) if "input" in row else ""
        out.append(item)
    return out


def gsm8k_items(where: str, rows: list[Row]) -> list[dict[str, str]]:
    """Validated ``{question, answer}`` items whose answer carries the ``#### n`` line."""
    out = []
    for line, row in rows:
        item = {c: field(where, line, row, c, ("question", "answer")) for c in ("question", "answer")}
        if "####" not in item["answer"]:
            raise DataError(f"{where} line {line}: GSM8K answer has no '#### <number>' final line")
        out.append(item)
    return out


def mmlu_items(where: str, rows: list[Row]) -> list[dict[str, Any]]:
    """Validated ``{question, choices (4), answer (0-3), subject}`` items."""
    cols = ("question", "choices", "answer", "subject")
    out = []
    for line, row in rows:
        choices = field(where, line, row, "choices", cols, list)
        answer = field(where, line, row, "answer", cols, int)
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices) or not 0 <= answer < 4:
            raise DataError(f"{where} line {line}: MMLU row needs 4 text choices and an answer in 0-3")
        out.append({"question": field(where, line, row, "question", cols), "choices": list(choices),
                    "answer": answer, "subject": field(where, line, row, "subject", cols)})
    return out


# -- generated smoke data --------------------------------------------------------------------------------------------

_GOOD, _BAD = ("good", "great", "fine", "nice", "happy"), ("bad", "awful", "poor", "sad", "terrible")
_FILLER = tuple(w for w in SMOKE_WORDS if w not in _GOOD + _BAD)
SYNTHETIC_SUBJECTS = ("abstract_algebra", "philosophy", "sociology", "nutrition")
"""One real subject per MMLU category, so the smoke data exercises every breakdown."""


def synthetic_rows(subtask: str, split: str, n: int, seed: int) -> list[Row]:
    """``n`` seeded rows in the source columns of ``alpaca``, ``gsm8k`` or ``mmlu`` (MMLU ``dev``: 5 a subject)."""
    rng = random.Random(f"{seed}/{subtask}/{split}")
    rows: list[dict[str, Any]] = []
    if subtask == "alpaca":
        for _ in range(n):
            words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 5))]
            kind = rng.randrange(3)
            instruction = ("Repeat the words.", "Reverse the words.", "Count the words.")[kind]
            output = (" ".join(words), " ".join(reversed(words)), str(len(words)))[kind]
            rows.append({"instruction": instruction, "input": " ".join(words), "output": output})
    elif subtask == "gsm8k":
        for _ in range(n):
            a, b, who = rng.randint(1, 20), rng.randint(1, 20), rng.choice(("Ann", "Bob", "Eve"))
            rows.append({"question": f"{who} has {a} apples and buys {b} more. How many apples does {who} have?",
                         "answer": f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    else:
        per_subject = [(s, 5) for s in SYNTHETIC_SUBJECTS] if split == "dev" else \
            [(SYNTHETIC_SUBJECTS[i % 4], 1) for i in range(n)]
        for subject, count in per_subject:
            for _ in range(count):
                answer = rng.randrange(4)
                choices = [rng.choice(_GOOD if k == answer else _BAD) for k in range(4)]
                rows.append({"question": f"Which word is positive: {' '.join(rng.sample(_FILLER, 3))}?",
                             "choices": choices, "answer": answer, "subject": subject})
    return list(enumerate(rows, 1))


def synthetic_superglue(spec: gd.Subtask, split: str, n: int, seed: int) -> list[Row]:
    """The GLUE task's seeded SuperGLUE rows (one cue word tells the label), in the subtask's own columns."""
    return gd.synthetic_records(spec, split, n, seed)


# -- examples --------------------------------------------------------------------------------------------------------
# An example is tokenizer-free: ``{"kind": "lm", "shots", "user", "response"}`` (training, Alpaca evaluation),
# ``{"kind": "choice", "contexts": [(shots, user), ...], "choices", "label", "group", "subject"}`` or
# ``{"kind": "generate", "shots", "user", "gold"}``.


def lm(user: str, response: str, shots: Sequence[Turn] = ()) -> dict[str, Any]:
    """A training (or perplexity) example: loss on ``response`` after ``shots`` and ``user``."""
    return {"kind": "lm", "shots": tuple(shots), "user": user, "response": response}


def subset(n: int, limit: int, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of ``range(n)`` of size ``limit`` (all when 0 or larger)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(kept, held-out) indices: a fixed ``ceil(fraction · n)`` share (at least one, never all) held out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    return sorted(order[k:]), sorted(order[:k])


def alpaca_user(item: dict[str, str]) -> str:
    """The user turn of an Alpaca item: the instruction, then its input (if any) after a blank line."""
    return item["instruction"] + (f"\n\n{item['input']}" if item["input"].strip() else "")


def mmlu_question(item: dict[str, Any]) -> str:
    """``question``, the four lettered choices and ``Answer:``, one a line."""
    lines = [item["question"], *(f"{letter}. {c}" for letter, c in zip(LETTERS, item["choices"])), "Answer:"]
    return "\n".join(lines)


def mmlu_header(subject: str) -> str:
    """The standard MMLU instruction naming the subject (none for the subject-less auxiliary_train rows)."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def mmlu_contexts(item: dict[str, Any], dev: dict[str, list[dict[str, Any]]], shots: Sequence[int],
                  ) -> list[tuple[tuple[Turn, ...], str]]:
    """One (turns, user) context per shot count: the first k dev items of the subject as answered turns."""
    out = []
    for k in shots:
        exemplars = dev.get(item["subject"], [])[:k]
        if len(exemplars) < k:
            raise DataError(f"subtask 'mmlu': {k}-shot needs {k} dev exemplars of '{item['subject']}', found "
                            f"{len(exemplars)}; lower task.mmlu_shots or add the dev split")
        questions = [mmlu_question(d) for d in exemplars] + [mmlu_question(item)]
        questions[0] = mmlu_header(item["subject"]) + questions[0]
        turns = tuple((q, LETTERS[d["answer"]]) for q, d in zip(questions, exemplars))
        out.append((turns, questions[-1]))
    return out


def gsm8k_target(answer: str, calculator: bool) -> str:
    """A GSM8K training target, without the ``<<a+b=c>>`` calculator annotations unless ``calculator``."""
    return answer if calculator else re.sub(r"<<[^>]*>>", "", answer)


def length_key(example: dict[str, Any]) -> int:
    """Characters an example puts in front of the model (a cheap proxy for its token count)."""
    contexts = example.get("contexts") or [(example["shots"], example["user"])]
    return max(len(user) + sum(len(u) + len(a) for u, a in shots) for shots, user in contexts) + \
        len(example.get("response", ""))


def build_examples(cfg: Any, sub: str, source: str, root: Path | None, seed: int, glue_spec: gd.Subtask | None,
                   prompt: tuple[str, tuple[str, ...] | None] | None) -> tuple[list[dict[str, Any]],
                                                                             list[dict[str, Any]]]:
    """(train, evaluation) examples of one subtask from ``source``, after the limits; evaluation sorted by length.

    Args:
        cfg: the task config (``LLMMixtureConfig``).
        sub: subtask name.
        source: ``local``, ``hub`` or ``synthetic``.
        root: the local data root (``None`` unless local).
        seed: run seed (training subsets; evaluation subsets always use seed 0 so runs compare on the same items).
        glue_spec: the GLUE task's spec of a SuperGLUE subtask (its files, columns and labels).
        prompt: the SuperGLUE (template, answer words) of the subtask.
    """
    if source == "local" and root is None:
        raise DataError("task.source=local needs task.data_root or $MTBENCH_DATA (a folder with the benchmark files)")
    if source == "local":
        data_folder(root, "create it with the benchmark files (layouts in tasks/llm_mixture.py), or use "  # type: ignore[arg-type]
                          "task.source=hub or synthetic")
    if sub == "alpaca":
        train, evaluation = _alpaca(cfg, source, root, seed)
    elif sub == "mmlu":
        train, evaluation = _mmlu(cfg, source, root, seed)
    elif sub == "gsm8k":
        train, evaluation = _gsm8k(cfg, source, root, seed)
    else:
        assert glue_spec is not None and prompt is not None
        train, evaluation = _superglue(cfg, sub, source, root, seed, glue_spec, prompt)
    train = [train[i] for i in subset(len(train), cfg.train_limit, seed)]
    limit = dict(pair.split("=") for pair in cfg.eval_limits).get(sub, cfg.eval_limit)
    if sub == "multirc":  # limit whole questions, so EM sees every answer of a kept question
        groups = sorted({ex["group"] for ex in evaluation})
        keep = {groups[i] for i in subset(len(groups), int(limit), 0)}
        evaluation = [ex for ex in evaluation if ex["group"] in keep]
    else:
        evaluation = [evaluation[i] for i in subset(len(evaluation), int(limit), 0)]
    return train, sorted(evaluation, key=length_key, reverse=True)


def _alpaca(cfg: Any, source: str, root: Path | None, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if source == "synthetic":
        n = cfg.synthetic_size
        train = alpaca_items("synthetic alpaca/train", synthetic_rows("alpaca", "train", n, seed))
        held = alpaca_items("synthetic alpaca/eval", synthetic_rows("alpaca", "eval", n, seed))
    else:
        if source == "local":
            path = local_file(root, ALPACA_FILES, "alpaca", "Alpaca data",  # type: ignore[arg-type]
                              "a JSON array of {instruction, input, output} objects")
            items = alpaca_items(str(path), read_rows(path))
        else:
            items = alpaca_items("hub tatsu-lab/alpaca:train", hub_rows("alpaca", *HUB["alpaca"], "train"))
        kept, out = holdout_split(len(items), cfg.alpaca_eval_fraction)
        train, held = [items[i] for i in kept], [items[i] for i in out]
    return [lm(alpaca_user(it), it["output"]) for it in train], [lm(alpaca_user(it), it["output"]) for it in held]


def _mmlu_split(cfg: Any, source: str, root: Path | None, split: str, seed: int) -> list[dict[str, Any]]:
    subjects = cfg.mmlu_subjects or MMLU_SUBJECTS
    if source == "synthetic":
        return mmlu_items(f"synthetic mmlu/{split}", synthetic_rows("mmlu", split, cfg.synthetic_size, seed))
    if source == "hub":
        rows = hub_rows("mmlu", *HUB["mmlu"], MMLU_HUB_SPLITS[split])
        items = mmlu_items(f"hub cais/mmlu:{MMLU_HUB_SPLITS[split]}", rows)
        return [it for it in items if split == "auxiliary_train" or it["subject"] in subjects]
    if split == "auxiliary_train":
        raise DataError("subtask 'mmlu': auxiliary_train is read from the hub only; drop it from "
                        "task.mmlu_train_splits for local data")
    return [it for path, subject in mmlu_files(root, split, subjects)  # type: ignore[arg-type]
            for it in mmlu_items(str(path), read_mmlu_csv(path, subject))]


def _mmlu(cfg: Any, source: str, root: Path | None, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train = [it for split in cfg.mmlu_train_splits for it in _mmlu_split(cfg, source, root, split, seed)]
    dev: dict[str, list[dict[str, Any]]] = {}
    if max(cfg.mmlu_shots):
        for it in _mmlu_split(cfg, source, root, "dev", seed):
            dev.setdefault(it["subject"], []).append(it)
    evaluation = []
    for i, it in enumerate(_mmlu_split(cfg, source, root, "test", seed)):
        subject = MMLU_SUBJECTS.index(it["subject"]) if it["subject"] in MMLU_SUBJECTS else -1
        evaluation.append({"kind": "choice", "contexts": mmlu_contexts(it, dev, cfg.mmlu_shots), "choices": LETTERS,
                           "label": it["answer"], "group": i, "subject": subject})
    return [lm(mmlu_header(it["subject"]) + mmlu_question(it), LETTERS[it["answer"]]) for it in train], evaluation


def _gsm8k(cfg: Any, source: str, root: Path | None, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def load(split: str) -> list[dict[str, str]]:
        if source == "synthetic":
            return gsm8k_items(f"synthetic gsm8k/{split}", synthetic_rows("gsm8k", split, cfg.synthetic_size, seed))
        if source == "hub":
            return gsm8k_items(f"hub openai/gsm8k:{split}", hub_rows("gsm8k", *HUB["gsm8k"], split))
        path = local_file(root, (GSM8K_FILES[split],), "gsm8k", f"{split} split",  # type: ignore[arg-type]
                          "a jsonl of {question, answer} objects (answer ending in '#### <number>')")
        return gsm8k_items(str(path), read_rows(path))

    def user(item: dict[str, str]) -> str:
        return f"Question: {item['question']}\nAnswer:"

    train = load("train")
    targets = [gsm8k_target(it["answer"], cfg.gsm8k_calculator) for it in train]
    shots = tuple((user(it), t) for it, t in zip(train[: cfg.gsm8k_shots], targets))
    evaluation = [{"kind": "generate", "shots": shots, "user": user(it), "gold": gsm8k_gold(it["answer"])}
                  for it in load("test")]
    return [lm(user(it), t) for it, t in zip(train, targets)], evaluation


def _superglue(cfg: Any, sub: str, source: str, root: Path | None, seed: int, spec: gd.Subtask,
               prompt: tuple[str, tuple[str, ...] | None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    template, answers = prompt
    mine = dataclasses.replace(spec, text=template, pair=None) if answers else dataclasses.replace(spec, text=template)

    def parts(part: str) -> list[tuple[str, list[Row]]]:
        if source == "synthetic":
            return [(f"synthetic {sub}/{part}", synthetic_superglue(spec, part, cfg.synthetic_size, seed))]
        if source == "hub":
            split = "train" if part == "train" else spec.hub_eval
            return [(f"hub {spec.hub[0]}/{spec.hub[1]}:{split}", gd.hub_records(spec, split))]
        return [(str(p), gd.read_file(spec, p)) for p in gd.local_files(spec, root, part)]

    train_parts = parts("train")
    try:
        eval_parts = parts("eval")
    except DataError:
        if source != "local" or not cfg.holdout_missing_eval:
            raise
        # No local validation file (FewGLUE-only tasks): hold out whole source lines (a MultiRC paragraph is one).
        (where, records), = train_parts
        lines = sorted({line for line, _ in records})
        kept, out = holdout_split(len(lines), cfg.holdout_missing_eval)
        held = {lines[i] for i in out}
        train_parts = [(where, [r for r in records if r[0] not in held])]
        eval_parts = [(f"{where} (held out)", [r for r in records if r[0] in held])]

    def words(ex: dict[str, Any]) -> list[str]:
        return list(answers) if answers else [pair for _, pair in ex["inputs"]]

    train = [lm(ex["inputs"][0][0], words(ex)[int(ex["label"])]) for ex in gd.to_examples(mine, train_parts)]
    evaluation = [{"kind": "choice", "contexts": [((), ex["inputs"][0][0])], "choices": words(ex),
                   "label": int(ex["label"]), "group": ex["group"]} for ex in gd.to_examples(mine, eval_parts)]
    return train, evaluation

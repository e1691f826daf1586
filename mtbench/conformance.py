"""Conformance checks every registered method must pass, on a tiny random BERT and two synthetic tasks.

Each check takes a method class and returns ``(ok, message)``; a check that does not apply to a method raises
:class:`SkipCheck`. The test suite (``tests/test_conformance.py``) runs them over every registered method, and
``mtbench check-method FILE.py`` runs them over a plugin, so a new method is tested without editing any test.

The harness drives a method the way the runner does: ``apply`` the backbone, freeze everything except
``method.trainable(model)`` and the heads, route each forward with ``set_task`` (mixed per-example task ids), add
``aux_loss`` to the task loss and build the optimizer from ``param_groups``.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import tiny_bert
from .interfaces import Method, MethodConfig, MultiTaskModel


TASKS = ("a", "b")
"""Task names handed to every method."""

CheckFn = Callable[[type[Method]], tuple[bool, str]]

# Exclusions, each with its reason, keyed by (method name, check name). Keep this list short; it should shrink.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("full_ft", "no_match_raises"): "full fine-tuning adapts no layer, so target_modules is never read",
}
# Methods that train the whole backbone by design: `trainable_count` expects trainable == total for them.
TRAINS_EVERYTHING: dict[str, str] = {
    "full_ft": "the full fine-tuning baseline trains every parameter (methods.md §1)",
}
# Methods whose output may differ from the backbone at init: `identity_at_init` is skipped for them.
NOT_IDENTITY_AT_INIT: dict[str, str] = {}


class SkipCheck(Exception):
    """Raised by a check that does not apply to the method (for example merging a non-mergeable method)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one method."""

    name: str
    ok: bool
    message: str
    skipped: bool = False


def method_name(method_cls: type[Method]) -> str:
    """Registry name of a built-in method (its file stem), or the class name for plugins."""
    module = method_cls.__module__
    return module.rpartition(".")[2] if module.startswith("mtbench.methods.") else method_cls.__name__


@dataclass
class _Rig:
    method: Method
    model: MultiTaskModel
    inputs: dict[str, Tensor]
    task_ids: Tensor
    labels: Tensor


def _build(method_cls: type[Method], cfg: MethodConfig | None = None, seed: int = 0) -> _Rig:
    """Adapt a fresh tiny BERT, add one linear CLS head per task and freeze as the runner does."""
    torch.manual_seed(seed)
    text = tiny_bert()
    method = method_cls(cfg if cfg is not None else method_cls.config_cls(), tasks=TASKS)
    backbone = method.apply(text.model)
    heads = nn.ModuleDict({t: nn.Linear(text.hidden_size, 2) for t in TASKS})
    model = MultiTaskModel(backbone, heads)
    # As the runner's set_trainable: the method names its parameters on the whole model; heads always train.
    trainable = method.trainable(model) | {f"heads.{n}" for n, _ in heads.named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    if not trainable <= names:
        raise AssertionError(f"trainable() names unknown parameters: {sorted(trainable - names)[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    # A fixed batch mixing both tasks, independent of the seed, so that two rigs see the same inputs.
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(5, text.tokenizer.vocab_size, (4, 7), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    task_ids = torch.tensor([0, 1, 1, 0])
    return _Rig(method, model, inputs, task_ids, torch.randint(0, 2, (4,), generator=gen))


def _forward(rig: _Rig) -> tuple[Tensor, Tensor]:
    """(last hidden state (B, T, D), per-example logits of its own task's head (B, 2))."""
    rig.method.set_task(rig.model, rig.task_ids)
    hidden = rig.model.backbone(**rig.inputs).last_hidden_state
    logits = torch.stack([rig.model.heads[t](hidden[:, 0]) for t in TASKS], dim=1)
    return hidden, logits[torch.arange(len(rig.task_ids)), rig.task_ids]


def _backward(rig: _Rig) -> Tensor:
    rig.model.train()
    _, logits = _forward(rig)
    loss = F.cross_entropy(logits, rig.labels)
    aux = rig.method.aux_loss(rig.model)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    return loss


def _step(rig: _Rig, lr: float = 1e-2) -> None:
    """One AdamW step on the method's parameter groups."""
    optimizer = torch.optim.AdamW(rig.method.param_groups(rig.model, lr, 0.01))
    _backward(rig)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _eval(rig: _Rig) -> tuple[Tensor, Tensor]:
    rig.model.eval()
    return _forward(rig)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_forward_backward(method_cls: type[Method]) -> tuple[bool, str]:
    """apply → forward → backward runs and gives a finite loss."""
    loss = _backward(_build(method_cls))
    return bool(torch.isfinite(loss)), f"loss = {loss.item():.4g}"


def check_grads_only_trainable(method_cls: type[Method]) -> tuple[bool, str]:
    """Frozen parameters get no gradient; some method-trainable parameter does."""
    rig = _build(method_cls)
    _backward(rig)
    frozen = [n for n, p in rig.model.named_parameters() if not p.requires_grad and p.grad is not None]
    if frozen:
        return False, f"frozen parameters received gradients: {frozen[:5]}"
    trainable = {n for n in rig.method.trainable(rig.model) if n.startswith("backbone.")}
    with_grad = [n for n, p in rig.model.named_parameters() if n in trainable and p.grad is not None]
    if not with_grad:
        return False, "no backbone parameter named by trainable() received a gradient"
    return True, f"{len(with_grad)}/{len(trainable)} trainable backbone parameters received gradients"


def check_frozen_unchanged(method_cls: type[Method]) -> tuple[bool, str]:
    """Frozen weights are bit-identical after an AdamW step."""
    rig = _build(method_cls)
    before = {n: p.detach().clone() for n, p in rig.model.named_parameters() if not p.requires_grad}
    _step(rig)
    params = dict(rig.model.named_parameters())
    changed = [n for n, t in before.items() if not torch.equal(params[n], t)]
    return not changed, f"frozen parameters changed: {changed[:5]}" if changed else f"{len(before)} frozen tensors"


def check_trainable_count(method_cls: type[Method]) -> tuple[bool, str]:
    """0 < trainable < total backbone parameters (trainable == total for methods in TRAINS_EVERYTHING)."""
    rig = _build(method_cls)
    params = list(rig.model.backbone.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    message = f"{trainable:,} of {total:,} backbone parameters train"
    if method_name(method_cls) in TRAINS_EVERYTHING:
        return trainable == total, message
    return 0 < trainable < total, message


def check_state_dict_roundtrip(method_cls: type[Method]) -> tuple[bool, str]:
    """A trained state dict loads strictly into a freshly applied model and reproduces its outputs."""
    rig = _build(method_cls)
    _step(rig)
    fresh = _build(method_cls, seed=1)
    fresh.model.load_state_dict(rig.model.state_dict(), strict=True)
    diff = max(_max_diff(a, b) for a, b in zip(_eval(rig), _eval(fresh)))
    return diff <= 1e-6, f"max |Δoutput| = {diff:.2e}"


def check_param_groups(method_cls: type[Method]) -> tuple[bool, str]:
    """param_groups covers every trainable parameter exactly once and nothing frozen."""
    rig = _build(method_cls)
    groups = rig.method.param_groups(rig.model, 1e-3, 0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    names = {id(p): n for n, p in rig.model.named_parameters()}
    trainable = {id(p) for p in rig.model.parameters() if p.requires_grad}
    problems = []
    if dupes := {names.get(i, "?") for i in seen if seen.count(i) > 1}:
        problems.append(f"listed twice: {sorted(dupes)[:5]}")
    if missing := trainable - set(seen):
        problems.append(f"missing: {sorted(names[i] for i in missing)[:5]}")
    if extra := set(seen) - trainable:
        problems.append(f"frozen or foreign: {sorted(names.get(i, '?') for i in extra)[:5]}")
    return not problems, "; ".join(problems) or f"{len(groups)} groups, {len(seen)} tensors"


def check_identity_at_init(method_cls: type[Method]) -> tuple[bool, str]:
    """At init the adapted backbone reproduces the un-adapted backbone's output."""
    if (reason := NOT_IDENTITY_AT_INIT.get(method_name(method_cls))) is not None:
        raise SkipCheck(reason)
    rig = _build(method_cls)
    plain = tiny_bert().model.eval()
    with torch.no_grad():
        expected = plain(**rig.inputs).last_hidden_state
    diff = _max_diff(_eval(rig)[0], expected)
    return diff <= 1e-6, f"max |Δhidden| = {diff:.2e}"


def check_merge_unmerge(method_cls: type[Method]) -> tuple[bool, str]:
    """After a training step, merge() keeps the output (1e-5) and unmerge() restores output and weights."""
    if not method_cls.mergeable:
        raise SkipCheck("not mergeable")
    rig = _build(method_cls)
    _step(rig)
    before = _eval(rig)[0]
    weights = {k: v.clone() for k, v in rig.model.state_dict().items()}
    rig.method.merge(rig.model)
    merged = _eval(rig)[0]
    moved = any(not torch.equal(v, weights[k]) for k, v in rig.model.state_dict().items())
    rig.method.unmerge(rig.model)
    restored = _eval(rig)[0]
    w_diff = max(_max_diff(v, weights[k]) for k, v in rig.model.state_dict().items() if v.is_floating_point())
    d_merge, d_back = _max_diff(merged, before), _max_diff(restored, before)
    message = f"merged Δ = {d_merge:.2e}, unmerged Δ = {d_back:.2e}, weights Δ = {w_diff:.2e}"
    if not moved:
        return False, f"merge() changed no weight ({message})"
    return d_merge <= 1e-5 and d_back <= 1e-5 and w_diff <= 1e-6, message


def check_no_match_raises(method_cls: type[Method]) -> tuple[bool, str]:
    """apply() with target_modules matching no layer raises ValueError (ConfigError is one)."""
    cfg = dataclasses.replace(method_cls.config_cls(), target_modules=("no_such_layer_anywhere",))
    try:
        _build(method_cls, cfg)
    except ValueError as exc:
        return True, f"{type(exc).__name__}: {exc}"
    return False, "apply() accepted target_modules that match no layer"


CHECKS: list[tuple[str, CheckFn]] = [
    ("forward_backward", check_forward_backward),
    ("grads_only_trainable", check_grads_only_trainable),
    ("frozen_unchanged", check_frozen_unchanged),
    ("trainable_count", check_trainable_count),
    ("state_dict_roundtrip", check_state_dict_roundtrip),
    ("param_groups", check_param_groups),
    ("identity_at_init", check_identity_at_init),
    ("merge_unmerge", check_merge_unmerge),
    ("no_match_raises", check_no_match_raises),
]


def run_check(method_cls: type[Method], name: str, fn: CheckFn) -> CheckResult:
    """Run one check; exclusions and :class:`SkipCheck` give a skipped result, errors a failed one."""
    if (reason := EXCEPTIONS.get((method_name(method_cls), name))) is not None:
        return CheckResult(name, True, reason, skipped=True)
    try:
        ok, message = fn(method_cls)
    except SkipCheck as exc:
        return CheckResult(name, True, str(exc), skipped=True)
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return CheckResult(name, False, f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})")
    return CheckResult(name, bool(ok), message)


def run_checks(method_cls: type[Method]) -> list[CheckResult]:
    """Run every check in :data:`CHECKS` on ``method_cls``."""
    return [run_check(method_cls, name, fn) for name, fn in CHECKS]

"""Conformance checks every registered method must pass, on a tiny random BERT and two synthetic tasks.

Each check takes a method class and returns ``(ok, message)``; a check that does not apply to a method raises
:class:`SkipCheck`. Messages state the measured value and what was expected (the threshold), passed or not. The test
suite (``tests/test_conformance.py``) runs them over every registered method, and
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
from .interfaces import Method, MethodConfig, MultiTaskModel, adapter_roles


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
    added: dict[str, bool]
    """Parameters ``apply`` added to the backbone (full names) -> whether they required grad right after it."""


def _build(method_cls: type[Method], cfg: MethodConfig | None = None, seed: int = 0) -> _Rig:
    """Adapt a fresh tiny BERT, add one linear CLS head per task and freeze as the runner does."""
    torch.manual_seed(seed)
    text = tiny_bert()
    method = method_cls(cfg if cfg is not None else method_cls.config_cls(), tasks=TASKS)
    original = {id(p) for p in text.model.parameters()}
    backbone = method.apply(text.model)
    heads = nn.ModuleDict({t: nn.Linear(text.hidden_size, 2) for t in TASKS})
    model = MultiTaskModel(backbone, heads)
    added = {n: p.requires_grad for n, p in backbone.named_parameters(prefix="backbone") if id(p) not in original}
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
    return _Rig(method, model, inputs, task_ids, torch.randint(0, 2, (4,), generator=gen), added)


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
    return bool(torch.isfinite(loss)), f"loss = {loss.item():.4g} (expected finite)"


def check_grads_only_trainable(method_cls: type[Method]) -> tuple[bool, str]:
    """Frozen parameters get no gradient; some method-trainable parameter does."""
    rig = _build(method_cls)
    _backward(rig)
    frozen = [n for n, p in rig.model.named_parameters() if not p.requires_grad and p.grad is not None]
    if frozen:
        return False, f"{len(frozen)} frozen parameters received gradients (expected 0): {frozen[:5]}"
    trainable = {n for n in rig.method.trainable(rig.model) if n.startswith("backbone.")}
    with_grad = [n for n, p in rig.model.named_parameters() if n in trainable and p.grad is not None]
    if not with_grad:
        return False, "0 backbone parameters named by trainable() received a gradient (expected at least 1)"
    return True, f"{len(with_grad)}/{len(trainable)} trainable backbone parameters received gradients (expected >= 1)"


def check_params_declared(method_cls: type[Method]) -> tuple[bool, str]:
    """Every parameter ``apply`` adds to the backbone is declared by its layer's ``adapter_params()`` (with a role),
    or frozen on purpose (``requires_grad=False`` set in ``apply`` and not named by ``trainable()``).

    An undeclared parameter is silently frozen by the runner, or trained without a role (so optimizer grouping and
    the adapter count miss it): either way the method is not the one written down.
    """
    rig = _build(method_cls)
    declared = set(adapter_roles(rig.model))
    trained = rig.method.trainable(rig.model)
    undeclared = sorted(n for n, grad in rig.added.items() if n not in declared and (grad or n in trained))
    if undeclared:
        return False, (f"{len(undeclared)} added parameters are neither declared in adapter_params() nor frozen "
                       f"on purpose (expected 0): {undeclared[:5]}")
    if not rig.added and method_name(method_cls) not in TRAINS_EVERYTHING:
        return False, "apply() added no parameter to the backbone (expected adapter parameters)"
    frozen = len(rig.added) - len(declared & set(rig.added))
    return True, (f"{len(rig.added)} added parameters: {len(declared & set(rig.added))} declared, {frozen} frozen "
                  "on purpose (expected every one declared or frozen)")


def check_frozen_unchanged(method_cls: type[Method]) -> tuple[bool, str]:
    """Frozen weights are bit-identical after an AdamW step."""
    rig = _build(method_cls)
    before = {n: p.detach().clone() for n, p in rig.model.named_parameters() if not p.requires_grad}
    _step(rig)
    params = dict(rig.model.named_parameters())
    changed = [n for n, t in before.items() if not torch.equal(params[n], t)]
    if changed:
        return False, f"{len(changed)} of {len(before)} frozen tensors changed (expected 0, bit-exact): {changed[:5]}"
    if not before:
        if method_name(method_cls) in TRAINS_EVERYTHING:
            raise SkipCheck(f"0 frozen tensors: {TRAINS_EVERYTHING[method_name(method_cls)]}")
        return False, "0 frozen tensors, nothing to compare (expected the base weights frozen)"
    return True, f"{len(before)} frozen tensors bit-identical after one AdamW step (expected all)"


def check_trainable_count(method_cls: type[Method]) -> tuple[bool, str]:
    """0 < trainable < total backbone parameters (trainable == total for methods in TRAINS_EVERYTHING)."""
    rig = _build(method_cls)
    params = list(rig.model.backbone.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    message = f"{trainable:,} of {total:,} backbone parameters train"
    if method_name(method_cls) in TRAINS_EVERYTHING:
        return trainable == total, f"{message} (expected all {total:,})"
    return 0 < trainable < total, f"{message} (expected 0 < trainable < {total:,})"


def check_state_dict_roundtrip(method_cls: type[Method]) -> tuple[bool, str]:
    """A trained state dict loads strictly into a freshly applied model and reproduces its outputs."""
    rig = _build(method_cls)
    _step(rig)
    fresh = _build(method_cls, seed=1)
    fresh.model.load_state_dict(rig.model.state_dict(), strict=True)
    diff = max(_max_diff(a, b) for a, b in zip(_eval(rig), _eval(fresh)))
    return diff <= 1e-6, f"max |Δoutput| = {diff:.2e} (threshold 1e-6)"


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
    if problems:
        return False, "; ".join(problems) + " (expected each trainable parameter in exactly one group)"
    return True, f"{len(groups)} groups, {len(seen)} tensors (expected each trainable parameter once)"


def check_identity_at_init(method_cls: type[Method]) -> tuple[bool, str]:
    """At init the adapted backbone reproduces the un-adapted backbone's output."""
    if (reason := NOT_IDENTITY_AT_INIT.get(method_name(method_cls))) is not None:
        raise SkipCheck(reason)
    rig = _build(method_cls)
    plain = tiny_bert().model.eval()
    with torch.no_grad():
        expected = plain(**rig.inputs).last_hidden_state
    diff = _max_diff(_eval(rig)[0], expected)
    return diff <= 1e-6, f"max |Δhidden| = {diff:.2e} (threshold 1e-6)"


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
    message = (f"merged Δ = {d_merge:.2e} (threshold 1e-5), unmerged Δ = {d_back:.2e} (threshold 1e-5), "
               f"weights Δ = {w_diff:.2e} (threshold 1e-6)")
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
    return False, "apply() accepted target_modules that match no layer (expected ValueError or ConfigError)"


CHECKS: list[tuple[str, CheckFn]] = [
    ("forward_backward", check_forward_backward),
    ("grads_only_trainable", check_grads_only_trainable),
    ("params_declared", check_params_declared),
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

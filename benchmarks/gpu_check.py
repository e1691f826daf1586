"""The GPU check: everything a developer with a CUDA machine runs in one go (a few minutes), then one table.

Run from the repository root::

    python benchmarks/gpu_check.py                 # the full check (needs a GPU)
    python benchmarks/gpu_check.py --dry-run       # print what would run
    python benchmarks/gpu_check.py --tiny          # the same steps at toy sizes on the CPU (tests the script)

Steps, each in its own process so one failure does not hide the others:

1. ``mtbench run`` of the pascal ``paper`` profile (Swin-T, 448 px, batch 32, 16-mixed) on generated scenes
   (``task.source=synthetic task.pretrained=false``) for ``--steps`` optimizer steps, for each of ``--methods``
   (default lora, mtlora, full_ft), in a throw-away store; the table shows what each run recorded: status, the
   end-to-end and compute-only training throughput, the share of step time spent waiting for data, peak device
   memory (``memory_kind`` must be ``cuda_max_allocated``) and what the allocator reserved.
2. ``benchmarks/pascal_loader.py --size 448 --batch 32 --workers 14``: samples/s of the training loader alone.
3. ``benchmarks/adapters.py`` on CUDA in bf16, the PASCAL model (448 px, batch 32) and BERT-base (32 × 256 tokens):
   step time, FLOPs, memory and operations of every adapter against its reference, each table printed whole; with
   ``--official PATH`` the PASCAL table also times the authors' MTLoRA code from that checkout.
4. ``pytest -m gpu``: the tests that need CUDA.

The table gives the device, torch and CUDA versions and the git commit it ran at; record it, with the adapter
tables, in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
STEPS = ("runs", "loader", "adapters", "pytest")


@dataclass
class Row:
    check: str
    status: str
    figures: str
    seconds: float


def run_command(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit status, combined output, seconds) of ``command`` run from the repository root."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\ntimed out after {timeout:.0f} s", time.perf_counter() - start


def run_sets(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of the pascal runs."""
    if args.tiny:  # the smoke profile's toy Swin on the CPU
        sets = ["trainer.accelerator=cpu", f"trainer.max_steps={args.steps}", "task.synthetic_train=16"]
    else:
        sets = ["task.source=synthetic", "task.pretrained=false", f"trainer.max_steps={args.steps}",
                f"task.synthetic_train={args.scenes}", "task.synthetic_val=32", "trainer.accelerator=gpu",
                "trainer.val_check_interval=100000"]
    return [part for s in sets for part in ("--set", s)]


def run_commands(args: argparse.Namespace, store: Path) -> dict[str, list[str]]:
    profile = "smoke" if args.tiny else "paper"
    return {method: [sys.executable, "-m", "mtbench.cli", "run", "--method", method, "--task", "pascal",
                     "--profile", profile, "--tracking-uri", f"sqlite:///{store / 'm.db'}", "--no-progress",
                     *run_sets(args)]
            for method in args.methods}


def other_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    if args.tiny:
        loader = ["--size", "64", "--batch", "4", "--workers", "0"]
        once = ["--device", "cpu", "--repeats", "1", "--warmup", "0"]
        swin = ["--suite", "swin", "--image-size", "224", "--batch", "1", *once, "--only", "lora_r64"]
        text = ["--suite", "text", "--encoder", "bert-base", "--batch", "2", "--tokens", "16", *once, "--only",
                "lora_r8"]
    else:
        loader = ["--size", "448", "--batch", "32", "--workers", "14"]
        # The targets' configurations (docs/performance.md): the PASCAL model at 448 px, batch 32, and BERT-base at
        # 32 x 256 tokens, both in bf16 autocast; random weights, so nothing is downloaded.
        swin = ["--suite", "swin", "--device", "cuda", "--dtype", "bf16", "--repeats", "15"]
        if args.official:  # the authors' code in the same table, against the same lora
            swin += ["--official", args.official]
        text = ["--suite", "text", "--encoder", "bert-base", "--tokens", "256", "--device", "cuda", "--dtype", "bf16",
                "--repeats", "30"]
    return {
        "loader": [sys.executable, "benchmarks/pascal_loader.py", *loader],
        "adapters swin": [sys.executable, "benchmarks/adapters.py", *swin],
        "adapters text": [sys.executable, "benchmarks/adapters.py", *text],
        "pytest": [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
    }


def describe_run(store: Path, run_id: str | None) -> tuple[str, str]:
    """(status, figures) of the run a ``mtbench run`` printed, read back from the store."""
    from mtbench.leaderboard import load_runs

    runs = load_runs(f"sqlite:///{store / 'm.db'}")
    runs = runs[runs["run_id"] == run_id] if run_id else runs.iloc[0:0]
    if runs.empty:
        return "no run", ""
    run = runs.iloc[0]

    def metric(name: str, scale: float = 1.0, digits: int = 1) -> str:
        value = run.get(f"metrics.perf/{name}")
        return "–" if value is None or value != value else f"{value * scale:.{digits}f}"

    figures = (f"train {metric('train_samples_per_s')} samples/s end to end, {metric('train_compute_samples_per_s')} "
               f"compute only, data wait {metric('train_data_wait_share', 100, 0)} %; peak "
               f"{metric('peak_mem_mb', 1, 0)} MB ({run.get('tags.mtbench.memory_kind')}), reserved "
               f"{metric('peak_reserved_mb', 1, 0)} MB; {metric('timed_steps', 1, 0)} timed steps")
    if run["status"] != "FINISHED":
        figures += f"; {run.get('tags.mtbench.error')}"
    return str(run["status"]), figures


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Downloading")]
    return " / ".join(lines[-count:])


def environment() -> str:
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    except ImportError:
        device, versions = "unknown", "torch missing"
    from mtbench.tracking import git_state

    commit, dirty = git_state()  # what runs record as their provenance
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{device}; {os.cpu_count()} CPU cores; {versions}; python {platform.python_version()}; commit "
            f"{commit[:7]}{'+dirty' if dirty else ''}; {when}")


def table(rows: list[Row]) -> str:
    lines = ["| check | status | figures | s |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.figures.replace('|', '/')} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "mtlora", "full_ft"])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each pascal run (default 40)")
    parser.add_argument("--scenes", type=int, default=512, help="generated training scenes (default 512)")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each command")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the script, not the GPU")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--official", metavar="PATH",
                        help="a checkout of github.com/scale-lab/MTLoRA: the swin adapter table then includes it")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 5)  # the throughput figures skip 3 warm-up steps: 2 are timed
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        store = Path(tmp)
        commands = {f"pascal paper run: {m}" if not args.tiny else f"pascal smoke run: {m}": c
                    for m, c in run_commands(args, store).items()} if "runs" not in args.skip else {}
        commands.update({k: c for k, c in other_commands(args).items() if k.split()[0] not in args.skip})
        if args.dry_run:
            for name, command in commands.items():
                print(f"{name}: {shlex.join(command)}")
            return 0
        print(f"gpu check on {environment()}", flush=True)
        rows, tables = [], []
        env = {"MTBENCH_HOME": str(store), "HF_HUB_OFFLINE": "1"}
        for name, command in commands.items():
            print(f"running {name} ...", flush=True)
            code, out, seconds = run_command(command, args.timeout, env)
            if name.startswith("pascal"):
                match = re.search(r"^run ([0-9a-f]{32}) ", out, re.MULTILINE)
                status, figures = describe_run(store, match.group(1) if match else None)
                if status == "no run":
                    figures = last_lines(out)
            else:
                status = "ok" if code == 0 else f"exit {code}"
                figures = last_lines(out)
                if name.startswith("adapters") and code == 0:  # its own table, printed whole after the summary
                    tables.append("\n".join(line for line in out.splitlines() if line.startswith(("#", "|"))))
                    figures = "table below"
            rows.append(Row(name, status, figures, seconds))
        print()
        print(table(rows))
        for text in tables:
            print()
            print(text)
        failed = [r for r in rows if r.status not in ("ok", "FINISHED")]
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

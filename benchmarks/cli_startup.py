"""Start-up time of the listing commands against ``python -c "import torch"``, measured side by side.

Run from the repository root with the project's environment::

    python benchmarks/cli_startup.py                 # 5 rounds
    python benchmarks/cli_startup.py --rounds 9 --runs 200

Each command runs as a fresh process (wall clock from spawn to exit, output discarded). Rounds are interleaved (round
r runs every command once, in turn), so a change in machine load hits all commands alike; the figure per command is
the median over rounds after one warm-up round (the first run fills the page cache). ``mtbench runs`` reads a
temporary store holding ``--runs`` finished runs, written with MLflow's client before timing starts. Ratios are
against ``import torch`` in the same run; the target is at most 2 for ``ls methods``, ``ls tasks`` and ``runs``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path


TARGET = 2.0
TARGETED = ("mtbench ls methods", "mtbench ls tasks", "mtbench runs")


def _fill_store(home: Path, runs: int) -> None:
    """``runs`` FINISHED runs with the tags and metrics ``mtbench runs`` prints."""
    code = f"""
import os
os.environ["MTBENCH_HOME"] = {str(home)!r}
from mtbench.tracking import client, experiment_id, tracking_uri
uri = tracking_uri()
c = client(uri)
exp = experiment_id(c, uri)
for i in range({runs}):
    run = c.create_run(exp, tags={{"mtbench.method": "lora", "mtbench.task": "glue", "mtbench.profile": "smoke",
                                  "mtbench.seed": str(i)}})
    c.log_metric(run.info.run_id, "val/avg", 0.5 + i / 1e4)
    c.set_terminated(run.info.run_id, "FINISHED")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5), after one warm-up round")
    parser.add_argument("--runs", type=int, default=50, help="finished runs in the store read by `mtbench runs`")
    args = parser.parse_args()

    mtbench = str(Path(sys.executable).with_name("mtbench"))
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "mtbench ls methods": [mtbench, "ls", "methods"],
        "mtbench ls tasks": [mtbench, "ls", "tasks"],
        "mtbench ls backbones": [mtbench, "ls", "backbones"],
        "mtbench runs": [mtbench, "runs"],
        "mtbench leaderboard": [mtbench, "leaderboard"],
        "mtbench --help": [mtbench, "--help"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        _fill_store(home, args.runs)
        env = {**os.environ, "MTBENCH_HOME": str(home), "MTBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MTBENCH_PLUGINS", None)
        commands["mtbench leaderboard"] += ["--out", str(home / "board")]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(args.rounds + 1):
            for name, argv in commands.items():
                elapsed = _time(argv, env)
                if r:
                    times[name].append(elapsed)

    reference = statistics.median(times['python -c "import torch"'])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; python "
          f"{platform.python_version()}, torch {version('torch')}, lightning {version('lightning')}, "
          f"mlflow {version('mlflow')}; load average at the end {os.getloadavg()[0]:.2f}")
    print(f"{args.rounds} interleaved rounds after 1 warm-up, median wall seconds; store of {args.runs} runs\n")
    print("| command | median s | min s | max s | vs import torch | target | met |\n|---|---|---|---|---|---|---|")
    failed = False
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / reference
        target = f"<= {TARGET:g}" if name in TARGETED else "–"
        met = ("yes" if ratio <= TARGET else "no") if name in TARGETED else "–"
        failed |= met == "no"
        print(f"| {name} | {median:.2f} | {min(values):.2f} | {max(values):.2f} | {ratio:.2f} | {target} | {met} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

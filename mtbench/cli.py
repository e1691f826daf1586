"""``mtbench`` command line: run, ls, validate, leaderboard, demo.

Only argparse is imported at start-up, so ``mtbench --help`` answers at once; torch, Lightning and MLflow load inside
the subcommand that needs them. User errors print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


EXIT_USAGE = 2
_STATUS_EXIT = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="load a method/task plugin file (repeatable)")
    common.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in ./mtbench-runs)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = argparse.ArgumentParser(prog="mtbench", description="Benchmark parameter-efficient multi-task "
                                     "fine-tuning methods on multi-task benchmarks, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="train one method on one task")
    run.add_argument("--method", help="registered method name (see `mtbench ls methods`)")
    run.add_argument("--task", help="registered task name (see `mtbench ls tasks`)")
    run.add_argument("--profile", help="task profile: smoke, cpu or paper (default smoke)")
    run.add_argument("--seed", type=int, help="random seed (default 0)")
    run.add_argument("--config", metavar="FILE.yaml", help="experiment YAML (sections method/task/train/trainer)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                     help="override a config key, e.g. method.r=16 or trainer.max_steps=50 (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--resume", metavar="RUN_ID", help="continue a run stopped by Ctrl-C/SIGTERM from its checkpoint")

    runs = sub.add_parser("runs", parents=[common], help="list the runs in the store with their status")
    runs.add_argument("--limit", type=int, default=50, help="newest N runs (default 50)")

    ls = sub.add_parser("ls", parents=[common], help="list registered methods, tasks or backbones")
    ls.add_argument("kind", nargs="?", choices=["methods", "tasks", "backbones"], default="methods")

    validate_help = "resolve and build every method x task (smoke profile unless --profile) without training"
    validate = sub.add_parser("validate", parents=[common], help=validate_help, description=validate_help)
    validate.add_argument("--profile", action="append", metavar="NAME",
                          help="profile to build (repeatable; default smoke; 'all' = every profile of each task; "
                          "cpu and paper load real weights)")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                          help="override for every cell, as in run (method.*/task.* keys only where the config "
                          "has them)")

    board = sub.add_parser("leaderboard", parents=[common],
                           help="write the leaderboard (CSV, JSON, Markdown, HTML, Pareto plots) from the runs")
    board.add_argument("--out", default=None,
                       help="output folder (default: <store home>/leaderboard, so a checkout's committed "
                            "leaderboard/ is only written when named)")
    board.add_argument("--from-results", nargs="+", default=[], metavar="DIR",
                       help="also read exported result.json files under these folders (recursively)")
    board.add_argument("--no-store", action="store_true", help="only the --from-results files, not the store")
    board.add_argument("--reference", action="append", default=[], metavar="[TASK=]METHOD",
                       help="reference method of the paired comparison (default lora; repeatable, per task)")

    sweep = sub.add_parser("sweep", parents=[common], help="run methods x tasks x seeds x config grid, "
                           "skipping cells that already have a FINISHED run")
    sweep.add_argument("--file", metavar="SWEEP.yaml", help="sweep file (keys methods, tasks, seeds, profile, set, "
                       "grid); command-line values win")
    sweep.add_argument("--methods", metavar="A,B", help="comma-separated method names, or 'all'")
    sweep.add_argument("--tasks", metavar="T,U", help="comma-separated task names")
    sweep.add_argument("--seeds", metavar="0,1,2", help="comma-separated seeds (default 0)")
    sweep.add_argument("--profile", help="task profile (default smoke)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                       help="override for every cell (method.*/task.* keys only where the config has them)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="one grid axis, e.g. method.r=4,8 (repeatable; axes multiply)")
    sweep.add_argument("--shard", metavar="I/N", help="run only shard I of N (0-based) of the grid")
    sweep.add_argument("--dry-run", action="store_true", help="print what would run or be skipped; train nothing")
    sweep.add_argument("--progress", action="store_true", help="show the progress bar of each run")

    check = sub.add_parser("check-method", parents=[common], help="run the conformance checks on a method file")
    check.add_argument("file", metavar="FILE.py", help="a file registering one or more methods")

    demo = sub.add_parser("demo", parents=[common], help="every method on every task's smoke profile, then the board")
    demo.add_argument("--out", default=None, help="leaderboard folder (default: <store home>/leaderboard)")

    prefetch = sub.add_parser("prefetch", parents=[common], help="download and verify a task's data (online)")
    prefetch.add_argument("--task", required=True, help="registered task name")
    prefetch.add_argument("--data-root", help="folder to put the data in (default: the task's data root)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtbench`` console script."""
    args = _parser().parse_args(argv)
    _quiet_environment()
    from .errors import MtbenchError, signals_as_interrupt, take_pending_signal

    # From the start of the command, not only once a run is built: a process terminated while it imports, resolves
    # its configuration or builds a model then says so in one line instead of dying silently.
    take_pending_signal()  # a signal noted by an earlier command in this process is not this one's
    with signals_as_interrupt():
        try:
            if args.command not in _NO_REGISTRY:
                from . import registry

                registry.discover(args.plugin)
            return int(_COMMANDS[args.command](args))
        except KeyboardInterrupt:
            if args.debug:
                raise
            # Ctrl-C or SIGTERM outside a run's training (which records the run KILLED itself), e.g. while the
            # model is built: nothing was recorded, so one line is all there is to say.
            print("mtbench: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.debug or not isinstance(exc, MtbenchError):
                raise
            print(f"mtbench: error: {exc}".splitlines()[0], file=sys.stderr)
            return EXIT_USAGE


def _quiet_environment() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "mlflow", "alembic", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_run(args: argparse.Namespace) -> int:
    """Train and evaluate one method on one task."""
    from .config import resolve
    from .errors import ConfigError
    from .execute import resume_run, run_experiment

    if args.resume:
        if args.method or args.task or args.config or args.sets or args.profile or args.seed is not None:
            raise ConfigError("--resume RUN_ID continues a run with its recorded config; give no other run options")
        outcome = resume_run(args.resume, args.tracking_uri, progress=not args.no_progress)
    else:
        exp = resolve(args.method, args.task, args.profile, args.seed, args.config, args.sets)
        outcome = run_experiment(exp, args.tracking_uri, progress=not args.no_progress)
    headline = ", ".join(f"{k}={v:.4f}" for k, v in sorted(outcome.metrics.items()))
    print(f"run {outcome.run_id} {outcome.status}: {headline or outcome.error}")
    return _STATUS_EXIT[outcome.status]


def cmd_runs(args: argparse.Namespace) -> int:
    """A table of the newest runs: id, status (DEAD for a RUNNING run whose process is gone), start (UTC), duration,
    method, task, profile, seed and quality: ``Δm`` where the run logged ``val/delta_m`` (the board's quality for
    such tasks), else ``val/avg``; a run that did not finish shows the last value it logged, marked ``(partial)``."""
    import time

    from .errors import ConfigError
    from .tracking import liveness, load_runs, tracking_uri

    if args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of runs, got {args.limit}")
    runs = load_runs(tracking_uri(args.tracking_uri))
    if runs.empty:
        print("no runs")
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("RUN_ID", "STATUS", "STARTED (UTC)", "DURATION", "METHOD", "TASK", "PROFILE", "SEED", "QUALITY")]
    for _, r in runs.head(args.limit).iterrows():
        status = liveness(r["status"], r.get("tags.mtbench.host"), r.get("tags.mtbench.pid"),
                          r.get("tags.mtbench.heartbeat"), now)
        start, end = _epoch(r.get("start_time")), _epoch(r.get("end_time"))
        if end is None and status == "RUNNING":
            end = now
        delta, avg = r.get("metrics.val/delta_m"), r.get("metrics.val/avg")
        if delta is not None and delta == delta:
            quality = f"Δm {delta:+.2f}"
        else:
            quality = "-" if avg is None or avg != avg else f"{avg:.4f}"
        if quality != "-" and status != "FINISHED":
            quality += " (partial)"
        rows.append((
            str(r["run_id"]), status,
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(start)) if start is not None else "-",
            _duration(end - start) if start is not None and end is not None else "-",
            *(_text(r.get(f"tags.mtbench.{k}")) for k in ("method", "task", "profile", "seed")),
            quality,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch of a pandas/MLflow timestamp, or None when missing."""
    if value is None or value != value:  # None, NaN or NaT
        return None
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value) / 1000.0


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _text(value: Any) -> str:
    return "-" if value is None or value != value else str(value)


def cmd_ls(args: argparse.Namespace) -> int:
    """Print name, origin, description and config fields of each registered method, task or backbone."""
    import textwrap

    from . import registry
    from .config import config_fields

    reg = getattr(registry, args.kind)
    for name in reg.names():
        obj = reg.get(name)
        print(f"{name}  [{reg.origin(name)}]")
        summary = _first_paragraph(obj.__doc__)
        if summary:
            print(textwrap.fill(summary, width=118, initial_indent="    ", subsequent_indent="    ",
                                break_on_hyphens=False))
        if args.kind == "tasks":
            print(f"    version {obj.version}; profiles: {', '.join(obj.profiles)}; default subtasks: "
                  f"{', '.join(obj.default_subtasks) or '(none)'}")
        if hasattr(obj, "config_cls"):
            for field, kind, default, help_text in config_fields(obj.config_cls):
                print(f"    {field}: {kind} = {default!r}  {help_text}")
    if args.kind == "methods":
        print("Equations, defaults and sources of the built-in methods: docs/methods.md (§ numbers as cited above).")
    return 0


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line (a summary may run over several source lines)."""
    import inspect

    paragraph = inspect.cleandoc(doc or "").split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def cmd_validate(args: argparse.Namespace) -> int:
    """Resolve and build every method x task x profile; print one line each."""
    import dataclasses

    from . import registry
    from .config import resolve
    from .errors import ConfigError
    from .runner import build_module

    def applies(key: str, method: str, task: str) -> bool:  # method.r only for methods that have an r
        section, _, name = key.partition("=")[0].partition(".")
        owner = {"method": registry.methods, "task": registry.tasks}.get(section)
        if owner is None:
            return True
        config_cls = owner.get(method if section == "method" else task).config_cls
        return name in {f.name for f in dataclasses.fields(config_cls)}

    for key in args.sets:
        if not any(applies(key, m, t) for m in registry.methods.names() for t in registry.tasks.names()):
            raise ConfigError(f"--set {key}: no method or task config has the key {key.partition('=')[0]!r}")
    failures = 0
    # Counted as built: a run also freezes what its first batch shows gets no gradient (an unused BERT pooler), so
    # the trainable count it records can be lower.
    print("trainable: parameters that require a gradient as built, before a run drops those no batch reaches")
    for task in registry.tasks.names():
        wanted = args.profile or ["smoke"]
        profiles = list(registry.tasks.get(task).profiles) if "all" in wanted else wanted
        for method in registry.methods.names():
            sets = [s for s in args.sets if applies(s, method, task)]
            for profile in profiles:
                try:
                    module = build_module(resolve(method, task, profile, sets=sets))
                    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
                    print(f"ok    {method:12s} {task:14s} {profile:6s} trainable={trainable:,}")
                except Exception as exc:
                    failures += 1
                    print(f"FAIL  {method:12s} {task:14s} {profile:6s} {exc.__class__.__name__}: {exc}")
    return 1 if failures else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Write the leaderboard files from the tracking store and any exported result files."""
    from .leaderboard import build_leaderboard
    from .render import write_leaderboard
    from .tracking import home_dir, sqlite_path, tracking_uri

    uri = None if getattr(args, "no_store", False) else tracking_uri(args.tracking_uri)
    # The store's own folder: beside the sqlite database it reads (--tracking-uri, MLFLOW_TRACKING_URI), else home.
    db = sqlite_path(uri) if uri else None
    args.out = args.out or str((db.parent if db else home_dir()) / "leaderboard")
    from .errors import ConfigError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file; name a folder (it is created if missing)")
    named = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if db is not None and not db.is_file() and (named or not getattr(args, "from_results", [])):
        # A mistyped store would otherwise give an empty board, written over the one in --out.
        culprit = "--tracking-uri" if named else "the default store"
        raise ConfigError(f"{culprit}: no store at {db}; name an existing one with --tracking-uri, run `mtbench run` "
                          "first, or build from exported results alone with --no-store --from-results DIR")
    board = build_leaderboard(uri, getattr(args, "from_results", []), getattr(args, "reference", []))
    for line in board.rejected:
        print(f"mtbench: rejected {line}", file=sys.stderr)
    for line in board.ignored_predictions:
        print(f"mtbench: ignored predictions {line}", file=sys.stderr)
    paths = write_leaderboard(board, args.out)
    merged = f"; {board.merged} merged from result files, {len(board.rejected)} rejected, {board.unverified} " \
        "without a sha256" if getattr(args, "from_results", []) else ""
    print(f"{len(board.rows)} rows from {board.finished} finished runs "
          f"({board.excluded} excluded: {board.excluded_detail or 'none'}{merged}) -> {args.out}: "
          f"{', '.join(p.name for p in paths)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the cells of a sweep that have no FINISHED run yet; list the failures at the end."""
    from .sweep import load_file, make_spec, parse_shard, run_sweep

    spec = make_spec(load_file(args.file) if args.file else None, args.methods, args.tasks, args.seeds, args.profile,
                     args.sets, args.grid)
    report = run_sweep(spec, args.tracking_uri, parse_shard(args.shard), args.dry_run, args.progress)
    if args.dry_run:
        print(f"sweep (dry run, nothing trained): {len(report.would_run)} would run, {len(report.skipped)} skipped "
              "(already FINISHED)")
        return 0
    print(f"sweep: {len(report.finished)} finished, {len(report.skipped)} skipped, {len(report.failed)} failed"
          + (", interrupted" if report.interrupted else ""))
    for line in report.failed:
        print(f"  failed: {line}")
    if report.interrupted:
        return 130
    return 1 if report.failed else 0


def cmd_check_method(args: argparse.Namespace) -> int:
    """Run the conformance suite on the methods a plugin file registers; exit 0 only if every check passes."""
    import inspect
    from pathlib import Path

    from . import conformance, registry
    from .errors import MtbenchError

    # A built-in method's own file (methods/lora.py) is checked as registered: loading it again as a plugin would
    # only clash with itself.
    target = Path(args.file).resolve()
    names = sorted(n for n in registry.methods.names()
                   if Path(inspect.getsourcefile(registry.methods.get(n)) or "").resolve() == target)
    if not names:
        before = set(registry.methods.names())
        registry.load_plugin_file(args.file)
        names = sorted(set(registry.methods.names()) - before)
    if not names:
        raise MtbenchError(f"{args.file} registers no new method (use @register_method(\"name\"))")
    failed = 0
    for name in names:
        for result in conformance.run_checks(registry.methods.get(name)):
            verdict = "skip" if result.skipped else ("pass" if result.ok else "FAIL")
            failed += verdict == "FAIL"
            print(f"{verdict:4s}  {name}  {result.name}: {result.message}", flush=True)
    print(f"{'all checks passed' if not failed else f'{failed} check(s) failed'} for {', '.join(names)}")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Every registered method on every task's smoke profile, then the leaderboard."""
    from . import registry
    from .config import resolve
    from .execute import run_experiment
    from .sweep import qualities
    from .tracking import home_dir

    failed = []
    combos = [(m, t) for t in registry.tasks.names() for m in registry.methods.names()]
    for i, (method, task) in enumerate(combos, 1):
        outcome = run_experiment(resolve(method, task, "smoke"), args.tracking_uri, progress=False)
        detail = qualities(outcome.metrics) or f"({outcome.error})"
        print(f"[{i}/{len(combos)}] {method} on {task}: {outcome.status} {detail}", flush=True)
        if outcome.status != "FINISHED":
            failed.append(f"{method}/{task}")
    args.out = args.out or str(home_dir() / "leaderboard")
    cmd_leaderboard(args)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Download and verify a task's data into its data root (fails at once, in one line, when offline)."""
    from pathlib import Path

    from . import registry

    task_cls = registry.tasks.get(args.task)
    task = task_cls(task_cls.config_cls())
    print(f"task {args.task}: {task.prefetch(Path(args.data_root).expanduser() if args.data_root else None)}")
    return 0


# Commands that read only the tracking store or result files: they load no plugin (a plugin imports torch).
_NO_REGISTRY = frozenset({"runs", "leaderboard"})
_COMMANDS: dict[str, Any] = {
    "run": cmd_run, "ls": cmd_ls, "validate": cmd_validate, "leaderboard": cmd_leaderboard, "demo": cmd_demo,
    "check-method": cmd_check_method, "runs": cmd_runs,
    "sweep": cmd_sweep, "prefetch": cmd_prefetch,
}


if __name__ == "__main__":
    sys.exit(main())

"""One tracked run: create the MLflow run with its provenance, train and evaluate, record the outcome.

Whatever happens, the run ends recorded with a status: FINISHED, FAILED (error tag and traceback artifact) or
KILLED (Ctrl-C, SIGTERM). The status is mtbench's own: the run stays RUNNING until mtbench has evaluated and
recorded it (Lightning's MLflow logger would mark it FINISHED when ``fit`` returns), so a process that dies before
then leaves a RUNNING run that ``mtbench runs`` shows as DEAD, never a FINISHED run without a result. The
``result.json`` artifact is written atomically in every case; if recording fails (a full disk), the run is FAILED
with that reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Experiment
from .errors import ConfigError, MtbenchError, signals_as_interrupt
from .results import SCHEMA, write_result
from .tracking import (
    EXPERIMENT,
    artifact_root,
    client,
    experiment_id,
    flatten,
    git_state,
    home_dir,
    host_info,
    long_params,
    package_versions,
    safe_params,
    shown_uri,
    sqlite_path,
    tracking_uri,
)


@dataclass
class Outcome:
    """What a run ended with."""

    run_id: str
    status: str
    metrics: dict[str, float]
    result: dict[str, Any]
    error: str | None = None
    interrupted: bool = False
    """A stop signal arrived (the run may still be FINISHED if it came after the evaluation); a sweep stops."""


def run_experiment(exp: Experiment, uri: str | None = None, progress: bool = True) -> Outcome:
    """Train and evaluate ``exp`` under MLflow tracking at ``uri`` (default: the embedded store).

    The model and data are built before the run is created, so bad input (a wrong option, missing or corrupt data)
    raises without touching the store. Under DDP, Lightning re-launches this command once per extra rank; those
    ranks join the run rank 0 created (``MTBENCH_RUN_ID``) and leave the recording to it.
    """
    from mlflow.entities import Param

    _quiet_libraries()
    uri = tracking_uri(uri)
    mlflow = client(uri)
    built = _build(exp)
    joining = os.environ.get("MTBENCH_RUN_ID") if int(os.environ.get("LOCAL_RANK", "0")) > 0 else None
    if joining:
        return _train(exp, mlflow, joining, uri, exp.as_dict(), progress, built)
    exp_id = experiment_id(mlflow, uri)
    commit, dirty = git_state()
    config = exp.as_dict()
    tags = {
        "mtbench.method": exp.method_name,
        "mtbench.task": exp.task_name,
        "mtbench.task_version": exp.task_cls.version,
        "mtbench.profile": exp.profile,
        "mtbench.seed": str(exp.seed),
        "mtbench.method_config_id": exp.method_config_id(),
        "mtbench.config_id": exp.config_id(),
        "mtbench.protocol_id": exp.protocol_id(),
        "mtbench.git_commit": commit,
        "mtbench.git_dirty": str(dirty).lower(),
        "mtbench.versions": json.dumps(package_versions(), sort_keys=True),
        "mlflow.runName": f"{exp.method_name}--{exp.task_name}--{exp.profile}--seed{exp.seed}",
        **_process_tags(),
    }
    run = mlflow.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    with _run_lock(uri, run_id):
        params = [Param(k, v) for k, v in safe_params(flatten(config)).items()]
        for i in range(0, len(params), 100):
            mlflow.log_batch(run_id, params=params[i : i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            mlflow.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
            if long := long_params(flatten(config)):
                # Longer than an MLflow param allows: logged cut (with a digest of the whole), kept in full here.
                (Path(tmp) / "long_params.json").write_text(json.dumps(long, indent=1, sort_keys=True))
                mlflow.log_artifact(run_id, str(Path(tmp) / "long_params.json"))
                mlflow.set_tag(run_id, "mtbench.long_params",
                               ",".join(sorted(long)) + " (in full in long_params.json)")
        return _train(exp, mlflow, run_id, uri, config, progress, built)


def resume_run(run_id: str, uri: str | None = None, progress: bool = True) -> Outcome:
    """Continue a KILLED (or FAILED, or dead) run from its checkpoint, in the same MLflow run, to FINISHED.

    Refused, with the record left as it is: a FINISHED run, a run another process is training or resuming now
    (each run holds an exclusive lock on ``checkpoints/<run_id>.lock`` while it trains), a missing or unreadable
    checkpoint.
    """
    from .config import resolve
    from .tracking import liveness

    uri = tracking_uri(uri)
    mlflow = client(uri)
    try:
        run = mlflow.get_run(run_id)
    except Exception as exc:
        full = "" if len(run_id) == 32 else "; give the full 32-character run id (`mtbench runs` lists them)"
        raise MtbenchError(f"run {run_id} not found in {shown_uri(uri)}{full}") from exc
    with _run_lock(uri, run_id):
        run = mlflow.get_run(run_id)
        status = run.info.status
        if status == "FINISHED":
            raise MtbenchError(f"run {run_id} is already FINISHED; nothing to resume")
        tags = run.data.tags
        if liveness(status, tags.get("mtbench.host"), tags.get("mtbench.pid"), tags.get("mtbench.heartbeat"),
                    time.time()) == "RUNNING" and tags.get("mtbench.host") != socket.gethostname():
            raise MtbenchError(f"run {run_id} is still RUNNING on {tags.get('mtbench.host')} (heartbeat less than "
                               "15 min old); stop it first")
        checkpoint = checkpoint_path(uri, run_id)
        if not checkpoint.is_file():
            raise MtbenchError(f"run {run_id} has no checkpoint at {checkpoint} (only runs stopped by Ctrl-C or "
                               "SIGTERM can be resumed)")
        _check_checkpoint(checkpoint, run_id)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for one small file is noise
        with tempfile.TemporaryDirectory() as tmp:
            config = yaml.safe_load(Path(mlflow.download_artifacts(run_id, "config.yaml", tmp)).read_text())
        config["task"].pop("version", None)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump(config, file)
            file.flush()
            exp = resolve(None, None, config["profile"], config["seed"], file.name)
        _quiet_libraries()
        built = _build(exp)
        mlflow.update_run(run_id, status="RUNNING")
        mlflow.log_batch(run_id, tags=[_tag(k, v) for k, v in _process_tags().items()])
        if "mtbench.error" in tags:
            mlflow.delete_tag(run_id, "mtbench.error")  # the reason it stopped last time no longer holds
        return _train(exp, mlflow, run_id, uri, exp.as_dict(), progress, built, resume_from=checkpoint)


def _check_checkpoint(path: Path, run_id: str) -> None:
    """Refuse a checkpoint torch cannot read (truncated, corrupt) before the run's record is touched."""
    import torch

    try:
        # mmap: only the archive's index is read, not the tensors.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        raise MtbenchError(f"checkpoint {path} of run {run_id} is unreadable ({reason}); the run keeps its "
                           "recorded status") from exc


@contextmanager
def _run_lock(uri: str, run_id: str) -> Iterator[None]:
    """Hold an exclusive lock on ``checkpoints/<run_id>.lock`` while a process trains or resumes the run.

    The kernel releases it when the process ends, however it ends, so a second ``--resume`` of a run that is being
    trained or resumed is refused at once, while one of a dead run proceeds. (A lock file, because the store has no
    atomic "claim this run" operation; it covers processes that share the checkpoint folder.)
    """
    path = _lock_path(checkpoint_path(uri, run_id))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise MtbenchError(f"cannot create the run lock {path}: {exc.strerror}") from exc
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise MtbenchError(f"run {run_id} is being trained or resumed by another process now; wait for it "
                               "or stop it first") from exc
        yield


def checkpoint_path(uri: str, run_id: str) -> Path:
    """Where a run's resumable checkpoint lives: beside a sqlite store, else under ``MTBENCH_HOME``."""
    db = sqlite_path(uri)
    root = db.parent if db else home_dir()
    return root / "checkpoints" / run_id / "last.ckpt"


def _process_tags() -> dict[str, str]:
    return {"mtbench.host": socket.gethostname(), "mtbench.pid": str(os.getpid()),
            "mtbench.heartbeat": f"{time.time():.0f}"}


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _build(exp: Experiment) -> tuple[Any, Any]:
    """The LightningModule and datamodule; user errors surface here, before anything is recorded."""
    import lightning.pytorch as pl

    from .runner import build_module

    try:
        # Lightning checks its own arguments (precision, strategy, devices, ...) when the Trainer is made.
        pl.Trainer(**{**_trainer_kwargs(exp), "enable_model_summary": False}, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False)
    except Exception as exc:
        raise ConfigError(f"trainer options rejected by Lightning: {str(exc).splitlines()[0]}") from exc
    with signals_as_interrupt():
        module = build_module(exp)
        return module, module.task.datamodule(exp.train, seed=exp.seed)


def _train(exp: Experiment, mlflow: Any, run_id: str, uri: str, config: dict[str, Any], progress: bool,
           built: tuple[Any, Any], resume_from: Path | None = None) -> Outcome:
    import lightning.pytorch as pl

    from .callbacks import GracefulStop, Heartbeat, Measurements, RunInterrupted, save_checkpoint_atomic
    from .runner import MAX_SKIPPED_SHARE

    status, error, trace = "FAILED", None, None
    module, datamodule = built
    trainer: Any = None
    measurements = Measurements()
    stop = GracefulStop(checkpoint_path(uri, run_id))
    heartbeat = Heartbeat(lambda: mlflow.set_tag(run_id, "mtbench.heartbeat", f"{time.time():.0f}"))
    started = time.time()
    fitted = False
    os.environ["MTBENCH_RUN_ID"] = run_id  # inherited by the processes Lightning launches for extra DDP ranks
    try:
        with stop.installed():
            try:
                with tempfile.TemporaryDirectory() as scratch:
                    bar = [progress_bar(exp)] if progress else []
                    trainer = pl.Trainer(**_trainer_kwargs(exp), logger=_logger(uri, run_id),
                                         default_root_dir=scratch,
                                         callbacks=[measurements, stop, heartbeat, *module.method.callbacks(), *bar],
                                         enable_checkpointing=False, enable_progress_bar=progress)
                    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
                    fitted = True
                    skipped, batches = module.skipped_batches, module.train_batches
                    if skipped > MAX_SKIPPED_SHARE * max(1, batches):
                        raise DivergedError(f"diverged: {skipped} of {batches} training batches skipped for a "
                                            f"non-finite loss (more than {MAX_SKIPPED_SHARE:.0%})")
                    if stop.received is None and module.metrics_step != trainer.global_step:
                        trainer.validate(module, datamodule=datamodule, verbose=False)
                    if stop.received is not None and module.metrics_step != trainer.global_step:
                        raise RunInterrupted(stop.describe(trainer.global_step))
            except RunInterrupted as exc:
                message = str(exc)
                if fitted and stop.saved_step is None and stop.save_error is None:
                    # Stopped during the final evaluation: the checkpoint holds the trained model, so --resume only
                    # evaluates.
                    try:
                        save_checkpoint_atomic(trainer, stop.checkpoint)
                        stop.saved_step = trainer.global_step
                    except OSError as save_exc:
                        stop.save_error = f"{save_exc.__class__.__name__}: {save_exc.strerror or save_exc}"
                    message = stop.describe(trainer.global_step)
                raise KeyboardInterrupt(message) from None
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as exc:
        status, error = "KILLED", f"interrupted ({exc.__class__.__name__}{': ' + str(exc) if str(exc) else ''})"
    except Exception as exc:
        status, error, trace = "FAILED", f"{exc.__class__.__name__}: {exc}", traceback.format_exc()
    finally:
        os.environ.pop("MTBENCH_RUN_ID", None)
    if trainer is not None and not trainer.is_global_zero:
        return Outcome(run_id, status, dict(module.final_metrics), {}, error, stop.received is not None)
    if status == "FINISHED":
        _remove_resume_files(checkpoint_path(uri, run_id))
    outcome = _record(exp, mlflow, run_id, config, status, error, trace, module, trainer, measurements, started)
    outcome.interrupted = stop.received is not None
    return outcome


def _lock_path(checkpoint: Path) -> Path:
    """``checkpoints/<run_id>.lock``, beside the run's checkpoint folder (see :func:`_run_lock`)."""
    return checkpoint.parent.with_suffix(".lock")


def _remove_resume_files(checkpoint: Path) -> None:
    """A FINISHED run's checkpoint, its folder and its lock file (nothing resumes a FINISHED run, and a later
    ``--resume`` makes a new lock and is refused by the status it reads under it). Best effort: a file that cannot
    be removed stays."""
    for remove in (checkpoint.unlink, checkpoint.parent.rmdir, _lock_path(checkpoint).unlink):
        with contextlib.suppress(OSError):
            remove()


class DivergedError(RuntimeError):
    """Too many training batches were skipped for a non-finite loss (``train.on_nonfinite_loss=skip``)."""


def _logger(uri: str, run_id: str) -> Any:
    """Lightning's MLflow logger for the run, minus its say over the run's status.

    ``MLFlowLogger.finalize`` marks the MLflow run FINISHED when ``fit`` returns (FAILED on an exception), before
    mtbench has evaluated and recorded the outcome; the status is mtbench's to set (in :func:`_log_outcome`).
    Metrics are sent as they are logged, so there is nothing left to flush.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            pass

    return RunLogger(experiment_name=EXPERIMENT, tracking_uri=uri, run_id=run_id, artifact_location=artifact_root(uri))


def _quiet_libraries() -> None:
    """Keep the console to the progress bar and mtbench's own lines (Lightning resets its level at import)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def progress_bar(exp: Experiment) -> Any:
    """tqdm's bar (Lightning's default rich bar prints "Epoch 0/-2" for step-limited runs), refreshed every
    ``trainer.log_every_n_steps`` optimizer steps: each refresh reads the logged loss back from the device, which on
    a GPU would otherwise make the host wait once per step; Lightning reads the logged values at that interval
    anyway."""
    import lightning.pytorch as pl

    kwargs = _trainer_kwargs(exp)
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    every = int(kwargs.get("log_every_n_steps") or 50) * (accumulate if isinstance(accumulate, int) else 1)
    return pl.callbacks.TQDMProgressBar(refresh_rate=max(1, every))


def _trainer_kwargs(exp: Experiment) -> dict[str, Any]:
    kwargs = dict(exp.trainer)
    # Validation always runs once at the end; during training only every `trainer.val_check_interval` optimizer
    # steps when set. Lightning's epoch-based default would validate at points that depend on the sampler's epoch
    # length.
    kwargs.setdefault("check_val_every_n_epoch", None)
    kwargs.setdefault("val_check_interval", 10**12)
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    if isinstance(kwargs["val_check_interval"], int) and isinstance(accumulate, int) and accumulate > 1:
        # Every step-valued option means optimizer steps (as max_steps, log_every_n_steps and the schedule's
        # warm-up do in Lightning); Lightning counts an integer val_check_interval in batches.
        kwargs["val_check_interval"] *= accumulate
    kwargs.setdefault("use_distributed_sampler", False)
    if kwargs.get("strategy") == "ddp":
        # A rank whose batch holds no example of some subtask leaves that head (and routed experts or task
        # adapters) without gradient; plain DDP would then wait forever for it in the all-reduce.
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    return kwargs


def _record(exp: Experiment, mlflow: Any, run_id: str, config: dict[str, Any], status: str, error: str | None,
            trace: str | None, module: Any, trainer: Any, measurements: Any, started: float) -> Outcome:
    from .callbacks import count_parameters

    metrics = dict(module.final_metrics) if module is not None and status == "FINISHED" else {}
    # Everything about the device comes from what Measurements captured while training: after fit, Lightning's
    # teardown has moved the module back to the CPU.
    seen = measurements.values
    perf = measurements.summary() if seen else {"wall_s": time.time() - started}
    if module is not None:
        perf["skipped_batches"] = module.skipped_batches
        perf["train_batches"] = module.train_batches
    params = seen.get("params") or (count_parameters(module) if module is not None else {})
    specs = module.specs if module is not None else {}
    commit, dirty = git_state()  # one look at the checkout (two git processes), not one per field
    result = {
        "schema": SCHEMA, "run_id": run_id, "status": status, "error": error,
        "method": exp.method_name, "task": exp.task_name, "task_version": exp.task_cls.version,
        "profile": exp.profile, "seed": exp.seed, "method_config_id": exp.method_config_id(),
        "config_id": exp.config_id(), "protocol_id": exp.protocol_id(), "config": config, "metrics": metrics,
        "metric_specs": {f"val/{sub}/{name}": {"higher_is_better": s.higher_is_better, "primary": s.primary,
                                               "version": s.version}
                         for sub, group in specs.items() for name, s in group.items()},
        "params": params, "perf": perf,
        "provenance": {"device": seen.get("device", "not started"),
                       **{k: seen[k] for k in ("precision", "param_dtype", "world_size") if k in seen},
                       **host_info(), "git_commit": commit, "git_dirty": dirty,
                       "versions": package_versions(), "started": started, "finished": time.time()},
    }
    result["metric_specs"]["val/avg"] = {"higher_is_better": True, "primary": False,
                                         "version": exp.task_cls.headline_version or exp.task_cls.version}
    # Δm and the per-subtask deltas (higher = better than the single-task baseline) compare only under the same
    # baseline values, so their version carries a digest of them.
    baselines = module.task.baselines() if module is not None else None
    digest = hashlib.sha256(json.dumps(baselines, sort_keys=True).encode()).hexdigest()[:8]
    for key in [k for k in metrics if k == "val/delta_m" or k.endswith("/delta")]:
        result["metric_specs"][key] = {"higher_is_better": True, "primary": False,
                                       "version": f"{exp.task_cls.version}+baseline-{digest}"}
    predictions = module.predictions if module is not None and status == "FINISHED" else []
    if predictions:
        result["predictions"] = {"file": "predictions.parquet", "schema": "mtbench.predictions/1"}
    try:
        _log_outcome(mlflow, run_id, result, trace, predictions)
    except Exception as exc:
        reason = f"recording the outcome failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})" \
            if str(exc) else f"recording the outcome failed ({exc.__class__.__name__})"
        if status != "FAILED":
            reason += f"; the run had ended {status}"
        _mark_failed(mlflow, run_id, reason)
        return Outcome(run_id, "FAILED", {}, result, reason)
    return Outcome(run_id, status, metrics, result, error)


def _mark_failed(mlflow: Any, run_id: str, reason: str) -> None:
    """Best effort: FAILED with the reason. If even this cannot be written, the run stays RUNNING and is shown DEAD
    once this process has exited."""
    try:
        mlflow.set_tag(run_id, "mtbench.error", reason[:5000])
        mlflow.set_terminated(run_id, "FAILED")
    except Exception:
        pass


def _log_outcome(mlflow: Any, run_id: str, result: dict[str, Any], trace: str | None,
                 predictions: list[dict[str, Any]] | None = None) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    values = {f"params/{k}": v for k, v in result["params"].items()}
    values.update({f"perf/{k}": v for k, v in result["perf"].items() if isinstance(v, (int, float))})
    tags = {
        "mtbench.device": result["provenance"]["device"],
        "mtbench.memory_kind": str(result["perf"].get("memory_kind", "")),
        "mtbench.metric_specs": json.dumps(result["metric_specs"], sort_keys=True),
    }
    if result["error"]:
        tags["mtbench.error"] = result["error"][:5000]
    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        if predictions:  # before result.json, so a result that names its predictions file always has one
            from .predictions import FILE, file_digest, write_predictions

            write_predictions(Path(tmp) / FILE, predictions)
            # Named with its digest, so the result's own sha256 vouches for the predictions as well.
            result["predictions"]["sha256"] = file_digest(Path(tmp) / FILE)
            mlflow.log_artifact(run_id, str(Path(tmp) / FILE))
        digest = write_result(Path(tmp) / "result.json", result)
        mlflow.log_artifact(run_id, str(Path(tmp) / "result.json"))
        mlflow.set_tag(run_id, "mtbench.result_sha256", digest)  # an exported copy is checked against it
        if trace:
            (Path(tmp) / "traceback.txt").write_text(trace)
            mlflow.log_artifact(run_id, str(Path(tmp) / "traceback.txt"))
    mlflow.set_terminated(run_id, result["status"])

"""One tracked run: create the MLflow run with its provenance, train and evaluate, record the outcome.

Whatever happens, the run ends recorded with a status: FINISHED, FAILED (error tag and traceback artifact) or
KILLED (Ctrl-C, SIGTERM). The ``result.json`` artifact is written atomically in every case.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
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
from .errors import ConfigError, MtbenchError
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


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so a terminated run is recorded as KILLED, like Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
            mlflow.set_tag(run_id, "mtbench.long_params", ",".join(sorted(long)) + " (in full in long_params.json)")
    return _train(exp, mlflow, run_id, uri, config, progress, built)


def resume_run(run_id: str, uri: str | None = None, progress: bool = True) -> Outcome:
    """Continue a KILLED run from its checkpoint, in the same MLflow run, to FINISHED."""
    from .config import resolve

    uri = tracking_uri(uri)
    mlflow = client(uri)
    try:
        run = mlflow.get_run(run_id)
    except Exception as exc:
        raise MtbenchError(f"run {run_id} not found in {uri}") from exc
    checkpoint = checkpoint_path(uri, run_id)
    if run.info.status == "FINISHED":
        raise MtbenchError(f"run {run_id} is already FINISHED; nothing to resume")
    if not checkpoint.is_file():
        raise MtbenchError(f"run {run_id} has no checkpoint at {checkpoint} (only runs stopped by Ctrl-C or SIGTERM "
                           "during training can be resumed)")
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
    return _train(exp, mlflow, run_id, uri, exp.as_dict(), progress, built, resume_from=checkpoint)


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
    with _sigterm_as_interrupt():
        module = build_module(exp)
        return module, module.task.datamodule(exp.train, seed=exp.seed)


def _train(exp: Experiment, mlflow: Any, run_id: str, uri: str, config: dict[str, Any], progress: bool,
           built: tuple[Any, Any], resume_from: Path | None = None) -> Outcome:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

    from .callbacks import GracefulStop, Heartbeat, Measurements

    status, error, trace = "FAILED", None, None
    module, datamodule = built
    trainer: Any = None
    measurements = Measurements()
    stop = GracefulStop(checkpoint_path(uri, run_id))
    heartbeat = Heartbeat(lambda: mlflow.set_tag(run_id, "mtbench.heartbeat", f"{time.time():.0f}"))
    started = time.time()
    os.environ["MTBENCH_RUN_ID"] = run_id  # inherited by the processes Lightning launches for extra DDP ranks
    try:
        with _sigterm_as_interrupt():
            logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=uri, run_id=run_id,
                                  artifact_location=artifact_root(uri))
            with tempfile.TemporaryDirectory() as scratch:
                # tqdm's bar: Lightning's default rich bar prints "Epoch 0/-2" for step-limited runs (max_epochs -1).
                bar = [pl.callbacks.TQDMProgressBar()] if progress else []
                trainer = pl.Trainer(**_trainer_kwargs(exp), logger=logger, default_root_dir=scratch,
                                     callbacks=[measurements, stop, heartbeat, *module.method.callbacks(), *bar],
                                     enable_checkpointing=False, enable_progress_bar=progress)
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
                if stop.received is not None:
                    raise KeyboardInterrupt(f"signal {stop.received}; checkpoint saved at step {trainer.global_step}")
                if module.metrics_step != trainer.global_step:
                    trainer.validate(module, datamodule=datamodule, verbose=False)
            status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as exc:
        status, error = "KILLED", f"interrupted ({exc.__class__.__name__}{': ' + str(exc) if str(exc) else ''})"
    except Exception as exc:
        status, error, trace = "FAILED", f"{exc.__class__.__name__}: {exc}", traceback.format_exc()
    finally:
        os.environ.pop("MTBENCH_RUN_ID", None)
    if trainer is not None and not trainer.is_global_zero:
        return Outcome(run_id, status, dict(module.final_metrics), {}, error)
    if status == "FINISHED":
        checkpoint_path(uri, run_id).unlink(missing_ok=True)
    return _record(exp, mlflow, run_id, config, status, error, trace, module, trainer, measurements, started)


def _quiet_libraries() -> None:
    """Keep the console to the progress bar and mtbench's own lines (Lightning resets its level at import)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _trainer_kwargs(exp: Experiment) -> dict[str, Any]:
    kwargs = dict(exp.trainer)
    # Validation always runs once at the end; during training only every `trainer.val_check_interval` steps when
    # set. Lightning's epoch-based default would validate at points that depend on the sampler's epoch length.
    kwargs.setdefault("check_val_every_n_epoch", None)
    kwargs.setdefault("val_check_interval", 10**12)
    kwargs.setdefault("use_distributed_sampler", False)
    if kwargs.get("strategy") == "ddp":
        # A rank whose batch holds no example of some subtask leaves that head (and routed experts or task
        # adapters) without gradient; plain DDP would then wait forever for it in the all-reduce.
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    return kwargs


def _record(exp: Experiment, mlflow: Any, run_id: str, config: dict[str, Any], status: str, error: str | None,
            trace: str | None, module: Any, trainer: Any, measurements: Any, started: float) -> Outcome:
    import torch

    from .callbacks import count_parameters

    metrics = dict(module.final_metrics) if module is not None and status == "FINISHED" else {}
    device = module.device if module is not None else torch.device("cpu")
    perf = measurements.summary(trainer, device) if trainer is not None else {"wall_s": time.time() - started}
    params = measurements.values.get("params") or (count_parameters(module) if module is not None else {})
    specs = module.specs if module is not None else {}
    result = {
        "schema": SCHEMA, "run_id": run_id, "status": status, "error": error,
        "method": exp.method_name, "task": exp.task_name, "task_version": exp.task_cls.version,
        "profile": exp.profile, "seed": exp.seed, "method_config_id": exp.method_config_id(),
        "config_id": exp.config_id(), "protocol_id": exp.protocol_id(), "config": config, "metrics": metrics,
        "metric_specs": {f"val/{sub}/{name}": {"higher_is_better": s.higher_is_better, "primary": s.primary,
                                               "version": s.version}
                         for sub, group in specs.items() for name, s in group.items()},
        "params": params, "perf": perf,
        "provenance": {"device": measurements.values.get("device", str(device)), **host_info(),
                       "git_commit": git_state()[0], "git_dirty": git_state()[1], "versions": package_versions(),
                       "started": started, "finished": time.time()},
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
    _log_outcome(mlflow, run_id, result, trace)
    return Outcome(run_id, status, metrics, result, error)


def _log_outcome(mlflow: Any, run_id: str, result: dict[str, Any], trace: str | None) -> None:
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
        digest = write_result(Path(tmp) / "result.json", result)
        mlflow.log_artifact(run_id, str(Path(tmp) / "result.json"))
        mlflow.set_tag(run_id, "mtbench.result_sha256", digest)  # an exported copy is checked against it
        if trace:
            (Path(tmp) / "traceback.txt").write_text(trace)
            mlflow.log_artifact(run_id, str(Path(tmp) / "traceback.txt"))
    mlflow.set_terminated(run_id, result["status"])

"""MLflow tracking: the embedded store, run creation with provenance, and terminal status.

Default store: ``sqlite:///<home>/mlflow.db`` with artifacts in ``<home>/artifacts`` (home ``./mtbench-runs``, or
``MTBENCH_HOME``). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere, including a real ``mlflow server``.
MLflow's sqlite default would put artifacts in ``./mlruns`` of whatever directory one runs from, so experiments are
always created with an explicit artifact location next to the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Mapping
from contextlib import closing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MtbenchError


if TYPE_CHECKING:
    import pandas as pd


EXPERIMENT = "mtbench"
PACKAGES = ("mtbench", "torch", "lightning", "transformers", "timm", "torchmetrics", "mlflow", "peft")
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def home_dir() -> Path:
    """The embedded store's folder (``MTBENCH_HOME`` or ``./mtbench-runs``)."""
    return Path(os.environ.get("MTBENCH_HOME", "mtbench-runs")).resolve()


SQLITE_TIMEOUT_S = 60
"""Seconds a writer to the sqlite store waits for its lock (the driver's default is 5): concurrent runs queue."""
_SQLITE_OPTIONS = f"?timeout={SQLITE_TIMEOUT_S}"


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: explicit, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store.

    A sqlite URI without options gets ``?timeout=60``: concurrent runs then wait up to 60 s for the write lock
    instead of failing with "database is locked" after the driver's default 5 s.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home_dir() / 'mlflow.db'}"
    if uri != "databricks" and ("://" not in uri or uri.startswith("file:")):
        # MLflow would take a bare path or file: URI as its file store, which it no longer develops (and whose
        # error is a traceback); mtbench's stores are databases or tracking servers.
        raise ConfigError(f"tracking URI {uri!r}: give a database or server URI, e.g. sqlite:////abs/path/mlflow.db "
                          "(four slashes for an absolute path) or http://host:5000")
    if uri.startswith("sqlite:///") and "?" not in uri:
        uri += _SQLITE_OPTIONS
    return uri


def shown_uri(uri: str) -> str:
    """``uri`` as messages show it: without the ``?timeout=60`` :func:`tracking_uri` adds, which the user never
    wrote."""
    return uri.removesuffix(_SQLITE_OPTIONS)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (options stripped), else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside a sqlite database; ``None`` lets a tracking server choose."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db else None


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, creating the sqlite folder if needed."""
    import logging

    from mlflow.tracking import MlflowClient

    # MLflow announces database migrations at INFO on every new store; that is noise on the console.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    if (db := sqlite_path(uri)) is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MtbenchError(f"cannot create the store folder {db.parent}: {exc.strerror}") from exc
        return _open_sqlite_store(db, uri)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif ("://" in uri or uri.startswith("sqlite:")) and not uri.startswith(
        ("postgresql", "mysql", "mssql", "databricks")
    ):
        raise MtbenchError(f"tracking URI {uri!r} is not supported; use sqlite:///PATH.db or http(s)://HOST:PORT")
    return MlflowClient(tracking_uri=uri)


def _open_sqlite_store(db: Path, uri: str) -> Any:
    """Create or migrate the sqlite store under an exclusive file lock, in write-ahead-log mode.

    MLflow creates its tables on first use; processes starting together on a new store would race through the same
    migrations ("table already exists"). WAL lets readers proceed while one process writes, and the 60 s busy
    timeout MLflow's engine is given (see :func:`tracking_uri`) makes writers queue instead of failing.
    """
    import fcntl
    import sqlite3

    # MLflow writes to the store on open (migrations, WAL); on a read-only file it fails deep in SQLAlchemy, whose
    # error carries the whole failed SQL script. Say it in one line instead.
    for path in (db, db.parent):
        if path.exists() and not os.access(path, os.W_OK):
            what = "file" if path == db else "folder"
            raise MtbenchError(f"the store {what} {path} is read-only; mtbench writes to the store even to read it "
                               "(MLflow migrates and locks it): make it writable, or work on a copy")
    try:
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # Before MLflow opens its pooled connections: the journal mode changes only with none open.
                try:
                    with closing(sqlite3.connect(db, timeout=SQLITE_TIMEOUT_S)) as conn:
                        conn.execute("pragma journal_mode=wal")
                except sqlite3.OperationalError:
                    pass  # another process holds the store open; it stays in its current mode, which still works
                from mlflow.tracking import MlflowClient

                mlflow_client = MlflowClient(tracking_uri=uri)
                mlflow_client.search_experiments(max_results=1)
                return mlflow_client
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as exc:
        raise MtbenchError(f"cannot open the store {db}: {exc.strerror}") from exc
    except Exception as exc:
        raise MtbenchError(f"tracking store {db} is not usable: {str(exc).splitlines()[0][:200]}") from exc


def _check_server(uri: str) -> None:
    """Fail at once on an unreachable tracking server (MLflow's own client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise MtbenchError(f"tracking server {uri} is unreachable ({problem}); start it or pass another --tracking-uri")


def load_runs(uri: str) -> pd.DataFrame:
    """All mtbench runs in the store as one frame (``run_id``, ``status``, ``start_time``, ``end_time``,
    ``metrics.*``, ``params.*``, ``tags.*``), newest first; empty when the store has no mtbench experiment."""
    import mlflow
    import pandas as pd

    if (db := sqlite_path(uri)) is not None and not db.is_file():
        return pd.DataFrame()  # reading creates nothing: a mistyped path must not leave an empty store behind
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")


def experiment_id(mlflow_client: Any, uri: str) -> str:
    """Id of the ``mtbench`` experiment, created with an explicit artifact location on first use."""
    try:
        exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        try:
            return mlflow_client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
        except Exception:
            # Another process created it between our look-up and our create (concurrent first runs on a server).
            exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id
    except Exception as exc:
        if isinstance(exc, MtbenchError):
            raise
        raise MtbenchError(f"tracking store {shown_uri(uri)} is not usable: {str(exc).splitlines()[0][:200]}") from exc


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the mtbench checkout, or ('unknown', False) outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return "unknown", False
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


PARAM_LIMIT = 6000
"""Longest param value an MLflow store accepts (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``, MLflow 2 and 3);
not imported from MLflow so that reading a config does not load it."""


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params as logged to MLflow, dropping any whose name looks like a secret.

    A value longer than :data:`PARAM_LIMIT` is logged as its head followed by ``…[<length> chars, sha256 <digest>]``
    (its full text goes to the run's ``config.yaml`` and ``long_params.json`` artifacts, listed in the
    ``mtbench.long_params`` tag): two values that differ anywhere, even past the limit, log differently, so
    :func:`protocol_id` computed from logged params sees every value in full.
    """
    return {k: _fit(str(v)) for k, v in params.items() if not _SECRET.search(k)}


def long_params(params: dict[str, Any]) -> dict[str, str]:
    """The params (secrets dropped) whose value is too long for an MLflow param, in full."""
    return {k: str(v) for k, v in params.items() if not _SECRET.search(k) and len(str(v)) > PARAM_LIMIT}


def _fit(text: str) -> str:
    if len(text) <= PARAM_LIMIT:
        return text
    tail = f"…[{len(text)} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()}]"
    return text[: PARAM_LIMIT - len(tail)] + tail


NOT_PROTOCOL = frozenset({"task.data_root", "train.num_workers", "trainer.enable_model_summary",
                          "trainer.enable_progress_bar", "trainer.log_every_n_steps"})
"""Logged settings that change where a run reads its files or what it prints, never what it measures."""


def protocol_id(params: Mapping[str, str]) -> str:
    """Short hash of a run's logged params less the method's and the seed: the protocol (task options, optimisation,
    sampler, trainer) under which methods are compared. An override such as ``--set trainer.max_steps=0`` makes a
    new protocol, so its runs never average or rank with the profile's.

    ``params`` are values as :func:`safe_params` logs them: whole up to :data:`PARAM_LIMIT` characters, longer ones
    with the SHA-256 of their full text, so the hash depends on every character of every value."""
    kept = {k: v for k, v in params.items() if not k.startswith("method.") and k != "seed" and k not in NOT_PROTOCOL}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def host_info() -> dict[str, str]:
    """Machine facts recorded with every run."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": str(os.cpu_count())}


STALE_AFTER_S = 15 * 60
"""A RUNNING run whose heartbeat is older than this (and whose process cannot be checked) is dead."""


def liveness(status: str, host: str | None, pid: str | None, heartbeat: str | None, now: float) -> str:
    """``status``, or ``DEAD`` for a RUNNING run whose process is gone.

    A run started on this host is checked by its process id; one started elsewhere by the age of its heartbeat
    (refreshed every 30 s while training), so a run killed with SIGKILL is recognised without waiting on it.
    """
    if status != "RUNNING":
        return status
    if host == socket.gethostname() and pid and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "DEAD"
        except PermissionError:
            return status
        return status
    try:
        return "DEAD" if now - float(heartbeat or "nan") > STALE_AFTER_S else status
    except ValueError:
        return status

"""MLflow tracking: the embedded store, run creation with provenance, and terminal status.

Default store: ``sqlite:///<home>/mlflow.db`` with artifacts in ``<home>/artifacts`` (home ``./mtbench-runs``, or
``MTBENCH_HOME``). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere, including a real ``mlflow server``.
MLflow's sqlite default would put artifacts in ``./mlruns`` of whatever directory one runs from, so experiments are
always created with an explicit artifact location next to the database.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .errors import MtbenchError


EXPERIMENT = "mtbench"
PACKAGES = ("mtbench", "torch", "lightning", "transformers", "timm", "torchmetrics", "mlflow", "peft")
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def home_dir() -> Path:
    """The embedded store's folder (``MTBENCH_HOME`` or ``./mtbench-runs``)."""
    return Path(os.environ.get("MTBENCH_HOME", "mtbench-runs")).resolve()


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: explicit, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home_dir() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside a sqlite database; ``None`` lets a tracking server choose."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
    return None


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, creating the sqlite folder if needed."""
    import logging

    from mlflow.tracking import MlflowClient

    # MLflow announces database migrations at INFO on every new store; that is noise on the console.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MtbenchError(f"cannot create the store folder {db.parent}: {exc.strerror}") from exc
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: Any, uri: str) -> str:
    """Id of the ``mtbench`` experiment, created with an explicit artifact location on first use."""
    try:
        exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        return mlflow_client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
    except Exception as exc:
        if isinstance(exc, MtbenchError):
            raise
        raise MtbenchError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0][:200]}") from exc


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


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params, dropping any whose name looks like a secret and truncating to MLflow's limit."""
    return {k: str(v)[:500] for k, v in params.items() if not _SECRET.search(k)}


def host_info() -> dict[str, str]:
    """Machine facts recorded with every run."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": str(os.cpu_count())}

"""Per-example predictions of a run's last evaluation: ``predictions.parquet`` (schema ``mtbench.predictions/1``).

One row per evaluated example and subtask. Columns:

==================  =======  ==========================================================================================
``subtask``         str      the subtask
``example_id``      str      stable id of the example within the subtask's evaluation split (same across runs and seeds
                             of one task version and config: what pairs two runs' rows)
``prediction``      str      what the model answered (class index, generated answer, regression value)
``target``          str      the gold answer
``correct``         float    1.0 / 0.0 for accuracy-type subtasks, NaN otherwise
``score``           float    the example's value of the statistic the headline metric aggregates (accuracy: correct;
                             exact match; per-image mIoU for dense tasks, see ``aggregate``)
``loss``            float    the example's loss (cross-entropy, squared error, summed token NLL), NaN when undefined
``tokens``          float    scored tokens (language modelling and generation), NaN otherwise
``aggregate``       str      how rows combine into the subtask's headline metric: ``mean`` (mean of ``score``),
                             ``mcc`` or ``f1`` (of integer ``prediction`` / ``target``), ``token_mean`` (sum of
                             ``loss`` over sum of ``tokens``), ``none`` (the headline metric is not a function of
                             these rows, e.g. dataset-accumulated mIoU: no example-level test for it)
``headline``        bool     whether the subtask counts in the task's headline quality (``val/avg``,
                             :meth:`mtbench.interfaces.Task.headline`)
==================  =======  ==========================================================================================

The file's key-value metadata carries ``mtbench.schema``. Parquet is written and read through pandas (pyarrow).
The run's ``result.json`` names the file and its SHA-256 (``predictions.sha256``), so the integrity digest of the
result covers the predictions too: a board ignores a predictions file that no longer matches (:func:`matches`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MtbenchError
from .results import atomic_write_bytes


SCHEMA = "mtbench.predictions/1"
FILE = "predictions.parquet"
COLUMNS = {"subtask": str, "example_id": str, "prediction": str, "target": str, "correct": float, "score": float,
           "loss": float, "tokens": float, "aggregate": str, "headline": bool}
AGGREGATES = ("mean", "mcc", "f1", "token_mean", "none")


def to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Records (from :meth:`mtbench.interfaces.Task.example_records`) as a typed frame with every column; missing
    numbers become NaN, missing strings ''. A repeated (subtask, example_id) keeps its last row."""
    frame = pd.DataFrame.from_records(list(records))
    for column, kind in COLUMNS.items():
        if column not in frame:
            frame[column] = {float: math.nan, bool: False, str: ""}[kind]
        if kind is bool:
            frame[column] = frame[column].fillna(False).astype(bool)
        else:
            frame[column] = frame[column].astype(float) if kind is float else frame[column].fillna("").astype(str)
    frame = frame[list(COLUMNS)].drop_duplicates(["subtask", "example_id"], keep="last")
    return frame.sort_values(["subtask", "example_id"], kind="stable").reset_index(drop=True)


def write_predictions(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` to ``path`` atomically as parquet; returns the number of rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = to_frame(records)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"mtbench.schema": SCHEMA.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return len(frame)


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def matches(path: str | Path, result: dict[str, Any]) -> str | None:
    """``None`` when the predictions file at ``path`` is the one ``result`` names (same SHA-256, or a result written
    before predictions carried one), else one line saying it is not.

    Raises:
        OSError: the file cannot be read.
    """
    named = result.get("predictions")
    expected = named.get("sha256") if isinstance(named, dict) else None
    if not isinstance(expected, str) or file_digest(path) == expected:
        return None
    return (f"{path}: does not match the sha256 its result.json names (edited or replaced after the run); the run "
            "counts, its comparisons use the seed-level test")


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read and check a predictions file.

    Raises:
        MtbenchError: unreadable file, another schema, a missing column or an unknown ``aggregate``.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise MtbenchError(f"{path}: unreadable predictions file ({exc.__class__.__name__})") from exc
    schema = (table.schema.metadata or {}).get(b"mtbench.schema", b"").decode()
    if schema != SCHEMA:
        raise MtbenchError(f"{path}: schema is {schema!r}, expected {SCHEMA!r}")
    frame = table.to_pandas()
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise MtbenchError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(frame["aggregate"]) - set(AGGREGATES))
    if unknown:
        raise MtbenchError(f"{path}: aggregate {unknown[0]!r} is not one of {', '.join(AGGREGATES)}")
    return frame

"""Published results ("reported in paper" rows) shown beside a task's measured leaderboard rows.

The tables live in ``reported.yaml`` beside this module (schema ``mtbench.reported/1``), each citing its paper, table
and where the numbers were read (the project's method specification). They are display-only: the leaderboard never
ranks them, never pairs them with a measured row and never puts them on a Pareto front, because the papers trained
other models on other data with other budgets.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import MtbenchError


SCHEMA = "mtbench.reported/1"
DEFAULT_FILE = Path(__file__).with_name("reported.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportedColumn(_Strict):
    """One column of a paper's table: key in :attr:`ReportedRow.values`, header as printed, direction."""

    key: str
    header: str
    higher_is_better: bool


class ReportedRow(_Strict):
    """One row of a paper's table; ``method`` is the mtbench method it corresponds to, if any."""

    label: str
    method: str | None = None
    note: str = ""
    values: dict[str, float]


class ReportedTable(_Strict):
    """A cited table of one paper for one mtbench task. A table with no rows records that the numbers could not be
    retrieved (``provenance`` says why): it is shown as such, never filled in."""

    id: str
    task: str
    paper: str
    table: str
    setting: str
    provenance: str
    columns: list[ReportedColumn]
    rows: list[ReportedRow]

    @model_validator(mode="after")
    def _values_match_columns(self) -> ReportedTable:
        keys = [c.key for c in self.columns]
        for row in self.rows:
            if sorted(row.values) != sorted(keys):
                raise ValueError(f"row {row.label!r} has values for {sorted(row.values)}, columns are {sorted(keys)}")
        return self


class ReportedFile(_Strict):
    schema_: str
    tables: list[ReportedTable]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _rename(cls, data: object) -> object:
        if isinstance(data, dict) and "schema" in data:
            data = {("schema_" if k == "schema" else k): v for k, v in data.items()}
        return data


def load_reported(path: str | Path | None = None) -> list[ReportedTable]:
    """The reported tables of ``path`` (default: the shipped ``reported.yaml``).

    Raises:
        MtbenchError: unreadable file, wrong schema, or a row whose values do not match its table's columns.
    """
    return list(_load(str(Path(path) if path else DEFAULT_FILE)))


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[ReportedTable, ...]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        parsed = ReportedFile.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise MtbenchError(f"{path}: unreadable reported-results file ({exc.__class__.__name__})") from exc
    except ValidationError as exc:
        raise MtbenchError(f"{path}: {str(exc).splitlines()[0]}: {exc.errors()[0]['msg']}") from exc
    if parsed.schema_ != SCHEMA:
        raise MtbenchError(f"{path}: schema is {parsed.schema_!r}, expected {SCHEMA!r}")
    return tuple(parsed.tables)


def reported_for(task: str, tables: list[ReportedTable] | None = None) -> list[ReportedTable]:
    """The reported tables of one task, in file order."""
    return [t for t in (load_reported() if tables is None else tables) if t.task == task]

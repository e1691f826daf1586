"""Statistics of the leaderboard: mean, std and Student-t confidence intervals over seeds, paired comparisons against
a reference method, ranks and Pareto fronts within a comparison group.

The seed is the unit of replication. Runs of one row are first reduced to one value per distinct seed
(:func:`per_seed`: repeated runs of a seed are averaged, so rerunning seed 0 never narrows an interval), and every
statistic is computed over those per-seed values; ``n`` is the number of seeds that produced a finite value.

A comparison group is one task, task version, metric versions, profile, protocol and device: numbers measured under
different definitions, training protocols or hardware are never ranked against each other.

Every row of a group is tested against the group's reference, so a group of m tested rows runs m tests; ``significant``
follows Holm's step-down adjustment of their p-values (:func:`adjust_multiplicity`), which keeps the chance of any
false "yes" in the group at most alpha whatever the tests' dependence. The unadjusted p stays in ``p_value``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats


CONFIDENCE = 0.95
ALPHA = 0.05
GROUP = ["task", "task_version", "metric_versions", "profile", "protocol_id", "device"]
# (column suffix, cost metric, lower cost is better)
PARETO_AXES = (
    ("params", "params/trainable", True),
    ("memory", "perf/peak_mem_mb", True),
    ("throughput", "perf/train_samples_per_s", False),
)
DEFAULT_REFERENCE = "lora"


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1), count and the half-width of the two-sided Student-t confidence interval."""

    mean: float
    std: float
    n: int
    ci: float


@dataclass(frozen=True)
class Paired:
    """A paired comparison ``a - b`` over the seeds both sides ran.

    ``verdict`` is ``"yes"`` (p < alpha), ``"no"`` (p >= alpha) or ``"n/a"`` (fewer than two pairs).
    """

    n: int
    diff: float
    p_value: float
    verdict: str


REPEATS = "mean"
"""How repeated runs of one seed are reduced to the seed's value: their mean over finite values."""


def per_seed(seeds: Iterable[Any], values: Iterable[Any]) -> dict[str, float]:
    """One value per distinct seed: the mean of that seed's finite values, NaN when it has none.

    ``seeds`` and ``values`` are aligned (one entry per run). Keys are the seeds as strings, in the leaderboard's
    order (numeric seeds by value: "2" before "10").
    """
    found: dict[str, list[float]] = {}
    for seed, value in zip(seeds, values):
        bucket = found.setdefault(str(seed), [])
        number = _as_float(value)
        if math.isfinite(number):
            bucket.append(number)
    return {s: (float(np.mean(found[s])) if found[s] else math.nan) for s in sorted(found, key=seed_order)}


def seed_order(seed: str) -> tuple[int, str]:
    """Sort key of a seed string: shorter first, then lexical (so numbers sort by value)."""
    return len(seed), seed


def finite_seeds(values: Mapping[str, float]) -> list[str]:
    """Seeds of ``values`` (from :func:`per_seed`) whose value is finite, in order."""
    return [s for s, v in values.items() if math.isfinite(v)]


def failed_seeds(values: Mapping[str, float]) -> list[str]:
    """Seeds of ``values`` (from :func:`per_seed`) whose value is NaN or infinite: they count in no statistic."""
    return [s for s, v in values.items() if not math.isfinite(v)]


def _as_float(value: Any) -> float:
    try:
        return float(value) if value is not None and not pd.isna(value) else math.nan
    except (TypeError, ValueError):
        return math.nan


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of the finite values (one per seed: see :func:`per_seed`); std and interval are NaN below two."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(data)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan)
    if n == 1:
        return Summary(float(data[0]), math.nan, 1, math.nan)
    std = float(data.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(float(data.mean()), std, n, half)


def paired_test(a: Mapping[str, float], b: Mapping[str, float], alpha: float = ALPHA) -> Paired:
    """Paired two-sided t-test of ``a`` against ``b``, pairing by seed (keys present and finite on both sides).

    Identical pairs give p = 1; a constant non-zero difference gives p = 0 (the t statistic is infinite).
    """
    seeds = sorted(k for k in a.keys() & b.keys() if math.isfinite(a[k]) and math.isfinite(b[k]))
    if not seeds:
        return Paired(0, math.nan, math.nan, "n/a")
    x = np.array([a[k] for k in seeds], dtype=float)
    y = np.array([b[k] for k in seeds], dtype=float)
    diff = x - y
    if len(seeds) < 2:
        return Paired(len(seeds), float(diff.mean()), math.nan, "n/a")
    if np.all(diff == diff[0]):
        p = 1.0 if diff[0] == 0 else 0.0
    else:
        p = float(scipy_stats.ttest_rel(x, y).pvalue)
    return Paired(len(seeds), float(diff.mean()), p, "yes" if p < alpha else "no")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, Scand. J. Statist. 6, 65-70), in the input order.

    With the m finite p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) · p_(j))``
    (1-based); a NaN stays NaN and is not counted in m. Rejecting where the adjusted p is below alpha controls the
    family-wise error rate at alpha under any dependence between the tests. Written here because scipy has no Holm
    adjustment (``scipy.stats.false_discovery_control`` controls the false discovery rate, a weaker guarantee), and
    a few lines do not justify a statsmodels dependency.
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out


def adjust_multiplicity(rows: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Add ``p_holm``, the Holm-adjusted p-value of each row's test against its group's reference, and set
    ``significant`` from it (``yes`` below alpha, else ``no``). The family is one comparison group's tested rows:
    the reference itself (``ref``) and rows without a p-value (``n/a``) are not tests and keep their verdict.

    Raises:
        KeyError: ``rows`` lacks the group, ``significant`` or ``p_value`` columns (run :func:`annotate` first).
    """
    rows = rows.copy()
    rows["p_holm"] = math.nan
    for _, group in rows.groupby(GROUP, sort=False, dropna=False):
        tested = [i for i in group.index
                  if rows.at[i, "significant"] in ("yes", "no") and math.isfinite(_finite(rows.at[i, "p_value"]))]
        for i, p in zip(tested, holm([float(rows.at[i, "p_value"]) for i in tested]), strict=True):
            rows.at[i, "p_holm"] = p
            rows.at[i, "significant"] = "yes" if p < alpha else "no"
    return rows


def pareto_front(quality: Sequence[float], cost: Sequence[float], lower_cost: bool = True) -> list[bool]:
    """Which points no other point dominates (higher quality is better; cost direction as given).

    A point dominates another when it is at least as good on both axes and strictly better on one. Points with a
    missing (NaN) coordinate are never on the front and dominate nothing.
    """
    q = np.asarray(quality, dtype=float)
    c = np.asarray(cost, dtype=float) * (1.0 if lower_cost else -1.0)
    valid = np.isfinite(q) & np.isfinite(c)
    front = []
    for i in range(len(q)):
        if not valid[i]:
            front.append(False)
            continue
        no_worse = valid & (q >= q[i]) & (c <= c[i])
        better = (q > q[i]) | (c < c[i])
        front.append(not bool(np.any(no_worse & better)))
    return front


def parse_references(items: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """``["lora", "glue=full_ft"]`` -> (default reference, per-task references)."""
    default, per_task = DEFAULT_REFERENCE, {}
    for item in items or []:
        task, sep, method = item.partition("=")
        if sep:
            per_task[task.strip()] = method.strip()
        else:
            default = item.strip()
    return default, per_task


def annotate(rows: pd.DataFrame, per_seed: Sequence[Mapping[str, float]], default_reference: str = DEFAULT_REFERENCE,
             references: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Add rank, reference comparison and Pareto columns, group by group.

    ``rows`` holds one leaderboard row per method config with ``quality_mean`` and the ``<metric>_mean`` columns of
    :data:`PARETO_AXES`; ``per_seed[i]`` maps seed -> quality of row ``i``.
    """
    rows = rows.reset_index(drop=True).copy()
    refs = references or {}
    rows["rank"] = pd.array([pd.NA] * len(rows), dtype="Int64")
    for column in ("reference", "ref_config", "significant"):
        rows[column] = ""
    for column in ("ref_diff", "p_value"):
        rows[column] = math.nan
    rows["ref_n"] = 0
    for name, _, _ in PARETO_AXES:
        rows[f"pareto_{name}"] = False
    for _, group in rows.groupby(GROUP, sort=False, dropna=False):
        index = list(group.index)
        ranks = group["quality_mean"].rank(ascending=False, method="min")
        rows.loc[index, "rank"] = pd.array([int(r) if pd.notna(r) else pd.NA for r in ranks], dtype="Int64")
        _compare(rows, index, per_seed, refs.get(str(group["task"].iloc[0]), default_reference))
        for name, metric, lower in PARETO_AXES:
            cost = group[f"{metric}_mean"] if f"{metric}_mean" in group else pd.Series(math.nan, index=group.index)
            rows.loc[index, f"pareto_{name}"] = pareto_front(group["quality_mean"], cost, lower_cost=lower)
    return rows


def _compare(rows: pd.DataFrame, index: list[int], per_seed: Sequence[Mapping[str, float]], method: str) -> None:
    """Fill the reference columns of the rows at ``index`` (one comparison group)."""
    candidates = [i for i in index if rows.at[i, "method"] == method]
    if not candidates:
        return
    # Several configs of the reference method: the one with most runs, then the best, then the lowest config id.
    ref = min(candidates, key=lambda i: (-rows.at[i, "n"], -_finite(rows.at[i, "quality_mean"]),
                                         str(rows.at[i, "method_config_id"])))
    for i in index:
        rows.at[i, "reference"] = method
        rows.at[i, "ref_config"] = rows.at[ref, "method_config_id"]
        if i == ref:
            rows.at[i, "significant"] = "ref"
            continue
        result = paired_test(per_seed[i], per_seed[ref])
        rows.at[i, "ref_diff"] = result.diff
        rows.at[i, "ref_n"] = result.n
        rows.at[i, "p_value"] = result.p_value
        rows.at[i, "significant"] = result.verdict


def _finite(value: Any) -> float:
    return float(value) if value is not None and pd.notna(value) else -math.inf

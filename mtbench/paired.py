"""Paired comparisons of a leaderboard row against its reference from per-example predictions, over examples and
seeds together, with a seed-level fallback.

Procedure (example level), for a row A and its reference B of one comparison group:

1. Seeds both ran, each with a ``predictions.parquet`` on both sides (repeated runs of a seed: their qualities are
   averaged, as everywhere on the board). Per subtask, the examples present in every one of those files.
2. Quality of a run on a set of examples = mean over the headline subtasks (rows marked ``headline``) of the
   subtask's headline metric recomputed from the rows (``aggregate``: ``mean`` of ``score``, ``mcc`` or ``f1`` of
   ``prediction``/``target``). It equals the logged
   ``val/avg`` on the full set. A task whose headline metric cannot be recomputed from its rows (``none``,
   ``token_mean``), or a Δm quality, has no example-level comparison.
3. Paired bootstrap, :data:`RESAMPLES` replicates: draw the seeds with replacement and, per subtask, the examples with
   replacement (one draw shared by every seed when all seeds evaluated the same examples, else one per seed); the
   replicate's difference is the mean over the drawn seeds of quality(A) - quality(B) on the drawn examples. Both
   sides always see the same draw (paired). Interval: the 2.5 and 97.5 percentiles. p: two-sided,
   ``2 * min(#(d <= 0) + 1, #(d >= 0) + 1) / (R + 1)``, capped at 1.
4. Minimum detectable difference: ``(z(0.975) + z(0.80)) * SE`` with SE the replicates' standard deviation: the
   smallest true difference this comparison finds at alpha 0.05 with 80 % power (normal approximation).
5. McNemar per seed (accuracy-type subtasks pooled: rows with a 0/1 ``correct``): exact, i.e. the two-sided binomial
   test of the discordant pairs (``scipy.stats.binomtest``); b = A right and B wrong, c = A wrong and B right.

Seed-level fallback (a side lacks per-example files, or the quality cannot be recomputed): the difference of the
per-seed qualities, Student-t interval and paired t-test over shared seeds, MDD ``(t(0.975) + t(0.80)) * sd / sqrt(n)``
with n - 1 degrees of freedom.

The bootstrap and McNemar are hand-assembled from numpy and scipy because no library resamples two crossed factors
(examples and seeds) together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats


RESAMPLES = 2000
ALPHA = 0.05
POWER = 0.80
SUPPORTED = ("mean", "mcc", "f1")
BOOTSTRAP = ("paired bootstrap over examples and seeds ({resamples} resamples; percentile interval); "
             "McNemar exact per seed on accuracy-type subtasks")
SEED_LEVEL = "seed-level paired t-test over {n} seeds ({why})"


@dataclass
class Comparison:
    """Row minus reference: estimate, 95 % interval, p, verdict, minimum detectable difference and procedure."""

    diff: float
    low: float
    high: float
    p_value: float
    verdict: str
    mdd: float
    n_seeds: int
    test: str
    n_examples: int = 0
    mcnemar: dict[str, dict[str, float]] = field(default_factory=dict)

    def mcnemar_text(self) -> str:
        """``seed 0: p=0.031 (b=12, c=3); ...`` or ''."""
        return "; ".join(f"seed {s}: p={m['p']:.3g} (b={int(m['b'])}, c={int(m['c'])})"
                         for s, m in self.mcnemar.items())


def seed_level(a: Mapping[str, float], b: Mapping[str, float], why: str) -> Comparison:
    """Paired comparison of per-seed qualities (``a - b`` over seeds both have finite)."""
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    test = SEED_LEVEL.format(n=len(seeds), why=why)
    if len(d) == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, "n/a", math.nan, 0, test)
    if len(d) < 2:
        return Comparison(float(d.mean()), math.nan, math.nan, math.nan, "n/a", math.nan, 1, test)
    sd, n = float(d.std(ddof=1)), len(d)
    t = float(scipy_stats.t.ppf(1 - ALPHA / 2, n - 1))
    se = sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    mdd = (t + float(scipy_stats.t.ppf(POWER, n - 1))) * se
    return Comparison(float(d.mean()), float(d.mean() - t * se), float(d.mean() + t * se), p,
                      "yes" if p < ALPHA else "no", mdd, n, test)


def usable(frame: pd.DataFrame) -> bool:
    """Whether a run's predictions reproduce its quality: there are headline subtasks, and each has rows with a
    supported aggregate."""
    return bool(frame["headline"].any()) and not unusable_subtasks([frame])


def unusable_subtasks(frames: Iterable[pd.DataFrame]) -> list[str]:
    """Headline subtasks of these prediction frames whose metric cannot be recomputed from their rows (no row with a
    supported aggregate, e.g. ``none`` for STS-B's correlations), sorted."""
    out: set[str] = set()
    for frame in frames:
        headline = frame[frame["headline"]]
        out |= {str(s) for s in headline["subtask"].unique()
                if not headline.loc[headline["subtask"] == s, "aggregate"].isin(SUPPORTED).any()}
    return sorted(out)


def subtask_metric(rows: pd.DataFrame) -> float:
    """The headline metric of one subtask from its rows (all of one supported aggregate)."""
    kind = rows["aggregate"].iloc[0]
    idx = np.arange(len(rows))[None, :]
    return float(_metric(kind, *_arrays(rows), idx)[0])


def compare_examples(a: Mapping[str, Sequence[pd.DataFrame]], b: Mapping[str, Sequence[pd.DataFrame]],
                     resamples: int = RESAMPLES, seed: int = 0) -> Comparison | None:
    """Example-level comparison of ``a`` (seed -> that seed's runs' prediction frames) against ``b``; ``None`` when
    the seeds both sides ran have no usable frames on both sides."""
    seeds = sorted((s for s in a if s in b and a[s] and b[s] and all(usable(f) for f in [*a[s], *b[s]])),
                   key=lambda s: (len(s), s))
    if not seeds:
        return None
    frames = {(side, s): [f[f["headline"] & f["aggregate"].isin(SUPPORTED)] for f in runs[s]]
              for side, runs in (("a", a), ("b", b)) for s in seeds}
    subtasks = sorted(set.intersection(*[set(f["subtask"]) for fs in frames.values() for f in fs]))
    if not subtasks:
        return None
    # Examples per subtask and seed present in every file of that seed (both sides).
    common = {(sub, s): sorted(set.intersection(*[set(f.loc[f["subtask"] == sub, "example_id"])
                                                  for f in frames[("a", s)] + frames[("b", s)]]))
              for sub in subtasks for s in seeds}
    crossed = all(common[(sub, s)] == common[(sub, seeds[0])] for sub in subtasks for s in seeds)
    rng = np.random.default_rng(seed)
    draws: dict[Any, Any] = {}
    for sub in subtasks:
        for k, s in enumerate(seeds):
            n = len(common[(sub, s)])
            if crossed and k > 0:
                draws[(sub, s)] = draws[(sub, seeds[0])]
            else:
                draws[(sub, s)] = np.vstack([np.arange(n)[None, :], rng.integers(0, n, size=(resamples, n))])
    # Per seed: quality difference on the full set (column 0) and on every replicate (columns 1..R).
    per_seed = np.zeros((len(seeds), resamples + 1))
    for k, s in enumerate(seeds):
        for side, sign in (("a", 1.0), ("b", -1.0)):
            runs = frames[(side, s)]
            for frame in runs:
                quality = np.mean([_replicates(frame, sub, common[(sub, s)], draws[(sub, s)]) for sub in subtasks],
                                  axis=0)
                per_seed[k] += sign * quality / len(runs)
    observed = float(per_seed[:, 0].mean())
    picks = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    replicates = per_seed[picks, np.arange(1, resamples + 1)[:, None]].mean(axis=1)
    low, high = (float(v) for v in np.percentile(replicates, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)]))
    below, above = int((replicates <= 0).sum()), int((replicates >= 0).sum())
    p = min(1.0, 2 * min(below + 1, above + 1) / (resamples + 1))
    se = float(replicates.std(ddof=1))
    mdd = (float(scipy_stats.norm.ppf(1 - ALPHA / 2)) + float(scipy_stats.norm.ppf(POWER))) * se
    n_examples = sum(len(common[(sub, seeds[0])]) for sub in subtasks)
    return Comparison(observed, low, high, p, "yes" if p < ALPHA else "no", mdd, len(seeds),
                      BOOTSTRAP.format(resamples=resamples), n_examples, _mcnemar(a, b, seeds))


def _arrays(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    score = rows["score"].to_numpy(dtype=float)
    kind = rows["aggregate"].iloc[0]
    if kind == "mean":
        return score, score, score
    pred = pd.to_numeric(rows["prediction"], errors="coerce").to_numpy(dtype=float)
    gold = pd.to_numeric(rows["target"], errors="coerce").to_numpy(dtype=float)
    return score, pred, gold


def _replicates(frame: pd.DataFrame, sub: str, ids: list[str], draws: np.ndarray) -> np.ndarray:
    rows = frame[frame["subtask"] == sub].drop_duplicates("example_id").set_index("example_id").loc[ids]
    return _metric(str(rows["aggregate"].iloc[0]), *_arrays(rows.reset_index()), draws)


def _metric(kind: str, score: np.ndarray, pred: np.ndarray, gold: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric on each row of index draws ``idx`` ``(R, n)``: accuracy-style mean, MCC or binary F1."""
    if kind == "mean":
        return score[idx].mean(axis=1)
    p, g = pred[idx], gold[idx]
    if kind == "f1":
        tp = ((p == 1) & (g == 1)).sum(axis=1)
        fp = ((p == 1) & (g != 1)).sum(axis=1)
        fn = ((p != 1) & (g == 1)).sum(axis=1)
        den = 2 * tp + fp + fn
        return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    # Matthews correlation from the confusion matrix (Gorodkin's multiclass form; the binary MCC for two classes).
    classes = np.unique(np.concatenate([pred, gold]))
    n = idx.shape[1]
    correct = (p == g).sum(axis=1).astype(float)
    t = np.stack([(g == c).sum(axis=1) for c in classes], axis=1).astype(float)
    q = np.stack([(p == c).sum(axis=1) for c in classes], axis=1).astype(float)
    num = correct * n - (t * q).sum(axis=1)
    den = np.sqrt((n**2 - (q**2).sum(axis=1)) * (n**2 - (t**2).sum(axis=1)))
    # One predicted (or true) class: 0, the coefficient's limit and the GLUE reference's (scikit-learn's) value.
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _mcnemar(a: Mapping[str, Sequence[pd.DataFrame]], b: Mapping[str, Sequence[pd.DataFrame]],
             seeds: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for s in seeds:
        left, right = _correct(a[s][0]), _correct(b[s][0])
        joined = left.join(right, how="inner", lsuffix="_a", rsuffix="_b")
        if joined.empty:
            continue
        wins = int(((joined["correct_a"] == 1) & (joined["correct_b"] == 0)).sum())
        losses = int(((joined["correct_a"] == 0) & (joined["correct_b"] == 1)).sum())
        p = float(scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
        out[s] = {"b": wins, "c": losses, "p": p, "n": len(joined)}
    return out


def _correct(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[(frame["aggregate"] == "mean") & frame["correct"].isin([0.0, 1.0])]
    return rows.drop_duplicates(["subtask", "example_id"]).set_index(["subtask", "example_id"])[["correct"]]




def annotate_examples(rows: pd.DataFrame, runs: Sequence[Sequence[tuple[str, str | None]]],
                      per_seed: Sequence[Mapping[str, float]], resamples: int = RESAMPLES) -> pd.DataFrame:
    """Replace each row's seed-level comparison with the example-level one where both sides have per-example
    predictions, and fill ``ref_ci_low``, ``ref_ci_high``, ``mdd``, ``ref_test`` and ``mcnemar`` for every compared
    row. ``runs[i]`` lists row i's runs as (seed, predictions file or ``None``); ``per_seed[i]`` its per-seed
    quality."""
    from .predictions import read_predictions

    rows = rows.copy()
    for column in ("ref_ci_low", "ref_ci_high", "mdd"):
        rows[column] = math.nan
    rows["ref_test"] = ""
    rows["mcnemar"] = ""
    cache: dict[str, pd.DataFrame | None] = {}

    def frames(i: int) -> dict[str, list[pd.DataFrame]] | None:
        out: dict[str, list[pd.DataFrame]] = {}
        for seed, path in runs[i]:
            if not path:
                return None
            if path not in cache:
                try:
                    cache[path] = read_predictions(path)
                except Exception:  # an unreadable file: that side falls back to the seed-level test
                    cache[path] = None
            if cache[path] is None:
                return None
            out.setdefault(str(seed), []).append(cache[path])
        return out

    for i in rows.index:
        if rows.at[i, "significant"] in ("ref", "") or not rows.at[i, "reference"]:
            continue
        ref = rows.index[(rows["method"] == rows.at[i, "reference"])
                         & (rows["method_config_id"] == rows.at[i, "ref_config"]) & _same_group(rows, i)]
        if len(ref) == 1:
            _fill(rows, i, _compare_rows(rows, i, ref[0], frames, per_seed, resamples))
    return rows


def _compare_rows(rows: pd.DataFrame, i: int, j: int, frames: Any, per_seed: Sequence[Mapping[str, float]],
                  resamples: int) -> Comparison:
    """Row i against row j: example level when possible, else seed level with the reason."""
    why = "per-example predictions missing"
    if rows.at[i, "quality_metric"] != "val/avg":
        why = f"{rows.at[i, 'quality_metric']} is not recomputed per example"
    else:
        mine, theirs = frames(i), frames(j)
        if mine is not None and theirs is not None:
            result = compare_examples(mine, theirs, resamples)
            if result is not None:
                return result
            bad = unusable_subtasks(f for side in (mine, theirs) for fs in side.values() for f in fs)
            why = (f"no per-example form of the headline metric of {', '.join(bad)}" if bad
                   else "the headline metrics cannot be recomputed from the predictions")
    return seed_level(per_seed[i], per_seed[j], why)


def _fill(rows: pd.DataFrame, i: int, result: Comparison) -> None:
    rows.at[i, "ref_diff"], rows.at[i, "ref_n"] = result.diff, result.n_seeds
    rows.at[i, "ref_ci_low"], rows.at[i, "ref_ci_high"] = result.low, result.high
    rows.at[i, "p_value"], rows.at[i, "significant"], rows.at[i, "mdd"] = result.p_value, result.verdict, result.mdd
    rows.at[i, "ref_test"] = result.test + (f", {result.n_examples} examples" if result.n_examples else "")
    rows.at[i, "mcnemar"] = result.mcnemar_text()


def _same_group(rows: pd.DataFrame, i: int) -> pd.Series:
    from .stats import GROUP

    mask = pd.Series(True, index=rows.index)
    for column in GROUP:
        mask &= rows[column].astype(str) == str(rows.at[i, column])
    return mask

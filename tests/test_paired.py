"""Paired significance over examples and seeds (mtbench.paired) against independent computations, and the
per-example predictions every task writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from mtbench import paired
from mtbench.predictions import SCHEMA, read_predictions, to_frame, write_predictions


def _run(correct: np.ndarray, sub: str = "rte") -> pd.DataFrame:
    return to_frame({"subtask": sub, "example_id": str(i), "prediction": str(int(c)), "target": "1",
                     "correct": float(c), "score": float(c), "aggregate": "mean", "headline": True}
                    for i, c in enumerate(correct))


def _pair(n: int = 300, seeds: int = 3, gap: float = 0.2) -> tuple[dict[str, list], dict[str, list]]:
    rng = np.random.default_rng(7)
    hard = rng.random(n)  # shared example difficulty: the same examples are hard for both methods
    a, b = {}, {}
    for s in range(seeds):
        u = rng.random(n)  # one draw per seed for both methods: their answers are correlated, as on one dev set
        a[str(s)] = [_run(u + gap * rng.random(n) > hard)]
        b[str(s)] = [_run(u + 0.2 * gap * rng.random(n) > hard)]
    return a, b


def _independent_bootstrap(a: dict[str, list], b: dict[str, list], resamples: int, seed: int) -> np.ndarray:
    """The procedure written out with loops: draw seeds, draw examples (one draw for all seeds), mean difference."""
    rng = np.random.default_rng(seed + 1000)
    seeds = sorted(a)
    acc = {(side, s): runs[s][0]["correct"].to_numpy() for side, runs in (("a", a), ("b", b)) for s in seeds}
    n = len(acc[("a", seeds[0])])
    out = []
    for _ in range(resamples):
        drawn = [seeds[k] for k in rng.integers(0, len(seeds), len(seeds))]
        idx = rng.integers(0, n, n)
        out.append(np.mean([acc[("a", s)][idx].mean() - acc[("b", s)][idx].mean() for s in drawn]))
    return np.array(out)


def test_bootstrap_interval_and_p_agree_with_an_independent_computation() -> None:
    a, b = _pair()
    result = paired.compare_examples(a, b, resamples=4000)
    assert result is not None and "paired bootstrap over examples and seeds (4000 resamples" in result.test
    expected = np.mean([a[s][0]["correct"].mean() - b[s][0]["correct"].mean() for s in a])
    assert result.diff == pytest.approx(expected, abs=1e-12)
    reference = _independent_bootstrap(a, b, 4000, 0)
    low, high = np.percentile(reference, [2.5, 97.5])
    width = high - low
    assert abs(result.low - low) < 0.08 * width and abs(result.high - high) < 0.08 * width, (result, low, high)
    assert result.low < result.diff < result.high
    se = reference.std(ddof=1)
    assert result.mdd == pytest.approx((scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * se, rel=0.1)
    assert result.verdict == ("yes" if result.p_value < 0.05 else "no")
    # A clear gap is significant; identical predictions are not, with an interval of exactly zero.
    assert result.p_value < 0.05
    same = paired.compare_examples(a, {s: list(v) for s, v in a.items()}, resamples=500)
    assert same is not None and same.diff == same.low == same.high == 0 and same.p_value == 1.0


def test_mcnemar_per_seed_is_the_exact_binomial_test_of_the_discordant_pairs() -> None:
    a, b = _pair(n=120, seeds=2)
    result = paired.compare_examples(a, b, resamples=200)
    assert result is not None and set(result.mcnemar) == {"0", "1"}
    for s, got in result.mcnemar.items():
        x, y = a[s][0]["correct"].to_numpy(), b[s][0]["correct"].to_numpy()
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        m = wins + losses
        tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1)) / 2**m
        assert (got["b"], got["c"]) == (wins, losses)
        assert got["p"] == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    assert "seed 0: p=" in result.mcnemar_text()


def test_mcc_and_f1_are_recomputed_like_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")  # installed with mlflow
    rng = np.random.default_rng(3)
    pred, gold = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    pred[:120] = gold[:120]
    for kind, metric in (("mcc", metrics.matthews_corrcoef), ("f1", metrics.f1_score)):
        rows = to_frame({"subtask": "cola", "example_id": str(i), "prediction": str(p), "target": str(g),
                         "correct": float(p == g), "score": float(p == g), "aggregate": kind}
                        for i, (p, g) in enumerate(zip(pred, gold)))
        assert paired.subtask_metric(rows) == pytest.approx(float(metric(gold, pred)), abs=1e-9), kind


def test_mcc_of_a_one_class_model_is_zero_as_the_logged_metric() -> None:
    """A collapsed classifier (MCC's denominator is zero) scores 0, as scikit-learn and the task's logged metric."""
    metrics = pytest.importorskip("sklearn.metrics")
    from mtbench.tasks._text_metrics import MatthewsCorrCoef

    gold = np.array([0, 1] * 40 + [1] * 16)
    for pred in (np.ones_like(gold), np.zeros_like(gold)):
        rows = to_frame({"subtask": "cola", "example_id": str(i), "prediction": str(p), "target": str(g),
                         "correct": float(p == g), "score": float(p == g), "aggregate": "mcc"}
                        for i, (p, g) in enumerate(zip(pred, gold)))
        logged = MatthewsCorrCoef()
        logged.update(torch.tensor(pred), torch.tensor(gold))
        assert paired.subtask_metric(rows) == float(logged.compute()) == metrics.matthews_corrcoef(gold, pred) == 0


def test_seed_level_fallback_says_so_and_uses_the_t_interval() -> None:
    a = {"0": 0.60, "1": 0.62, "2": 0.65}
    b = {"0": 0.58, "1": 0.61, "2": 0.60}
    result = paired.seed_level(a, b, "per-example predictions missing")
    d = np.array([0.02, 0.01, 0.05])
    half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert result.diff == pytest.approx(d.mean()) and result.low == pytest.approx(d.mean() - half)
    assert result.p_value == pytest.approx(scipy_stats.ttest_rel([0.60, 0.62, 0.65], [0.58, 0.61, 0.60]).pvalue)
    assert result.test == "seed-level paired t-test over 3 seeds (per-example predictions missing)"
    assert result.mdd > half  # 80 % power needs more than the interval's half-width


def test_the_fallback_names_the_subtasks_whose_metric_has_no_per_example_form() -> None:
    """A run whose headline subtasks include one scored as a whole (STS-B's correlations: aggregate ``none``) has no
    example-level comparison; ``ref_test`` says which subtask is why, not that predictions are missing."""
    def with_stsb(correct: np.ndarray) -> pd.DataFrame:
        stsb = to_frame({"subtask": "stsb", "example_id": str(i), "prediction": "2.5", "target": "3.0",
                         "correct": math.nan, "score": math.nan, "aggregate": "none", "headline": True}
                        for i in range(4))
        return pd.concat([_run(correct), stsb], ignore_index=True)

    a, b = _pair(n=50, seeds=2)
    a = {s: [with_stsb(f["correct"].to_numpy() > 0.5) for f in runs] for s, runs in a.items()}
    b = {s: [with_stsb(f["correct"].to_numpy() > 0.5) for f in runs] for s, runs in b.items()}
    assert paired.compare_examples(a, b) is None
    assert paired.unusable_subtasks(f for runs in a.values() for f in runs) == ["stsb"]
    rows = pd.DataFrame({"quality_metric": ["val/avg", "val/avg"], "method": ["x", "lora"]})
    result = paired._compare_rows(rows, 0, 1, lambda i: (a, b)[i], [{"0": 0.6, "1": 0.7}, {"0": 0.5, "1": 0.6}],
                                  100)
    assert result.test == "seed-level paired t-test over 2 seeds (no per-example form of the headline metric of stsb)"


def test_the_minimum_detectable_difference_shrinks_with_more_examples() -> None:
    small = paired.compare_examples(*_pair(n=100), resamples=1000)
    large = paired.compare_examples(*_pair(n=1600), resamples=1000)
    assert small is not None and large is not None and large.mdd < small.mdd / 2


def test_predictions_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "predictions.parquet"
    rows = write_predictions(path, [{"subtask": "rte", "example_id": "0:1", "prediction": "1", "target": "0",
                                     "correct": 0.0, "score": 0.0, "loss": 1.5, "aggregate": "mean"}])
    frame = read_predictions(path)
    assert rows == 1 and frame.loc[0, "loss"] == 1.5 and math.isnan(frame.loc[0, "tokens"])
    pd.DataFrame({"subtask": ["rte"]}).to_parquet(tmp_path / "other.parquet")
    from mtbench.errors import MtbenchError

    with pytest.raises(MtbenchError, match=f"other.parquet: schema is '', expected '{SCHEMA}'"):
        read_predictions(tmp_path / "other.parquet")

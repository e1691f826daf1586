"""The multi-task sampler: task probabilities, mixed and homogeneous batches, determinism, DDP sharding."""

from __future__ import annotations

from collections import Counter

import pytest

from mtbench.data import LoaderConfig, MultiTaskBatchSampler, task_probabilities, weighted_round_robin
from mtbench.errors import ConfigError, DataError


SIZES = [100, 400, 25]


def _task_of(index: int) -> int:
    return 0 if index < 100 else (1 if index < 500 else 2)


def test_probabilities() -> None:
    assert task_probabilities(SIZES, "proportional", 2.0).tolist() == pytest.approx([100 / 525, 400 / 525, 25 / 525])
    temp = task_probabilities(SIZES, "temperature", 2.0)
    assert temp.tolist() == pytest.approx([10 / 35, 20 / 35, 5 / 35])
    assert task_probabilities(SIZES, "round_robin", 1.0).tolist() == pytest.approx([1 / 3] * 3)


def test_mixed_proportional_batches_follow_sizes() -> None:
    sampler = MultiTaskBatchSampler(SIZES, LoaderConfig(batch_size=25), seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 525 // 25
    counts = Counter(_task_of(i) for b in batches for i in b)
    share = counts[1] / sum(counts.values())
    assert 0.65 < share < 0.87  # expected 0.76
    assert any(len({_task_of(i) for i in b}) > 1 for b in batches), "mixed batches should mix tasks"


def test_round_robin_mixed_cycles_tasks_per_example() -> None:
    sampler = MultiTaskBatchSampler(SIZES, LoaderConfig(batch_size=6, sampler="round_robin"), seed=0)
    first = next(iter(sampler))
    assert [_task_of(i) for i in first] == [0, 1, 2, 0, 1, 2]


def test_homogeneous_batches_hold_one_task() -> None:
    cfg = LoaderConfig(batch_size=8, batch_mode="homogeneous", sampler="round_robin")
    batches = list(MultiTaskBatchSampler(SIZES, cfg, seed=0))
    tasks = [{_task_of(i) for i in b} for b in batches]
    assert all(len(t) == 1 for t in tasks)
    assert [t.pop() for t in tasks[:3]] == [0, 1, 2]


def test_small_task_is_reshuffled_not_exhausted() -> None:
    cfg = LoaderConfig(batch_size=30, batch_mode="homogeneous", sampler="round_robin")
    batches = [b for b in MultiTaskBatchSampler(SIZES, cfg, seed=0) if _task_of(b[0]) == 2]
    assert all(len(b) == 30 for b in batches)
    assert len(set(batches[0])) == 25  # the first pass through task 2 visits every example before repeating


def test_seeded_and_epoch_dependent() -> None:
    cfg = LoaderConfig(batch_size=10)
    a, b = MultiTaskBatchSampler(SIZES, cfg, seed=3), MultiTaskBatchSampler(SIZES, cfg, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_ranks_split_the_global_batch_of_one_process() -> None:
    full = list(MultiTaskBatchSampler(SIZES, LoaderConfig(batch_size=20), seed=0))
    half = LoaderConfig(batch_size=10)
    rank0 = list(MultiTaskBatchSampler(SIZES, half, seed=0, rank=0, world_size=2))
    rank1 = list(MultiTaskBatchSampler(SIZES, half, seed=0, rank=1, world_size=2))
    assert len(rank0) == len(rank1) == len(full)
    assert all(a + b == f for a, b, f in zip(rank0, rank1, full))


def test_skip_resumes_mid_epoch() -> None:
    sampler = MultiTaskBatchSampler(SIZES, LoaderConfig(batch_size=10), seed=0)
    full = list(sampler)
    sampler.skip = 7
    assert list(sampler) == full[7:]
    assert list(sampler) == full  # the skip applies once


def test_bad_loader_values() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ConfigError, match="temperature"):
        LoaderConfig(temperature=0)
    with pytest.raises(DataError, match="every subtask needs training examples"):
        MultiTaskBatchSampler([10, 0], LoaderConfig(), seed=0)
    with pytest.raises(ConfigError, match="length_grouping"):
        LoaderConfig(length_grouping=-1)
    with pytest.raises(DataError, match="lengths per task"):
        MultiTaskBatchSampler([3, 2], LoaderConfig(), seed=0, lengths=[[1, 2, 3], [1]])


# Lengths that vary a lot within every task (index-derived, so tests can recompute them).
LENGTHS = [[(7 * i) % 97 + 1 for i in range(n)] for n in SIZES]
FLAT = [n for task in LENGTHS for n in task]


def _padded_cost(batches: list[list[int]]) -> int:
    """Tokens a collate that pads to the longest row would produce."""
    return sum(len(b) * max(FLAT[i] for i in b) for b in batches)


@pytest.mark.parametrize("mode", ["mixed", "homogeneous"])
def test_length_grouping_reorders_the_same_draws_into_cheaper_batches(mode: str) -> None:
    plain_cfg = LoaderConfig(batch_size=8, batch_mode=mode, sampler="round_robin")
    grouped_cfg = LoaderConfig(batch_size=8, batch_mode=mode, sampler="round_robin", length_grouping=10)
    plain = list(MultiTaskBatchSampler(SIZES, plain_cfg, seed=0))
    grouped = list(MultiTaskBatchSampler(SIZES, grouped_cfg, seed=0, lengths=LENGTHS))
    assert len(grouped) == len(plain)
    assert all(len(b) == 8 for b in grouped)
    for start in range(0, len(plain), 10):  # each window holds exactly the examples drawn without grouping
        assert Counter(i for b in plain[start : start + 10] for i in b) == \
            Counter(i for b in grouped[start : start + 10] for i in b)
    if mode == "homogeneous":  # one task per batch, and the round-robin task order is kept
        assert [{_task_of(i) for i in b} for b in grouped] == [{_task_of(b[0])} for b in plain]
    assert _padded_cost(grouped) < 0.8 * _padded_cost(plain)


def test_length_grouping_without_lengths_is_off() -> None:
    cfg = LoaderConfig(batch_size=8, length_grouping=10)
    assert list(MultiTaskBatchSampler(SIZES, cfg, seed=0)) == list(MultiTaskBatchSampler(SIZES, LoaderConfig(
        batch_size=8), seed=0))


def test_length_grouping_resumes_and_shards() -> None:
    cfg = LoaderConfig(batch_size=10, length_grouping=4)
    sampler = MultiTaskBatchSampler(SIZES, cfg, seed=0, lengths=LENGTHS)
    full = list(sampler)
    sampler.skip = 6  # mid-window: the resumed stream is the tail of the uninterrupted one
    assert list(sampler) == full[6:]
    half = LoaderConfig(batch_size=5, length_grouping=4)
    ranks = [list(MultiTaskBatchSampler(SIZES, half, seed=0, rank=r, world_size=2, lengths=LENGTHS)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full  # two ranks see exactly the one-process batches


def test_weighted_round_robin_spreads_shares_evenly() -> None:
    turns = weighted_round_robin([2.0, 1.0, 1.0])
    order = [next(turns) for _ in range(8)]
    assert order == [0, 1, 2, 0, 0, 1, 2, 0]  # task 0 takes half the turns, never three in a row
    plain = weighted_round_robin([1.0, 1.0, 1.0])
    assert [next(plain) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_task_weights_scale_every_sampler() -> None:
    assert task_probabilities(SIZES, "round_robin", 1.0, [2, 1, 1]).tolist() == pytest.approx([0.5, 0.25, 0.25])
    base = task_probabilities(SIZES, "proportional", 1.0)
    weighted = task_probabilities(SIZES, "proportional", 1.0, [1, 1, 3])
    assert weighted[2] / weighted[0] == pytest.approx(3 * base[2] / base[0])
    cfg = LoaderConfig(batch_size=4, batch_mode="homogeneous", sampler="round_robin", task_weights=("b=3",))
    sampler = MultiTaskBatchSampler(SIZES, cfg, seed=0, weights=cfg.weights_of(["a", "b", "c"]))
    tasks = [_task_of(batch[0]) for batch in sampler]
    assert all(len({_task_of(i) for i in batch}) == 1 for batch in sampler)
    assert tasks[:5] == [1, 0, 1, 2, 1]
    assert Counter(tasks[:130]) == {0: 26, 1: 78, 2: 26}  # 26 full turns of 5


def test_task_weights_bad_entries_are_config_errors() -> None:
    for entry in ("rte", "rte=0", "rte=-1", "rte=x", "=2", "rte=inf"):
        with pytest.raises(ConfigError, match="task_weights"):
            LoaderConfig(task_weights=(entry,))
    with pytest.raises(ConfigError, match="twice"):
        LoaderConfig(task_weights=("rte=2", "rte=3"))
    with pytest.raises(ConfigError, match="did you mean 'rte'"):
        LoaderConfig(task_weights=("rtee=2",)).weights_of(["rte", "mrpc"])

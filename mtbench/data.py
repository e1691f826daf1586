"""Multi-task batching shared by every task: a task sampler over per-subtask datasets, and one datamodule.

Lightning's ``CombinedLoader`` cycles or zips whole loaders; the samplers multi-task papers use (proportional,
temperature-scaled, round-robin) and per-example task mixing are not in any library we depend on, so they live here.

:class:`LoaderConfig` (the ``train.*`` batching options) is defined in :mod:`mtbench.interfaces`, beside the other
records core hands to tasks, and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from .errors import ConfigError, DataError
from .interfaces import LoaderConfig


__all__ = ["LoaderConfig", "MultiTaskBatchSampler", "MultiTaskDataModule", "task_probabilities",
           "weighted_round_robin"]


def task_probabilities(sizes: Sequence[int], sampler: str, temperature: float,
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """Probability of drawing each task: proportional (n_t), temperature (n_t^(1/T)) or uniform (round robin), times
    the task's weight (default 1), normalised."""
    n = torch.tensor(sizes, dtype=torch.float64)
    if sampler == "proportional":
        scores = n
    elif sampler == "temperature":
        scores = n ** (1.0 / temperature)
    else:
        scores = torch.ones_like(n)
    if weights is not None:
        scores = scores * torch.tensor(weights, dtype=torch.float64)
    return scores / scores.sum()


def weighted_round_robin(weights: Sequence[float]) -> Iterator[int]:
    """Endless task order in which task t takes a ``w_t / sum(w)`` share, spread out evenly.

    Smooth weighted round robin: each turn every task gains its weight, the richest goes and pays the total. Equal
    weights give plain round robin 0, 1, 2, 0, ...
    """
    credit, total = [0.0] * len(weights), float(sum(weights))
    while True:
        credit = [c + w for c, w in zip(credit, weights)]
        task = max(range(len(weights)), key=credit.__getitem__)  # first of equals: plain round robin
        credit[task] -= total
        yield task


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Yields batches of indices into the concatenation of the per-task datasets.

    One epoch is ``sum(sizes) // (batch_size · world_size)`` batches (at least one). Each task's examples are visited
    in a fresh random order and reshuffled when exhausted, so small tasks are revisited rather than truncating the
    epoch. Under DDP the stream is drawn in global batches of ``batch_size · world_size`` and each rank takes its
    slice, so N processes see exactly the examples one process with an N-times larger batch would. ``skip`` (set
    when resuming mid-epoch) drops the first batches of the next epoch's stream.

    With ``lengths`` (per task, per example) and ``cfg.length_grouping = k``, every window of k global batches is
    regrouped by length (the idea of Hugging Face's ``LengthGroupedSampler``, which works on one dataset and knows no
    tasks): the window's examples are sorted by length and cut back into batches, which are shuffled. Homogeneous
    windows regroup within each task and keep the task order of the batches; mixed windows regroup across tasks.
    """

    def __init__(self, sizes: Sequence[int], cfg: LoaderConfig, seed: int, rank: int = 0, world_size: int = 1,
                 lengths: Sequence[Sequence[int]] | None = None, weights: Sequence[float] | None = None):
        if not sizes or min(sizes) <= 0:
            raise DataError(f"every subtask needs training examples, got sizes {list(sizes)}")
        if weights is not None and (len(weights) != len(sizes) or min(weights) <= 0):
            raise ConfigError(f"task weights {list(weights)} must be one positive number per subtask ({len(sizes)})")
        self.weights = list(weights) if weights is not None else [1.0] * len(sizes)
        """Per-task multiplier of the sampler's share (``train.task_weights``)."""
        if lengths is not None and [len(x) for x in lengths] != list(sizes):
            raise DataError(f"lengths per task {[len(x) for x in lengths]} do not match the sizes {list(sizes)}")
        self.sizes, self.cfg, self.seed = list(sizes), cfg, seed
        self.lengths = [n for task_lengths in lengths for n in task_lengths] if lengths is not None else None
        """Length of every example, indexed like the concatenated datasets."""
        self.rank, self.world_size = rank, world_size
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch so every epoch draws a new order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, sum(self.sizes) // (self.cfg.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        # Its own generator, so grouping never changes which examples are drawn.
        regroup_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 500_009)
        window = self.cfg.length_grouping if self.lengths else 0
        skip, self.skip = self.skip, 0
        pending: list[tuple[int, list[int]]] = []
        for b, (task, batch) in enumerate(self._global_batches(gen)):
            if window <= 1:
                if b >= skip:
                    yield self._slice(batch)
                continue
            pending.append((task, batch))
            if len(pending) == window or b == len(self) - 1:
                for i, regrouped in enumerate(self._regroup(pending, regroup_gen), start=b + 1 - len(pending)):
                    if i >= skip:
                        yield self._slice(regrouped)
                pending = []

    def _slice(self, batch: list[int]) -> list[int]:
        return batch[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]

    def _regroup(self, window: list[tuple[int, list[int]]], gen: torch.Generator) -> list[list[int]]:
        """The window's batches rebuilt from its examples sorted by length (per task when homogeneous)."""
        assert self.lengths is not None
        homogeneous = self.cfg.batch_mode == "homogeneous"
        slots: dict[int, list[int]] = {}
        for i, (task, _) in enumerate(window):
            slots.setdefault(task if homogeneous else -1, []).append(i)
        out: list[list[int]] = [[] for _ in window]
        for positions in slots.values():
            pool = sorted((ix for p in positions for ix in window[p][1]), key=self.lengths.__getitem__)
            sizes = [len(window[p][1]) for p in positions]
            chunks, start = [], 0
            for size in sizes:
                chunks.append(pool[start : start + size])
                start += size
            for p, c in zip(positions, torch.randperm(len(chunks), generator=gen).tolist()):
                # Shuffle rows too, so a row's position in its batch says nothing about its length.
                rows = chunks[c]
                out[p] = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
        return out

    def _global_batches(self, gen: torch.Generator) -> Iterator[tuple[int, list[int]]]:
        """(task or -1 when mixed, global batch of dataset indices), ``len(self)`` of them."""
        probs = task_probabilities(self.sizes, self.cfg.sampler, self.cfg.temperature, self.weights)
        orders = [torch.randperm(n, generator=gen).tolist() for n in self.sizes]
        cursors = [0] * len(self.sizes)
        bs = self.cfg.batch_size * self.world_size
        turns = weighted_round_robin(self.weights)
        for _ in range(len(self)):
            task = -1
            if self.cfg.batch_mode == "homogeneous":
                if self.cfg.sampler == "round_robin":
                    task = next(turns)
                else:
                    task = int(torch.multinomial(probs, 1, generator=gen))
                picks = [task] * bs
            elif self.cfg.sampler == "round_robin":
                picks = [next(turns) for _ in range(bs)]
            else:
                picks = torch.multinomial(probs, bs, replacement=True, generator=gen).tolist()
            batch = []
            for t in picks:
                if cursors[t] == self.sizes[t]:
                    orders[t], cursors[t] = torch.randperm(self.sizes[t], generator=gen).tolist(), 0
                batch.append(self.offsets[t] + orders[t][cursors[t]])
                cursors[t] += 1
            yield task, batch


class _ResumableLoader(DataLoader):
    """A training DataLoader Lightning can resume mid-epoch (its ``_Stateful`` protocol).

    The state is the number of batches already trained in the current epoch, read from the trainer's progress
    (the sampler runs one batch ahead because Lightning prefetches). On restore, the sampler skips them.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: Any = self.batch_sampler
        done = state.get("batches_done", 0)
        # A checkpoint taken after an epoch's last batch resumes at the next epoch's start: nothing to skip.
        sampler.skip = done if done < len(sampler) else 0


class _Tagged(Dataset):
    """Adds the subtask id to every example of one subtask's dataset."""

    def __init__(self, dataset: Any, task_id: int) -> None:
        self.dataset, self.task_id = dataset, task_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "task_id": self.task_id}


class MultiTaskDataModule(pl.LightningDataModule):
    """Training batches from the task sampler; one evaluation loader per subtask (in ``subtasks`` order).

    Args:
        subtasks: subtask names; ``task_id`` of an example is its subtask's index here.
        train: subtask -> dataset of dict examples.
        val: subtask -> dataset of dict examples.
        collate: turns a list of examples (each with ``task_id``) into a batch dict with ``task_ids``.
        loader: sampler and batch sizes.
        seed: seed of the sampler's stream.
        length: an example's cost in the batch (e.g. its characters), for ``loader.length_grouping``; tasks without
            one (fixed-size images) ignore that option.
    """

    def __init__(
        self,
        subtasks: Sequence[str],
        train: Mapping[str, Any],
        val: Mapping[str, Any],
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        loader: LoaderConfig,
        seed: int = 0,
        length: Callable[[dict[str, Any]], int] | None = None,
    ) -> None:
        super().__init__()
        self.subtasks, self.train, self.val = list(subtasks), train, val
        self.collate, self.loader, self.seed, self.length = collate, loader, seed, length

    def train_dataloader(self) -> DataLoader:
        """Mixed or homogeneous multi-task batches."""
        parts = [_Tagged(self.train[t], i) for i, t in enumerate(self.subtasks)]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        lengths = None
        if self.loader.length_grouping and self.length is not None:
            lengths = [[self.length(self.train[t][i]) for i in range(len(self.train[t]))] for t in self.subtasks]
        weights = self.loader.weights_of(self.subtasks)
        sampler = MultiTaskBatchSampler([len(p) for p in parts], self.loader, self.seed, rank, world, lengths,
                                        weights=weights)
        return _ResumableLoader(ConcatDataset(parts), batch_sampler=sampler, collate_fn=self.collate,
                                num_workers=self.loader.num_workers, progress=self._progress)

    def _progress(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 0
        progress: Any = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return self.trainer.current_epoch, progress.processed

    def val_dataloader(self) -> list[DataLoader]:
        """One sequential loader per subtask (sharded across ranks under DDP; metrics sync when computed)."""
        loaders = []
        for i, t in enumerate(self.subtasks):
            data = _Tagged(self.val[t], i)
            sampler: DistributedSampler | None = None
            if self.trainer is not None and self.trainer.world_size > 1:
                # Pads the last shard with repeats so every rank gets the same number of batches.
                sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            loaders.append(DataLoader(data, batch_size=self.loader.eval_batch_size, sampler=sampler,
                                      collate_fn=self.collate, num_workers=self.loader.num_workers))
        return loaders

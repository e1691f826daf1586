"""Multi-task batching shared by every task: a task sampler over per-subtask datasets, and one datamodule.

Lightning's ``CombinedLoader`` cycles or zips whole loaders; the samplers multi-task papers use (proportional,
temperature-scaled, round-robin) and per-example task mixing are not in any library we depend on, so they live here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from .errors import ConfigError, DataError


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How training batches are drawn from the subtasks."""

    batch_size: int = 32
    """Training examples per batch (per device)."""
    eval_batch_size: int = 64
    """Evaluation examples per batch."""
    sampler: Literal["proportional", "temperature", "round_robin"] = "proportional"
    """Task sampler: by dataset size, by size^(1/temperature), or cycling through the subtasks."""
    temperature: float = 2.0
    """Temperature of the ``temperature`` sampler (1 = proportional, large = uniform)."""
    batch_mode: Literal["mixed", "homogeneous"] = "mixed"
    """``mixed``: the task is drawn per example (a batch mixes tasks); ``homogeneous``: one task per batch."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError("train.batch_size and train.eval_batch_size must be > 0")
        if self.temperature <= 0:
            raise ConfigError("train.temperature must be > 0")


def task_probabilities(sizes: Sequence[int], sampler: str, temperature: float) -> torch.Tensor:
    """Probability of drawing each task: proportional (n_t), temperature (n_t^(1/T)) or uniform (round robin)."""
    n = torch.tensor(sizes, dtype=torch.float64)
    if sampler == "proportional":
        weights = n
    elif sampler == "temperature":
        weights = n ** (1.0 / temperature)
    else:
        weights = torch.ones_like(n)
    return weights / weights.sum()


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Yields batches of indices into the concatenation of the per-task datasets.

    One epoch is ``sum(sizes) // (batch_size · world_size)`` batches (at least one). Each task's examples are visited
    in a fresh random order and reshuffled when exhausted, so small tasks are revisited rather than truncating the
    epoch. Under DDP the stream is drawn in global batches of ``batch_size · world_size`` and each rank takes its
    slice, so N processes see exactly the examples one process with an N-times larger batch would. ``skip`` (set
    when resuming mid-epoch) drops the first batches of the next epoch's stream.
    """

    def __init__(self, sizes: Sequence[int], cfg: LoaderConfig, seed: int, rank: int = 0, world_size: int = 1):
        if not sizes or min(sizes) <= 0:
            raise DataError(f"every subtask needs training examples, got sizes {list(sizes)}")
        self.sizes, self.cfg, self.seed = list(sizes), cfg, seed
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
        probs = task_probabilities(self.sizes, self.cfg.sampler, self.cfg.temperature)
        orders = [torch.randperm(n, generator=gen).tolist() for n in self.sizes]
        cursors = [0] * len(self.sizes)
        bs, n_tasks = self.cfg.batch_size * self.world_size, len(self.sizes)
        skip, self.skip = self.skip, 0
        for b in range(len(self)):
            if self.cfg.batch_mode == "homogeneous":
                if self.cfg.sampler == "round_robin":
                    task = b % n_tasks
                else:
                    task = int(torch.multinomial(probs, 1, generator=gen))
                picks = [task] * bs
            elif self.cfg.sampler == "round_robin":
                picks = [(b * bs + i) % n_tasks for i in range(bs)]
            else:
                picks = torch.multinomial(probs, bs, replacement=True, generator=gen).tolist()
            batch = []
            for t in picks:
                if cursors[t] == self.sizes[t]:
                    orders[t], cursors[t] = torch.randperm(self.sizes[t], generator=gen).tolist(), 0
                batch.append(self.offsets[t] + orders[t][cursors[t]])
                cursors[t] += 1
            if b >= skip:
                yield batch[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]


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
    """

    def __init__(
        self,
        subtasks: Sequence[str],
        train: Mapping[str, Any],
        val: Mapping[str, Any],
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        loader: LoaderConfig,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.subtasks, self.train, self.val = list(subtasks), train, val
        self.collate, self.loader, self.seed = collate, loader, seed

    def train_dataloader(self) -> DataLoader:
        """Mixed or homogeneous multi-task batches."""
        parts = [_Tagged(self.train[t], i) for i, t in enumerate(self.subtasks)]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = MultiTaskBatchSampler([len(p) for p in parts], self.loader, self.seed, rank, world)
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

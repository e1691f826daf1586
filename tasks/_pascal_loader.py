"""The PASCAL-Context datamodule (for pascal.py): whole-image training batches, one evaluation loader per subtask.

Apart from pascal.py because it subclasses a Lightning datamodule: the task module imports it from ``datamodule()``,
so importing the task (``mtbench ls tasks``) does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from mtbench.data import LoaderConfig, MultiTaskDataModule

from ._pascal_data import PascalMT


class AllTasksDataModule(MultiTaskDataModule):
    """Training batches of whole images (each carries every subtask): a seeded shuffle per epoch, split across
    ranks, incomplete last batch dropped; evaluation as in :class:`MultiTaskDataModule` (one loader per subtask)."""

    def __init__(self, subtasks: Sequence[str], train: PascalMT, val: Mapping[str, Any], collate: Any,
                 loader: LoaderConfig, seed: int) -> None:
        super().__init__(subtasks, {}, val, collate, loader, seed)
        self.train_set = train

    def train_dataloader(self) -> DataLoader:
        """Shuffled whole-image batches."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler: DistributedSampler[int] = DistributedSampler(self.train_set, num_replicas=world, rank=rank,
                                                              shuffle=True, seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.loader.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=self.collate, num_workers=self.loader.num_workers)

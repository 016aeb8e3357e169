"""Reproducible, resumable, shardable data order for training.

`EpochSampler` yields `(epoch, index)` pairs: a permutation seeded by (seed, epoch), split into
global batches and sharded over data-parallel ranks, starting at any batch. `SeededItems` seeds the
random generators from (seed, epoch, index) before loading an item, so augmentation does not depend
on which worker loads it or on what ran before. Together they make `--resume` continue mid-epoch
exactly where a run stopped, with any number of loader workers.
"""

from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """Seeded per-epoch permutation, sharded over ranks, resumable at a batch boundary.

    Args:
        num_items: dataset length.
        batch_size: items per batch on each rank.
        seed: base seed; epoch e uses the permutation of seed (seed, e).
        shuffle: permute (training) or keep the dataset order.
        rank, world_size: data-parallel position; rank r takes the r-th slice of every global batch.
    Incomplete global batches are dropped (training semantics).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"{num_items} items cannot fill one batch of {batch_size} x {world_size} rank(s): "
                "lower --batchSize or add data"
            )
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches):
            first = b * global_batch + self.rank * self.batch_size
            for index in order[first:first + self.batch_size]:
                yield self.epoch, index


class SeededItems(Dataset):
    """Wraps a dataset so item (epoch, i) is loaded under RNG seeds derived from (seed, epoch, i).

    The caller's generator states are restored afterwards, so loading in the main process
    (workers=0) does not disturb the training loop's random stream.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(item_seed)
        np.random.seed(item_seed % 2**32)
        torch.manual_seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave Ctrl-C / SIGTERM to the main process.

    A terminal's Ctrl-C (and `timeout`, and most schedulers) signal the whole process group; a worker
    that died of it would take the training step down with it before the main process could finish
    the step and save its checkpoint. The main process shuts the workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

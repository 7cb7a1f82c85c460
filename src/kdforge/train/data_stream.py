"""A deterministic, resumable stream of micro-batches over a KDDataset.

The order is a fresh seeded permutation each epoch. The stream's position is two integers
(epoch, index into that epoch's permutation), saved in every checkpoint; restoring it continues
with the very next example: nothing trained twice, nothing skipped. Under torchrun each rank
takes every world-th micro-batch of the same global order, so the global batch is the same
whatever the world size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from kdforge.data.dataset import KDDataset, collate, pack_rows
from kdforge.errors import DataError, UsageError


class DataStream:
    def __init__(self, dataset: KDDataset, micro_batch_size: int, seed: int = 0, *,
                 packing: bool = False, max_epochs: float | None = None, name: str = "train"):
        if len(dataset) == 0:
            raise DataError("no usable examples in the training data: add records (any accepted format) "
                            "or check the file with kdforge data validate")
        self.ds = dataset
        self.mbs = micro_batch_size
        self.seed = seed
        self.packing = packing
        self.name = name
        self.epoch = 0
        self.index = 0
        self.max_examples = None if max_epochs is None else math.ceil(max_epochs * len(dataset))
        self.consumed = 0  # examples drawn in total (across epochs), for max_epochs
        self._perm = self._permutation(0)
        self.pad_id = dataset.tokenizer.pad_token_id

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.ds), generator=g).tolist()

    # ------------------------------------------------------------------ position
    def position(self) -> dict:
        return {"name": self.name, "epoch": self.epoch, "index": self.index, "consumed": self.consumed,
                "size": len(self.ds)}

    def restore(self, pos: dict) -> None:
        if pos.get("size") not in (None, len(self.ds)):
            raise UsageError(f"the data changed since the checkpoint: {pos['size']} examples then, "
                             f"{len(self.ds)} now; resume with the same data or start a new --output-dir")
        self.epoch, self.index = int(pos["epoch"]), int(pos["index"])
        self.consumed = int(pos.get("consumed", self.epoch * len(self.ds) + self.index))
        self._perm = self._permutation(self.epoch)

    @property
    def epoch_float(self) -> float:
        return self.consumed / len(self.ds)

    def exhausted(self) -> bool:
        return self.max_examples is not None and self.consumed >= self.max_examples

    def _peek(self) -> int:
        if self.index >= len(self._perm):
            self.epoch += 1
            self.index = 0
            self._perm = self._permutation(self.epoch)
        return self._perm[self.index]

    def _advance(self) -> None:
        self.index += 1
        self.consumed += 1

    # ------------------------------------------------------------------ batches
    def next_micro_batch(self, seq_len: int) -> tuple[dict, int] | None:
        """(batch, n_examples), or None when the stream is exhausted.

        Padded: `micro_batch_size` examples. Packed: examples back to back into
        `micro_batch_size` rows of `seq_len` tokens.
        """
        if self.exhausted():
            return None
        items = []
        if not self.packing:
            while len(items) < self.mbs and not self.exhausted():
                items.append(self.ds.item(self._peek(), seq_len))
                self._advance()
            return collate(items, self.pad_id), len(items)
        lengths: list[int] = []
        while not self.exhausted():
            x = self.ds.item(self._peek(), seq_len)
            if not _fits(lengths, len(x["input_ids"]), seq_len, self.mbs):
                break  # it would open a row past micro_batch_size: it starts the next micro-batch
            lengths.append(len(x["input_ids"]))
            items.append(x)
            self._advance()
        return collate(items, self.pad_id, packed_len=seq_len), len(items)

    def micro_batches_per_epoch(self, seq_len: int) -> int:
        """Packed micro-batches of `seq_len` in the first epoch, counted as `next_micro_batch` packs
        them (from the examples' lengths alone: nothing is read)."""
        import numpy as np

        lengths = np.minimum(self.ds.lengths, seq_len)[self._permutation(0)].tolist()
        count, current = 0, []
        for n in lengths:
            if not _fits(current, n, seq_len, self.mbs):
                count, current = count + 1, []
            current.append(n)
        return count + bool(current)


def _fits(lengths: list[int], n: int, seq_len: int, rows: int) -> bool:
    """Whether an example of n tokens packs beside `lengths` into at most `rows` rows of seq_len."""
    return len(pack_rows([*lengths, n], seq_len)) <= rows


def curriculum(seq_lengths: list[int], total_steps: int | None) -> Callable[[int], int]:
    """Sequence length for a global step: the stages split the run into equal parts, short first.
    An open-ended run (total None) uses the longest."""
    def at(step: int) -> int:
        if not total_steps or len(seq_lengths) == 1:
            return seq_lengths[-1]
        return seq_lengths[min(len(seq_lengths) - 1, step * len(seq_lengths) // total_steps)]
    return at


def check_fingerprint(saved: list[dict], now: list[dict], checkpoint: str | Path) -> None:
    """Raise UsageError naming the first data file that differs from the checkpoint's. `saved`
    empty (a checkpoint from before fingerprints): nothing to compare, the size check remains."""
    if not saved:
        return
    if len(saved) != len(now):
        raise UsageError(f"the data changed since the checkpoint {checkpoint}: {len(saved)} training file(s) "
                         f"then ({', '.join(s['file'] for s in saved)}), {len(now)} now; resume with the same "
                         "io.train_shards or start a new --output-dir")
    for then, cur in zip(saved, now):
        if (then["size"], then["sha256"]) != (cur["size"], cur["sha256"]):
            raise UsageError(f"{cur['file']}: the data changed since the checkpoint {checkpoint} "
                             f"({then['size']} bytes, sha256 {then['sha256'][:12]}... then; {cur['size']} bytes, "
                             f"sha256 {cur['sha256'][:12]}... now): put the original file back to resume, "
                             "or start a new --output-dir to train on the new data")

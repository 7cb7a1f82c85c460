"""A running batch: left-padded sequences sharing one KV cache.

Layout: row i of `mask` is 0 over its left padding and 1 over its real tokens; the cache holds
(B, heads, T, head_dim) keys/values for the same T columns. Rotary position is baked into the
cached keys, so padding columns can be added on the left (`merge`) or dropped when every row
pads there (`select`) without changing any row's result: they are masked out of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # (B, T) long: 1 real token, 0 left padding
    pos: torch.Tensor  # (B,) long: position id of each row's next input token
    logits: torch.Tensor  # (B, V) fp32: logits for each row's next token (not yet sampled)

    @property
    def size(self) -> int:
        return self.mask.shape[0]


def reshapable(cache: DynamicCache) -> bool:
    """True when every layer is a plain full-attention layer whose tensors we may re-pad.
    (Sliding-window or linear-attention layers keep other state: such models only batch
    requests that start together.)"""
    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def merge(a: KVBatch, b: KVBatch) -> KVBatch:
    """Rows of `a` then rows of `b`, the shorter side padded on the left."""
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    t = max(ta, tb)

    def pad_kv(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, H, T, D): pad T on the left
        return F.pad(x, (0, 0, n, 0)) if n else x

    layers = [
        (torch.cat([pad_kv(ka, t - ta), pad_kv(kb, t - tb)]), torch.cat([pad_kv(va, t - ta), pad_kv(vb, t - tb)]))
        for (ka, va), (kb, vb) in zip(_kv(a.cache), _kv(b.cache))
    ]
    mask = torch.cat([F.pad(a.mask, (t - ta, 0)), F.pad(b.mask, (t - tb, 0))])
    return KVBatch(DynamicCache(ddp_cache_data=layers), mask, torch.cat([a.pos, b.pos]),
                   torch.cat([a.logits, b.logits]))


def select(batch: KVBatch, rows: list[int]) -> KVBatch:
    """Keep only `rows`; drop leading columns that are padding in every kept row."""
    idx = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    if not reshapable(batch.cache):  # keep every column; let the cache select its own rows
        batch.cache.batch_select_indices(idx)
        return KVBatch(batch.cache, mask, batch.pos.index_select(0, idx), batch.logits.index_select(0, idx))
    first = int(mask.any(dim=0).long().argmax())  # first column some row uses
    layers = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
              for k, v in _kv(batch.cache)]
    return KVBatch(DynamicCache(ddp_cache_data=layers), mask[:, first:], batch.pos.index_select(0, idx),
                   batch.logits.index_select(0, idx))

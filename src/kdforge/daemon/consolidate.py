"""Consolidation: merge the LoRA adapter into the base weights and write a new base folder.

`merge_into_folder` folds the adapter into the base (PEFT `merge_and_unload`) and writes the
merged model whole or not at all (temp folder, then rename). The caller then builds a fresh
adapter on the new base and checks with `same_outputs` that base + fresh adapter (whose B
matrices start at zero) gives the logits the old base + trained adapter gave: only then does a
checkpoint name the new base, and until then the previous base stays untouched on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from kdforge.atomic import fsync_dir
from kdforge.daemon.batch_state import BatchState
from kdforge.train.checkpoint import fsync_tree, read_state

REL_TOL = 1e-4  # max |logit difference| allowed, relative to the largest |logit| (at least 1)


def probe_ids(vocab_size: int, device, n: int = 2, length: int = 32) -> torch.Tensor:
    """A fixed batch of token ids to compare models on."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (n, length), generator=g).to(device)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was_training)
    return out


def same_outputs(ref: torch.Tensor, got: torch.Tensor) -> tuple[bool, float]:
    diff = float((got - ref).abs().max())
    return diff <= REL_TOL * max(1.0, float(ref.abs().max())), diff


def merge_into_folder(peft_model, out: Path, tokenizer) -> Path:
    """Merge the adapter into the base in memory and save the merged model to `out`.
    The PEFT wrapper is unusable afterwards; the caller rebuilds its model from `out`."""
    merged = peft_model.merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():  # left by a consolidation cut short before any checkpoint named it
        shutil.rmtree(out)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prune_bases(bases: Path, keep: set[str], holders: list[Path]) -> list[Path]:
    """Delete consolidated bases (bases/gen-*) that no folder in `holders` (checkpoints,
    snapshots) names as its base and that are not in `keep`. A base outside `bases/` (the
    user's own model) is never touched."""
    if not bases.is_dir():
        return []
    used = set(keep)
    for folder in holders:
        try:
            used.add(str(BatchState.from_extra(read_state(folder).extra).base_model))
        except (OSError, ValueError):
            continue
    gone = []
    for d in bases.iterdir():
        if d.is_dir() and d.name.startswith(("gen-", ".tmp-gen-")) and str(d) not in used:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone

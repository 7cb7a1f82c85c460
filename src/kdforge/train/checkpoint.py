"""Checkpoints that appear whole or not at all: writing, loading, rotation, FSDP, the dir lock.

What a checkpoint folder is called and holds (`checkpoint-{global_step}/`, Trainer's file names,
`TrainState`, list/latest/complete) is `kdforge/checkpoint_layout.py`, which needs no torch. A checkpoint
is written into a hidden temp folder beside it, each file fsynced, then renamed into place: a crash
mid-save leaves only a `.tmp-*` folder, which `latest_checkpoint` ignores and the next save removes
(unlike Trainer, transformers #35782). Re-saving a step moves the old folder aside as
`.replaced-checkpoint-N-*`, which still counts as step N until the new one is in place; a crash
between the two renames is undone on the next start. `OutputDirLock` keeps a second run off a dir
a first one is writing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from kdforge.atomic import fsync_dir

# The names and the read-only side (list, latest, complete, TrainState) live in checkpoint_layout,
# which needs no torch; they are re-exported here for the writers' callers (`ckpt.latest_checkpoint`).
from kdforge.checkpoint_layout import (ADAPTER_WEIGHTS, CKPT_RE, CONFIG, LOCK, MODEL_WEIGHTS,  # noqa: F401
                                       OPTIMIZER, REPLACED_GLOB, REQUIRED, RNG, SCHEDULER, STALE_GLOBS, STATE,
                                       TMP_GLOB, WEIGHT_FILES, TrainState, checkpoint_folders, checkpoint_name,
                                       checkpoint_step, is_complete, latest_checkpoint, list_checkpoints,
                                       missing_files, read_state, replaced_name, replaced_step, temp_name,
                                       trash_name)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def is_peft(model) -> bool:
    return hasattr(_unwrap(model), "peft_config")


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then `path` itself, so a folder written in place (a checkpoint's
    temp folder, a merged base, a snapshot) is on disk before it is renamed into view. Only `path`'s
    own directory is synced, not its subfolders'."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save_checkpoint(output_dir: str | Path, state: TrainState, model, optimizer, scheduler,
                    tokenizer=None, config: dict | None = None, total_limit: int | None = None,
                    model_state_dict: dict | None = None, optimizer_state_dict: dict | None = None) -> Path:
    """Write checkpoint-{global_step} atomically, then keep the newest `total_limit`.

    `config` is written as kdforge.yaml (pass the resolved config). `model_state_dict` /
    `optimizer_state_dict` (full, on CPU) replace the modules' own where the caller gathered
    them from shards (FSDP, `gather_full_state`). Returns the final folder.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / checkpoint_name(state.global_step)
    tmp = out / temp_name(state.global_step, f"{os.getpid()}-{int(time.time() * 1000)}")
    tmp.mkdir()
    try:
        m = _unwrap(model)
        if is_peft(m):
            m.save_pretrained(str(tmp), safe_serialization=True)
        else:
            m.save_pretrained(str(tmp), safe_serialization=True, state_dict=model_state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer_state_dict or optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        torch.save(rng_state(), tmp / RNG)
        if config is not None:
            import yaml
            (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / STATE).write_text(json.dumps(state.to_json(), indent=2, default=str))
        fsync_tree(tmp)
        if final.exists():
            # Re-saving a step (a resume, a daemon consolidation). The old folder moves to a name
            # that list_checkpoints still counts as step N, and cleanup_partial puts it back if we
            # die before the new one is in place: there is never a moment without checkpoint N.
            old = out / replaced_name(state.global_step, f"{os.getpid()}-{int(time.time() * 1000)}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cleanup_partial(out, keep_pid=os.getpid())
    if total_limit:
        rotate_checkpoints(out, total_limit)
    return final


def cleanup_partial(output_dir: Path, keep_pid: int | None = None) -> None:
    """Remove temp folders left by a crash mid-save (never a complete checkpoint), and put back a
    re-saved step's previous folder whose replacement never arrived. Call it holding the dir
    (OutputDirLock, the daemon's lock): another writer's `.tmp-*` is in progress, not torn."""
    out = Path(output_dir)
    for p in out.glob(TMP_GLOB):
        if keep_pid is not None and f"-{keep_pid}-" in p.name:
            continue
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(out.glob(REPLACED_GLOB)):
        step = replaced_step(p)
        final = out / checkpoint_name(step) if step is not None else None
        if final is not None and not final.exists() and is_complete(p):
            os.replace(p, final)  # died between the renames of a re-save: the old one stands
            fsync_dir(out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in [p for pattern in STALE_GLOBS for p in out.glob(pattern)]:
        shutil.rmtree(p, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints. Returns the deleted ones."""
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[:-keep] if keep > 0 else []
    for p in doomed:
        step = checkpoint_step(p) if checkpoint_step(p) is not None else replaced_step(p)
        trash = p.with_name(trash_name(step, str(os.getpid())))
        os.replace(p, trash)  # rename first: a crash mid-delete never leaves a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def load_weights(path: str | Path, model) -> None:
    """Load a checkpoint's weights into `model` (full or LoRA adapter), strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    m = _unwrap(model)
    if is_peft(m):
        from peft import set_peft_model_state_dict

        sd = load_file(str(path / ADAPTER_WEIGHTS))
        res = set_peft_model_state_dict(m, sd)
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter keys do not match the model: {res.unexpected_keys[:5]}")
        return
    if not (path / MODEL_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} has no {MODEL_WEIGHTS} (a LoRA checkpoint needs model.lora set)")
    sd = load_file(str(path / MODEL_WEIGHTS))
    if not sd.keys() <= m.state_dict().keys():
        # save_pretrained writes some families in their original layout (transformers 5: Mixtral's
        # experts one tensor each, fused in the module); its own loader converts them back.
        sd = type(m).from_pretrained(str(path), config=m.config, dtype=next(m.parameters()).dtype,
                                   trust_remote_code=False).state_dict()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    # Tied embeddings are saved once; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None,
                    restore_rng: bool = True, sharded=None) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return its TrainState.

    `sharded`: the FSDP-wrapped module that holds `model` as `.lm`; every rank then reads the
    full files and keeps its own shards (what `gather_full_state` wrote)."""
    path = Path(path)
    if sharded is not None:
        _load_into_shards(path, sharded, optimizer)
    else:
        load_weights(path, model)
        if optimizer is not None:
            optimizer.load_state_dict(_torch_load(path / OPTIMIZER))
    if scheduler is not None:
        scheduler.load_state_dict(_torch_load(path / SCHEDULER))
    if restore_rng and (path / RNG).is_file():
        set_rng_state(_torch_load(path / RNG))
    return read_state(path)


# ============================================================================ FSDP
# The objective module holds the student as `.lm`; checkpoints hold the student's own keys.

def gather_full_state(sharded, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts gathered from FSDP shards, on CPU, for
    `save_checkpoint`. A collective: every rank calls it (only rank 0 needs the result)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(sharded, options=opts)
    osd = get_optimizer_state_dict(sharded, optimizer, options=opts)
    return {k.removeprefix("lm."): v for k, v in sd.items()}, osd


def _load_into_shards(path: Path, sharded, optimizer) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    sd = {f"lm.{k}": v for k, v in load_file(str(path / MODEL_WEIGHTS)).items()}
    set_model_state_dict(sharded, sd, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(sharded, optimizer, _torch_load(path / OPTIMIZER), options=opts)


# ============================================================================ one writer per dir

class OutputDirLock:
    """An exclusive flock on OUTPUT_DIR/.kdforge-train.lock for the life of the run. A second run
    on the same dir would take the first's in-progress `.tmp-*` save for a torn one and delete
    it. The kernel drops the lock when its holder dies (even by SIGKILL): no stale locks."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        import fcntl

        from kdforge.errors import UsageError

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.dir} is in use by another kdforge train (pid {holder}): wait for it "
                             "to finish or stop it (it saves on SIGTERM), or give another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

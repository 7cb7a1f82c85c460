"""Checkpoints that appear whole or not at all.

`OUTPUT_DIR/checkpoint-{global_step}/` holds the weights (`model.safetensors` + `config.json`, or
`adapter_model.safetensors` + `adapter_config.json` for LoRA), `optimizer.pt`, `scheduler.pt`,
`rng_state.pth`, `trainer_state.json`, the tokenizer and the resolved config (`kdforge.yaml`). The
names are Hugging Face Trainer's. A checkpoint is written into a hidden temp folder beside it, each
file fsynced, then renamed into place: a crash mid-save leaves only a `.tmp-*` folder, which
`latest_checkpoint` ignores and the next save removes (unlike Trainer, transformers #35782).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.atomic import fsync_dir

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
REQUIRED = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


@dataclass
class TrainState:
    """Everything about progress that is not a tensor. Saved as trainer_state.json."""

    global_step: int = 0
    epoch: float = 0.0
    samples_seen: int = 0
    tokens_seen: int = 0  # target (label) tokens trained on
    data_position: dict[str, Any] = field(default_factory=dict)  # the data source's resume point
    log_history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # owner-defined (the daemon's batch info)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def checkpoint_step(path: Path) -> int | None:
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint counts only if every required file is there (the rename makes this atomic;
    the check also rejects folders made by hand or by other tools)."""
    path = Path(path)
    return (path.is_dir() and all((path / f).is_file() for f in REQUIRED)
            and any((path / f).is_file() for f in WEIGHT_FILES))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by global step)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in d.iterdir() if checkpoint_step(p) is not None]
    return [p for s, p in sorted(found) if is_complete(p)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


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


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save_checkpoint(output_dir: str | Path, state: TrainState, model, optimizer, scheduler,
                    tokenizer=None, config: dict | None = None, total_limit: int | None = None,
                    model_state_dict: dict | None = None, optimizer_state_dict: dict | None = None) -> Path:
    """Write checkpoint-{global_step} atomically, then keep the newest `total_limit`.

    `model_state_dict` / `optimizer_state_dict` (full, on CPU) replace the modules' own where the
    caller gathered them from shards (FSDP). Returns the final folder.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{state.global_step}"
    tmp = out / f".tmp-checkpoint-{state.global_step}-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        m = _unwrap(model)
        if is_peft(m):
            m.save_pretrained(str(tmp), safe_serialization=True)
        else:
            m.save_pretrained(str(tmp), safe_serialization=True, state_dict=model_state_dict)
            if getattr(m.config, "architectures", None) in (None, ["StudentLM"]):
                m.config.architectures = ["LlamaForCausalLM"]
                m.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer_state_dict or optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pth")
        if config is not None:
            import yaml
            (tmp / "kdforge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "trainer_state.json").write_text(json.dumps(state.to_json(), indent=2, default=str))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): swap atomically
            old = out / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
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
    """Remove temp folders left by a crash mid-save (never a complete checkpoint)."""
    for p in Path(output_dir).glob(".tmp-checkpoint-*"):
        if keep_pid is not None and f"-{keep_pid}-" in p.name:
            continue
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(output_dir).glob(".old-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints. Returns the deleted ones."""
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[:-keep] if keep > 0 else []
    for p in doomed:
        trash = p.with_name(f".old-{p.name}-{os.getpid()}")
        os.replace(p, trash)  # rename first: a crash mid-delete never leaves a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def read_state(path: str | Path) -> TrainState:
    return TrainState.from_json(json.loads((Path(path) / "trainer_state.json").read_text()))


def load_weights(path: str | Path, model) -> None:
    """Load a checkpoint's weights into `model` (full or LoRA adapter), strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    m = _unwrap(model)
    if is_peft(m):
        from peft import set_peft_model_state_dict

        sd = load_file(str(path / "adapter_model.safetensors"))
        res = set_peft_model_state_dict(m, sd)
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter keys do not match the model: {res.unexpected_keys[:5]}")
        return
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (a LoRA checkpoint needs model.lora set)")
    sd = load_file(str(path / "model.safetensors"))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    # Tied embeddings are saved once; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return its TrainState."""
    path = Path(path)
    load_weights(path, model)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng and (path / "rng_state.pth").is_file():
        set_rng_state(torch.load(path / "rng_state.pth", map_location="cpu", weights_only=True))
    return read_state(path)

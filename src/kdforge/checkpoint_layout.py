"""What a checkpoint folder is called and what it holds: names, not I/O, and no torch.

`OUTPUT_DIR/checkpoint-{global_step}/` holds the weights (`model.safetensors` + `config.json`, or
`adapter_model.safetensors` + `adapter_config.json` for LoRA), `optimizer.pt`, `scheduler.pt`,
`rng_state.pth`, `trainer_state.json`, the tokenizer and the resolved config (`kdforge.yaml`). The
names are Hugging Face Trainer's. Beside the checkpoints live the hidden folders of a save in
progress (`.tmp-checkpoint-N-*`), of a step being re-saved (`.replaced-checkpoint-N-*`, which still
counts as step N) and of a rotation (`.trash-checkpoint-N-*`).

Every file and folder name in an output dir is spelt here, and only here: `train/checkpoint.py`
writes and loads them (with torch); the daemon, `kdforge verify`, the model-folder resolver
(`model/folder.py`, which serve and eval use) and the bench read them through this module. It sits
at the package root, beside `atomic.py` and `errors.py`, because `model/` reads it and `train/`
builds on `model/`: nothing imports upward. It imports neither torch nor anything that does, so
that `kdforge verify` starts without it (tests/test_checkpoint_layout.py keeps it so).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
REPLACED_RE = re.compile(r"^\.replaced-checkpoint-(\d+)-")  # the previous save of a step being re-saved
MODEL_WEIGHTS, ADAPTER_WEIGHTS = "model.safetensors", "adapter_model.safetensors"
WEIGHT_FILES = (MODEL_WEIGHTS, ADAPTER_WEIGHTS)
OPTIMIZER, SCHEDULER, RNG, STATE = "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"
CONFIG = "kdforge.yaml"  # the resolved config: every default filled in
LOCK = ".kdforge-train.lock"
REQUIRED = (OPTIMIZER, SCHEDULER, STATE)  # besides one of WEIGHT_FILES
# Globs of the hidden folders cleanup_partial removes or puts back. `.old-` is an older release's
# name for `.replaced-`: still swept.
TMP_GLOB, REPLACED_GLOB = ".tmp-checkpoint-*", ".replaced-checkpoint-*"
STALE_GLOBS = (".old-checkpoint-*", ".trash-checkpoint-*")


@dataclass
class TrainState:
    """Everything about progress that is not a tensor. Saved as trainer_state.json."""

    global_step: int = 0
    epoch: float = 0.0
    samples_seen: int = 0
    tokens_seen: int = 0  # target (label) tokens trained on
    data_position: dict[str, Any] = field(default_factory=dict)  # the data source's resume point
    log_history: list[dict[str, Any]] = field(default_factory=list)
    # [{file, size, sha256}] of the training data; empty in checkpoints made before it existed
    data_fingerprint: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # owner-defined (the daemon's batch info)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# ============================================================================ names

def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step`: `checkpoint-{step}`."""
    return f"checkpoint-{step}"


def temp_name(step: int, tag: str) -> str:
    """The hidden folder a checkpoint of `step` is written into before its rename; `tag` tells
    writers apart (pid and time for a save, `restore` for the daemon's rollback)."""
    return f".tmp-{checkpoint_name(step)}-{tag}"


def replaced_name(step: int, tag: str) -> str:
    """Where the previous save of `step` waits while the step is re-saved (counts as step N)."""
    return f".replaced-{checkpoint_name(step)}-{tag}"


def trash_name(step: int, tag: str) -> str:
    """Where a rotated-out checkpoint goes before its deletion (never a half checkpoint in view)."""
    return f".trash-{checkpoint_name(step)}-{tag}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `checkpoint-N` folder name; None for any other name."""
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def replaced_step(path: str | Path) -> int | None:
    """The step of a `.replaced-checkpoint-N-*` folder name; None for any other name."""
    m = REPLACED_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# ============================================================================ what a folder holds

def missing_files(path: str | Path) -> list[str]:
    """The files a complete checkpoint has and `path` lacks: the weights first (`model.safetensors
    or adapter_model.safetensors`), then each of REQUIRED. Empty for a complete checkpoint."""
    path = Path(path)
    lacks = [f for f in REQUIRED if not (path / f).is_file()]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        lacks.insert(0, " or ".join(WEIGHT_FILES))
    return lacks


def is_complete(path: str | Path) -> bool:
    """A checkpoint counts only if every required file is there (the rename makes this atomic;
    the check also rejects folders made by hand or by other tools)."""
    return Path(path).is_dir() and not missing_files(path)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder in `output_dir`, complete or not, by step (for readers that
    report on them: `kdforge verify`, a model-folder hint)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = ((checkpoint_step(p), p) for p in d.iterdir() if p.is_dir())
    return [p for _, p in sorted((step, p) for step, p in found if step is not None)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by global step). A step being re-saved counts through
    its moved-aside folder while `checkpoint-N` is absent, so no reader ever sees it missing."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = {}
    for p in sorted(d.iterdir()):
        step = checkpoint_step(p)
        if step is not None and is_complete(p):
            found[step] = p
    for p in sorted(d.iterdir()):
        step = replaced_step(p)
        if step is not None and step not in found and is_complete(p):
            found[step] = p
    return [found[s] for s in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def read_state(path: str | Path) -> TrainState:
    """The TrainState a checkpoint folder saved (its trainer_state.json)."""
    return TrainState.from_json(json.loads((Path(path) / STATE).read_text()))

"""What a model folder holds and where its parts come from, read from its JSON alone (no torch), so a
wrong folder fails at once. One resolver for `kdforge serve` (serve/loader.py) and `kdforge eval`
(eval/model_dir.py).

A folder is
- a full model: `config.json` + weights (`kdforge init-model` output, a full-training
  `checkpoint-N/`, a daemon checkpoint of a full-training daemon, any local Hugging Face causal LM);
- a LoRA checkpoint: `adapter_config.json` + `adapter_model.safetensors`. Its base is, first, the one
  a daemon checkpoint names in `trainer_state.json` (`extra["daemon"]["base_model"]`, or the flat
  `extra["base_model"]` of older checkpoints: after a consolidation the daemon trains on a merged base
  that the adapter's own config does not know), else the adapter's `base_model_name_or_path`; a
  relative name is looked up as given, beside the checkpoint and in the daemon's BASE
  (BASE/current_model/checkpoint-N -> BASE). `base=` (eval's --base) replaces both.
The tokenizer comes from the adapter or the folder when it holds one (kdforge checkpoints do), else
from the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import UsageError
from kdforge.checkpoint_layout import STATE, checkpoint_folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
FOLDER_KINDS = ("a model folder (config.json + model.safetensors), a LoRA checkpoint (adapter_config.json + "
                "adapter_model.safetensors) or a daemon checkpoint (BASE/current_model/checkpoint-N)")


@dataclass
class ModelFolder:
    """Where each part of a model comes from."""

    model_dir: Path  # the folder given
    base: Path | str  # the folder with config.json and the full weights (a hub id only with allow_hub)
    adapter: Path | None  # a LoRA adapter to merge onto the base
    tokenizer_dir: Path

    def context_len(self, default: int = 4096) -> int:
        """The model's context (config.json's max_position_embeddings), read without loading it."""
        try:
            cfg = json.loads((Path(self.base) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default
        cfg = cfg.get("text_config") or cfg
        return int(cfg.get("max_position_embeddings") or default)

    def describe(self) -> str:
        return str(self.model_dir) + (f" (LoRA on {self.base})" if self.adapter else "")


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        obj = None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not readable JSON: the {what} is damaged; use another checkpoint-N")
    return obj


def daemon_base(ckpt: Path) -> str | None:
    """The base a daemon checkpoint trained on, or None (not a daemon checkpoint). Read here from
    the JSON, not through `kdforge.daemon.batch_state`: the daemon calls eval and serve, so they
    must not import the daemon."""
    state = ckpt / STATE
    if not state.is_file():
        return None
    extra = _read_json(state, "checkpoint").get("extra") or {}
    daemon = extra.get("daemon") if isinstance(extra.get("daemon"), dict) else extra
    base = daemon.get("base_model") if isinstance(daemon, dict) else None
    return base if isinstance(base, str) and base else None


def _local(name: str, ckpt: Path) -> Path | None:
    """`name` as a model folder: as given, or relative to the checkpoint, or to the daemon's base
    dir (BASE/current_model/checkpoint-N -> BASE), for relative names written by a daemon."""
    for candidate in (Path(name), ckpt / name, ckpt.parent.parent / name):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


def _adapter_base(adapter: Path, base: str | Path | None, allow_hub: bool, base_fix: str) -> Path | str:
    """The base folder of the LoRA checkpoint `adapter` (see the module docstring)."""
    named = _read_json(adapter / "adapter_config.json", "checkpoint").get("base_model_name_or_path")
    named = named if isinstance(named, str) and named else None
    names = [str(base)] if base else [name for name in (daemon_base(adapter), named) if name]
    found = next((path for path in (_local(name, adapter) for name in names) if path is not None), None)
    if found is not None:
        return found
    if allow_hub and named and not base:
        return named  # a hub id: loads only where the network (or HF cache) has it
    tried = ", ".join(names) or "none named"
    raise UsageError(f"MODEL_DIR {adapter} is a LoRA checkpoint but its base model folder was not found "
                     f"(tried: {tried}); {base_fix}")


def resolve_model_folder(model_dir: str | Path, *, base: str | Path | None = None,
                         adapter: str | Path | None = None, allow_hub: bool = False,
                         command: str = "kdforge eval", base_fix: str = "pass the base folder with --base DIR"
                         ) -> ModelFolder:
    """Check `model_dir` (and `adapter`, a PEFT folder to put on it) without loading anything.
    `allow_hub`: an adapter's base that is no local folder is kept as a hub id. Raises UsageError
    naming the folder and the fix (`base_fix` when a LoRA base is missing; `command` in hints)."""
    folder = Path(model_dir)
    adapter_dir = Path(adapter) if adapter else None
    if not folder.is_dir():
        raise UsageError(f"MODEL_DIR {folder} is not a folder; give {FOLDER_KINDS}")
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter_dir} holds no adapter_config.json (a PEFT adapter folder)")
    if (folder / "config.json").is_file():
        model_base: Path | str = folder
    elif (folder / "adapter_config.json").is_file():
        if adapter_dir is not None:
            raise UsageError(f"{folder} is itself an adapter; give its base as MODEL_DIR with --adapter")
        adapter_dir = folder
        model_base = _adapter_base(folder, base, allow_hub, base_fix)
    else:
        checkpoints = checkpoint_folders(folder)
        hint = f"; it holds checkpoints: use one, e.g. `{command} {checkpoints[-1]}`" if checkpoints else ""
        raise UsageError(f"MODEL_DIR {folder} is not a model (no config.json, no adapter_config.json); "
                         f"give {FOLDER_KINDS}{hint}")
    base_dir = Path(model_base) if Path(model_base).is_dir() else None
    tokenizer_dir = next((d for d in (adapter_dir, folder, base_dir) if has_tokenizer(d)), None)
    if tokenizer_dir is None:
        raise UsageError(f"MODEL_DIR {folder} holds no tokenizer (nor does {model_base}): save one beside the "
                         "model (tokenizer.save_pretrained(DIR))")
    return ModelFolder(folder, model_base, adapter_dir, tokenizer_dir)

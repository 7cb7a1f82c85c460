"""What MODEL_DIR is and how to load it: a full model, a LoRA checkpoint, or a daemon checkpoint.

- full: `config.json` + weights (`kdforge init-model` output, a full-training `checkpoint-N/`, a
  daemon checkpoint of a full-training daemon, any local Hugging Face causal LM);
- LoRA: `adapter_config.json` + `adapter_model.safetensors` (a LoRA `checkpoint-N/`); the base is,
  first, the one a daemon checkpoint names in `trainer_state.json` (`extra["daemon"]["base_model"]`,
  or the flat `extra["base_model"]` of older checkpoints: after a consolidation the daemon trains on
  a merged base that the adapter's own config does not know), else the adapter's
  `base_model_name_or_path`, else `base=` given by the caller.
The tokenizer comes from MODEL_DIR when it holds one (kdforge checkpoints do), else from the base.
Resolution reads only JSON (no torch), so a wrong folder fails at once. Adapters are merged at
load: scoring then costs what the plain model costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import UsageError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_WHAT = ("a model folder (config.json + model.safetensors), a LoRA checkpoint (adapter_config.json + "
         "adapter_model.safetensors) or a daemon checkpoint (BASE/current_model/checkpoint-N)")


@dataclass
class ModelSource:
    model_dir: Path
    base: Path  # the folder holding config.json and the full weights
    adapter: Path | None
    tokenizer_dir: Path

    def context_len(self, default: int = 4096) -> int:
        """The model's context (config.json's max_position_embeddings), read without loading it."""
        try:
            cfg = json.loads((self.base / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default
        cfg = cfg.get("text_config") or cfg
        return int(cfg.get("max_position_embeddings") or default)

    def describe(self) -> str:
        return str(self.model_dir) + (f" (LoRA on {self.base})" if self.adapter else "")


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in _TOKENIZER_FILES)


def _daemon_base(ckpt: Path) -> str | None:
    """The base a daemon checkpoint trained on. Read here from the JSON, not through
    `kdforge.daemon.batch_state`: the daemon calls eval, so eval must not import the daemon."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        extra = json.loads(state.read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"{state} is not readable JSON: the checkpoint is damaged; use another checkpoint-N") from None
    daemon = extra.get("daemon") if isinstance(extra.get("daemon"), dict) else extra
    base = daemon.get("base_model")
    return base if isinstance(base, str) and base else None


def _local(name: str, ckpt: Path) -> Path | None:
    """`name` as a model folder: as given, or relative to the checkpoint, or to the daemon's base
    dir (BASE/current_model/checkpoint-N -> BASE), for relative names written by a daemon."""
    for cand in (Path(name), ckpt / name, ckpt.parent.parent / name):
        if (cand / "config.json").is_file():
            return cand.resolve()
    return None


def resolve_model_dir(model_dir: str | Path, base: str | Path | None = None) -> ModelSource:
    """Check MODEL_DIR without loading anything. Raises UsageError naming MODEL_DIR and the fix."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UsageError(f"MODEL_DIR {d} is not a folder; give {_WHAT}")
    if (d / "config.json").is_file():
        src_base, adapter = d, None
    elif (d / "adapter_config.json").is_file():
        adapter = d
        try:
            named = json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            raise UsageError(f"{d}/adapter_config.json is not readable JSON: the checkpoint is damaged") from None
        names = [str(base)] if base else [n for n in (_daemon_base(d), named) if n]
        found = next((p for p in (_local(n, d) for n in names) if p is not None), None)
        if found is None:
            tried = ", ".join(names) or "none named"
            raise UsageError(f"MODEL_DIR {d} is a LoRA checkpoint but its base model folder was not found "
                             f"(tried: {tried}); pass the base folder with --base DIR")
        src_base = found
    else:
        ckpts = sorted((p for p in d.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))
        hint = f"; it holds checkpoints: evaluate one, e.g. {ckpts[-1]}" if ckpts else ""
        raise UsageError(f"MODEL_DIR {d} is not a model (no config.json, no adapter_config.json); "
                         f"give {_WHAT}{hint}")
    tok = next((x for x in (d, src_base) if _has_tokenizer(x)), None)
    if tok is None:
        raise UsageError(f"MODEL_DIR {d} holds no tokenizer (nor does {src_base}): save one beside the model "
                         "(tokenizer.save_pretrained(DIR))")
    return ModelSource(d, src_base, adapter, tok)


def load_tokenizer(src: ModelSource):
    """MODEL_DIR's tokenizer (pad = EOS where it has none, as in training)."""
    from kdforge.data.dataset import load_tokenizer as prepared

    try:
        return prepared(src.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer in {src.tokenizer_dir}: {e}") from None


def load_model(src: ModelSource, device, dtype=None):
    """MODEL_DIR's model in eval mode on `device` (adapter merged). fp32 unless `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps to our own lines
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.base), dtype=dtype or torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the model in {src.base}: {e}; give {_WHAT}") from None
    if src.adapter is not None:
        from kdforge.model.adapters import merged_adapter

        model = merged_adapter(model, str(src.adapter))
    return model.to(device).eval()

"""Load what `kdforge serve` serves: a local Hugging Face causal LM, optionally with a LoRA adapter.

MODEL_DIR may be
- a model folder (`config.json` + weights), e.g. `kdforge init-model` output or a full-training
  `checkpoint-N/` (`model.safetensors` + `config.json`);
- a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), e.g. a LoRA
  `checkpoint-N/`: the base is the one named by `base_model_name_or_path`.
`--adapter DIR` puts a PEFT adapter on top of a model folder. Adapters are merged into the
weights at load time, so serving costs the same as the plain model. The tokenizer comes from
the adapter/checkpoint folder when it holds one (kdforge checkpoints do), else from the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import UsageError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ServedModel:
    model: object  # a transformers PreTrainedModel, eval mode
    tokenizer: object
    name: str  # the model id clients send
    context_len: int  # max prompt + completion tokens
    source: str  # what was loaded, for the ready line and errors


def _has_tokenizer(d: Path | None) -> bool:
    return d is not None and d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES)


def _not_a_model(d: Path) -> UsageError:
    ckpts = sorted(d.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    hint = (f"; it holds checkpoints: serve one, e.g. `kdforge serve {ckpts[-1]}`" if ckpts else
            "; expected config.json + model weights, or adapter_config.json + adapter_model.safetensors")
    return UsageError(f"{d} is not a model folder (no config.json, no adapter_config.json){hint}")


def _resolve_base(adapter_dir: Path) -> str:
    """The base model an adapter names, as a local folder when it is one."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; "
                         f"serve the base folder with `--adapter {adapter_dir}`")
    for cand in (Path(base), adapter_dir / base):
        if (cand / "config.json").is_file():
            return str(cand.resolve())
    return base  # a hub id: loads only where the network (or HF cache) has it


def _dtype(name: str, device: str):
    import torch

    if name == "auto":  # fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


@dataclass
class ModelFolders:
    """Where each part comes from. `base` is a local folder or (rarely) a hub id."""

    model_dir: Path
    base: str
    adapter_dir: Path | None
    tokenizer_dir: Path


def resolve_folders(model_dir: str | Path, adapter: str | Path | None = None) -> ModelFolders:
    """Check the folders without loading anything (cheap: no torch). Raises UsageError with the fix."""
    model_dir = Path(model_dir)
    adapter_dir = Path(adapter) if adapter else None
    if not model_dir.is_dir():
        raise UsageError(f"MODEL_DIR {model_dir} is not a folder")
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter_dir} holds no adapter_config.json (a PEFT adapter folder)")
    if (model_dir / "config.json").is_file():
        base = str(model_dir)
    elif (model_dir / "adapter_config.json").is_file():
        if adapter_dir is not None:
            raise UsageError(f"{model_dir} is itself an adapter; give its base as MODEL_DIR with --adapter")
        base, adapter_dir = _resolve_base(model_dir), model_dir
    else:
        raise _not_a_model(model_dir)
    base_dir = Path(base) if Path(base).is_dir() else None
    tok_dir = next((d for d in (adapter_dir, model_dir, base_dir) if _has_tokenizer(d)), None)
    if tok_dir is None:
        raise UsageError(f"no tokenizer found in {model_dir}" + (f" or {adapter_dir}" if adapter_dir else "")
                         + ": save one beside the model (`tokenizer.save_pretrained(DIR)`)")
    return ModelFolders(model_dir, base, adapter_dir, tok_dir)


def load_served_model(model_dir: str | Path, adapter: str | Path | None = None, *,
                      model_name: str | None = None, device: str = "auto",
                      dtype: str = "auto") -> ServedModel:
    """Load model + tokenizer ready to serve (eval mode, adapter merged). Raises UsageError with
    the fix when a folder is not what it should be."""
    f = resolve_folders(model_dir, adapter)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the server's log to its own lines
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(f.tokenizer_dir), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(f.base, dtype=_dtype(dtype, device), trust_remote_code=False)
    except OSError as e:
        raise UsageError(f"cannot load {f.base}: {e}") from None
    if f.adapter_dir is not None:
        from kdforge.model.adapters import merged_adapter

        model = merged_adapter(model, str(f.adapter_dir))
    model = model.to(device).eval()
    ctx = getattr(model.config, "max_position_embeddings", None) or min(tokenizer.model_max_length, 1 << 20)
    source = str(f.model_dir) + (f" + adapter {f.adapter_dir}" if adapter else "")
    return ServedModel(model, tokenizer, model_name or f.model_dir.resolve().name, int(ctx), source)

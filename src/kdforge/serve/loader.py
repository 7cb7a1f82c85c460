"""Load what `kdforge serve` serves: a local Hugging Face causal LM, optionally with a LoRA adapter.

MODEL_DIR may be
- a model folder (`config.json` + weights), e.g. `kdforge init-model` output or a full-training
  `checkpoint-N/` (`model.safetensors` + `config.json`);
- a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), e.g. a LoRA
  `checkpoint-N/`, a daemon's among them (BASE/current_model/checkpoint-N): the base is the one
  the daemon's trainer_state.json names, else the adapter's `base_model_name_or_path`.
`--adapter DIR` puts a PEFT adapter on top of a model folder. Adapters are merged into the
weights at load time, so serving costs the same as the plain model. The tokenizer comes from
the adapter/checkpoint folder when it holds one (kdforge checkpoints do), else from the base.
Folders are resolved by `kdforge.model.folder`, as `kdforge eval` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import UsageError
from kdforge.model.folder import ModelFolder, resolve_model_folder


@dataclass
class ServedModel:
    model: object  # a transformers PreTrainedModel, eval mode
    tokenizer: object
    name: str  # the model id clients send
    context_len: int  # max prompt + completion tokens
    source: str  # what was loaded, for the ready line and errors


def _dtype(name: str, device: str):
    import torch

    if name == "auto":  # fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def resolve_folders(model_dir: str | Path, adapter: str | Path | None = None) -> ModelFolder:
    """Check the folders without loading anything (cheap: no torch). Raises UsageError with the fix.
    An adapter's base that is no local folder is kept as a hub id."""
    adapter_fix = "serve its base folder as MODEL_DIR with --adapter " + str(model_dir)
    return resolve_model_folder(model_dir, adapter=adapter, allow_hub=True, command="kdforge serve",
                                base_fix=adapter_fix)


def load_served_model(model_dir: str | Path, adapter: str | Path | None = None, *,
                      model_name: str | None = None, device: str = "auto",
                      dtype: str = "auto") -> ServedModel:
    """Load model + tokenizer ready to serve (eval mode, adapter merged). Raises UsageError with
    the fix when a folder is not what it should be."""
    folders = resolve_folders(model_dir, adapter)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the server's log to its own lines
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folders.tokenizer_dir), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(folders.base), dtype=_dtype(dtype, device),
                                                     trust_remote_code=False)
    except OSError as e:
        raise UsageError(f"cannot load {folders.base}: {e}") from None
    if folders.adapter is not None:
        from kdforge.model.adapters import merged_adapter

        model = merged_adapter(model, str(folders.adapter))
    model = model.to(device).eval()
    context = getattr(model.config, "max_position_embeddings", None) or min(tokenizer.model_max_length, 1 << 20)
    source = str(folders.model_dir) + (f" + adapter {folders.adapter}" if adapter else "")
    return ServedModel(model, tokenizer, model_name or folders.model_dir.resolve().name, int(context), source)

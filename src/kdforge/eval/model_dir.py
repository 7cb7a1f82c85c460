"""What MODEL_DIR is and how to load it: a full model, a LoRA checkpoint, or a daemon checkpoint.

The folder is resolved by `kdforge.model.folder` (shared with `kdforge serve`: JSON only, no torch,
so a wrong folder fails at once); this module loads what it names. Adapters are merged at load:
scoring then costs what the plain model costs.
"""

from __future__ import annotations

from pathlib import Path

from kdforge.errors import UsageError
from kdforge.model.folder import FOLDER_KINDS, ModelFolder, resolve_model_folder

ModelSource = ModelFolder  # eval's name for it


def resolve_model_dir(model_dir: str | Path, base: str | Path | None = None) -> ModelSource:
    """Check MODEL_DIR without loading anything. Raises UsageError naming MODEL_DIR and the fix."""
    return resolve_model_folder(model_dir, base=base, command="kdforge eval")


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
        raise UsageError(f"cannot load the model in {src.base}: {e}; give {FOLDER_KINDS}") from None
    if src.adapter is not None:
        from kdforge.model.adapters import merged_adapter

        model = merged_adapter(model, str(src.adapter))
    return model.to(device).eval()

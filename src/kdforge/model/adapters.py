"""LoRA adapters through PEFT: wrap a model for training, or load a saved adapter onto its base.

Every PEFT model kdforge builds goes through here. PEFT (0.21) reads `model.is_gradient_checkpointing`
while it wraps a model (peft_model.py), a transformers property deprecated in favour of
`is_activation_checkpointing` that warns "FutureWarning: `is_gradient_checkpointing` is deprecated"
on every call: the daemon, `serve --adapter` and LoRA eval printed it. The warning is about PEFT's
code, not ours, and says nothing a user can act on, so exactly that message is silenced around
these calls (nothing else, nowhere else).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

_PEFT_READS_DEPRECATED = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def _peft_quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_READS_DEPRECATED, category=FutureWarning)
        yield


def with_lora(model, lora_config):
    """`peft.get_peft_model(model, lora_config)`, without PEFT's deprecation noise."""
    from peft import get_peft_model

    with _peft_quiet():
        return get_peft_model(model, lora_config)


def merged_adapter(model, adapter_dir: str):
    """The base `model` with the PEFT adapter saved in `adapter_dir` merged into its weights."""
    from peft import PeftModel

    with _peft_quiet():
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()

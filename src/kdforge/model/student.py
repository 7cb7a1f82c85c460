"""The student: a Llama-architecture GQA transformer built from a few numbers.

It is a plain `transformers.LlamaForCausalLM`, so a saved student is a normal Hugging Face model
folder: `AutoModelForCausalLM.from_pretrained(dir)` loads it and the vLLM / llama.cpp converters
apply. GQA is one field: `n_kv_heads` (must divide `n_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

# The numbers live in shape.py (no torch there, so `config validate` starts fast); re-exported here.
from kdforge.model.shape import PRESETS, ModelCfg, preset  # noqa: F401


@dataclass
class StudentOutput(CausalLMOutputWithPast):
    """`StudentLM`'s output: the usual `CausalLMOutputWithPast` (`.logits`, `.loss`, ...) that also
    answers the tensor questions the seed's snippet asks of `logits = model(input_ids)`:
    `.shape`, `.size()`, `.dim()`, `.numel()`, `.element_size()`, `.dtype`, `.device`, all of
    the logits. Only `StudentLM` returns it; `build_student` and saved folders stay plain Llama."""

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def size(self, *dim):
        return self.logits.size(*dim)

    def dim(self) -> int:
        return self.logits.dim()

    def numel(self) -> int:
        return self.logits.numel()

    def element_size(self) -> int:
        return self.logits.element_size()


class StudentLM(LlamaForCausalLM):
    """The seed's `StudentLM(cfg)`: a LlamaForCausalLM built from a ModelCfg.

    `model(input_ids).logits` has shape (batch, seq, vocab), and so does `model(input_ids).shape`
    (the seed's snippet treats the output as the logits; see `StudentOutput`). Saved folders name
    the plain `LlamaForCausalLM` architecture so that any Llama loader takes them, and load back
    as a plain `LlamaForCausalLM` with its usual outputs.
    """

    def __init__(self, cfg: ModelCfg | LlamaConfig, vocab_size: int | None = None, **special):
        hf = cfg if isinstance(cfg, LlamaConfig) else cfg.to_hf(vocab_size, **special)
        super().__init__(hf)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if isinstance(out, CausalLMOutputWithPast) and out.logits is not None:  # return_dict=False: a tuple
            return StudentOutput(**dict(out.items()))
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = ["LlamaForCausalLM"]
        self.config.save_pretrained(save_directory)
        return out


def build_student(cfg: ModelCfg, vocab_size: int | None = None, seed: int | None = None,
                  **special) -> LlamaForCausalLM:
    """A freshly initialised student (deterministic when `seed` is given)."""
    hf = cfg.to_hf(vocab_size, **special)
    hf.architectures = ["LlamaForCausalLM"]
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(hf)


def write_student(cfg: ModelCfg, tokenizer_dir: str | Path | None, out: str | Path,
                  seed: int = 0) -> Path:
    """`kdforge init-model`: write a random-init student (and its tokenizer) as an HF folder."""
    from transformers import AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False) if tokenizer_dir else None
    special = {}
    if tok is not None:
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    model = build_student(cfg, len(tok) if tok is not None else None, seed=seed, **special)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def peft_lora_config(r: int, alpha: float, dropout: float, target_modules: list[str] | None):
    """The PEFT LoraConfig kdforge trains with (train, daemon, estimate-memory alike).
    `target_modules` None: PEFT's all-linear (every Linear and Conv1D layer but the output head,
    whatever the family names them); PEFT writes the resolved names into adapter_config.json."""
    from peft import LoraConfig

    targets = list(target_modules) if target_modules is not None else "all-linear"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")

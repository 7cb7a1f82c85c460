"""The student: a Llama-architecture GQA transformer built from a few numbers.

It is a plain `transformers.LlamaForCausalLM`, so a saved student is a normal Hugging Face model
folder: `AutoModelForCausalLM.from_pretrained(dir)` loads it and the vLLM / llama.cpp converters
apply. GQA is one field: `n_kv_heads` (must divide `n_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class ModelCfg:
    """The seed's ModelCfg. `vocab_size` None means "take it from the tokenizer"."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int | None = None  # default d_model // n_heads
    vocab_size: int | None = 32000
    ffn_dim: int | None = None  # default: SwiGLU 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def resolved(self, vocab_size: int | None = None) -> "ModelCfg":
        d_head = self.d_head or self.d_model // self.n_heads
        ffn = self.ffn_dim or ((int(8 * self.d_model / 3) + 63) // 64) * 64
        vocab = self.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("vocab_size is unset: give model.vocab_size or a tokenizer")
        return replace(self, d_head=d_head, ffn_dim=ffn, vocab_size=vocab)

    def problems(self) -> list[tuple[str, str]]:
        """Shape errors as (field, message) pairs; empty when the numbers build a model."""
        out = []
        for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, f) <= 0:
                out.append((f, f"must be positive, got {getattr(self, f)}"))
        if self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            out.append(("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}"))
        if self.d_head is None and self.n_heads > 0 and self.d_model % self.n_heads:
            out.append(("d_head", f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}): set d_head"))
        return out

    def to_hf(self, vocab_size: int | None = None, **special) -> LlamaConfig:
        c = self.resolved(vocab_size)
        return LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.ffn_dim,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            head_dim=c.d_head,
            max_position_embeddings=c.max_seq_len,
            rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings,
            rms_norm_eps=1e-5,
            attention_bias=False,
            mlp_bias=False,
            **special,
        )

    def num_params(self, vocab_size: int | None = None) -> int:
        """Exact parameter count of the built model (checked against the real model in tests)."""
        c = self.resolved(vocab_size)
        attn = c.d_model * c.n_heads * c.d_head * 2 + c.d_model * c.n_kv_heads * c.d_head * 2
        mlp = 3 * c.d_model * c.ffn_dim
        norms = 2 * c.d_model
        emb = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return c.n_layers * (attn + mlp + norms) + emb + c.d_model


# Presets. Comments give the parameter count at the preset's own vocab size.
PRESETS: dict[str, ModelCfg] = {
    # ~0.3M + embeddings; vocab from the tokenizer. The seed's toy shape.
    "toy": ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                    ffn_dim=192, max_seq_len=512),
    # ~7M at vocab 8k: the benchmark model ("a few million parameters").
    "small": ModelCfg(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_head=32, vocab_size=None,
                      ffn_dim=704, max_seq_len=1024),
    # ~125M (124,668,672) at vocab 32k.
    "125m": ModelCfg(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_head=64, vocab_size=32000,
                     ffn_dim=2048, max_seq_len=2048),
    # ~1.1B at vocab 32k (TinyLlama shape).
    "1b": ModelCfg(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_head=64, vocab_size=32000,
                   ffn_dim=5632, max_seq_len=2048),
    # ~8.98B at vocab 32k: Llama-3-8B body with 40 layers (the seed's "9B worker").
    "9b": ModelCfg(d_model=4096, n_layers=40, n_heads=32, n_kv_heads=8, d_head=128, vocab_size=32000,
                   ffn_dim=14336, max_seq_len=8192, rope_theta=500000.0),
}


def preset(name: str) -> ModelCfg:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


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
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else None
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

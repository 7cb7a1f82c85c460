"""The student's shape: `ModelCfg` (the seed's few numbers) and the named presets.

Plain dataclasses with no torch or transformers import, so that config validation (`kdforge config
validate`, every command's config load) starts in a fraction of a second; `to_hf` imports
transformers when a model is actually built."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig


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
        """The transformers LlamaConfig these numbers build (imports transformers)."""
        from transformers import LlamaConfig

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

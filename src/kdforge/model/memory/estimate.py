"""Training memory from first principles (a built student: `estimate`): weights, gradients, optimizer state, activations.

All sizes are bytes; GB = 10^9 bytes (as in the seed: "9B params x 2 bytes (FP16) = 18GB").

Static memory (N = all parameters, exact from `ModelCfg.num_params`; T = trainable ones)

    weights     N x bytes(dtype)
    master      T x 4                    only with master weights (mixed precision)
    gradients   T x bytes(dtype)
    optimizer   T x 2 x bytes(opt dtype) AdamW's exp_avg and exp_avg_sq

`torch.optim.AdamW` keeps both moments in the parameter's dtype, so pure-bf16 training holds
2 x 2 B per parameter: that is the seed's 36 GB for 9B. fp32 moments double it; classic mixed
precision (bf16 weights and grads, fp32 master copy, fp32 moments) costs 16 B per parameter.
With LoRA, T is the adapters (r x (in + out) per targeted linear, r x (d + V) for lm_head),
kept in float32 (peft's `autocast_adapter_dtype` default); the frozen base has no gradient.

Activations: what autograd saves for `transformers.LlamaForCausalLM` (sdpa or eager attention),
counted tensor by tensor (tests/test_memory.py checks the count against torch's saved-tensor
hooks). Per token, with p = bytes of the activation dtype, d = d_model, q = n_heads x d_head,
kv = n_kv_heads x d_head, f = ffn_dim, H = n_heads, s = seq_len, V = vocab_size:

    each decoder layer (full training)
      RMSNorm x2   fp32 input 4d, 1/rms 4, normalised x pd, output pd (the next linears' input)
      attention    sdpa: q pq, k and v p.kv each (GQA kept unrepeated, no padding mask),
                   output pq (also o_proj's input), logsumexp 4H
                   eager: q, repeated k and v, o_proj input pq each; probabilities 4Hs (fp32
                   softmax) + pHs (cast back when p < 4)
      SwiGLU       gate (SiLU input), SiLU(gate), up, their product (down_proj's input): 4pf
      = (8 + 4p)d + 8 + 2pq + 2p.kv + 4H + 4pf                          (sdpa)
    LoRA: a frozen weight saves nothing for itself, so the norms' normalised x and the inputs of
      frozen linears go; each adapter saves its input (shared when the adapter dtype is p, else
      its own cast, 4 x in_features; with dropout, its dropped input and its mask, 4 x
      in_features each on CPU) and its r-wide hidden 4r.
    the head: final norm as above, input_ids + shifted labels (2 x int64) 16, the
      cross-entropy's fp32 log-softmax 4V. The logits pV stay alive in the model output.
    loss backward: two more fp32 V-wide buffers (grad of the log-softmax output and input) 8V.
      At vocab 32000 this head dominates small models.
    layer backward: while a layer's SwiGLU runs backward, the gradients of its product, SiLU
      output and up projection and of the residual stream are alive: 2pf + pd beyond what it saved.

    peak per token = L x layer + pV + max(head + 8V, 2pf + pd)           no checkpointing
    peak per token = L x pd + pV + max(head + 8V, layer + 2pf + pd)      gradient checkpointing
      (each layer keeps only its input; during backward one layer at a time is recomputed)
    activations = micro_batch x seq_len x peak per token

total = weights + master + gradients + optimizer + activations: the peak of a steady-state step
with gradients held while a micro-batch's activations are alive (grad accumulation). Not
counted: the CUDA context and allocator slack (1-2 GB on a GPU), a teacher model or teacher
logits for KD, kernel workspaces.
"""


from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdforge.model.shape import ModelCfg

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTIONS = ("sdpa", "eager")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ALL_LINEAR + ("lm_head",)
GB = 10**9
MB = 10**6


@dataclass(frozen=True)
class LoraSetup:
    r: int = 8
    target_modules: tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    dtype: str = "float32"  # peft casts adapters to fp32 by default (autocast_adapter_dtype)


def lora_setup(lora) -> LoraSetup | None:
    """The LoraSetup of a config's `model.lora` section (None: full training). Unset targets are
    PEFT's all-linear, which on a Llama-shaped model is ALL_LINEAR (every linear but lm_head)."""
    if lora is None:
        return None
    return LoraSetup(r=lora.r, target_modules=tuple(lora.target_modules or ALL_LINEAR), dropout=lora.dropout)


@dataclass(frozen=True)
class Setup:
    """How the model is trained: the knobs that change memory."""

    micro_batch: int = 1
    seq_len: int = 512
    dtype: str = "bfloat16"  # weights, gradients, activations
    optimizer_dtype: str | None = None  # AdamW moments; None = the trainable weights' dtype
    master_weights: bool = False  # an fp32 copy of the trainable weights (mixed precision)
    lora: LoraSetup | None = None  # None = full training
    gradient_checkpointing: bool = False
    attention: str = "sdpa"

    def problems(self) -> list[tuple[str, str]]:
        p = []
        for name in ("micro_batch", "seq_len"):
            if getattr(self, name) <= 0:
                p.append((name, f"must be positive, got {getattr(self, name)}"))
        for name in ("dtype", "optimizer_dtype"):
            v = getattr(self, name)
            if v is not None and v not in DTYPE_BYTES:
                p.append((name, f"unknown dtype {v!r}; use one of {', '.join(DTYPE_BYTES)}"))
        if self.attention not in ATTENTIONS:
            p.append(("attention", f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTIONS)}"))
        if self.lora is not None:
            if self.lora.r <= 0:
                p.append(("lora_r", f"must be positive, got {self.lora.r}"))
            bad = [t for t in self.lora.target_modules if t not in LORA_TARGETS]
            if bad:
                p.append(("lora.target_modules", f"{bad} are not linear layers of the student; "
                          f"it has {', '.join(LORA_TARGETS)}"))
        return p


@dataclass(frozen=True)
class Term:
    """One saved tensor: `coef` bytes per element of a width named `sym` (value `dim`), per token."""

    group: str
    coef: int
    sym: str
    dim: int

    @property
    def bytes(self) -> int:
        return self.coef * self.dim


class _Totals:
    """total and breakdown() from weights, master, gradients, optimizer and activations."""

    @property
    def total(self) -> int:
        return self.weights + self.master + self.gradients + self.optimizer + self.activations

    def breakdown(self) -> dict[str, int]:
        return {"weights": self.weights, "master_weights": self.master, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total}


@dataclass(frozen=True)
class Estimate(_Totals):
    cfg: "ModelCfg"  # resolved: every number set
    setup: Setup
    params: int
    trainable: int
    weights: int
    master: int
    gradients: int
    optimizer: int
    layer_terms: tuple[Term, ...]  # what one decoder layer saves, per token
    head_terms: tuple[Term, ...]  # final norm, ids, log-softmax, per token
    logits: int  # per token: the logits the model output keeps alive
    ce_backward: int  # per token: the loss backward's two fp32 V-wide buffers
    layer_backward: int  # per token: gradients alive inside one layer's backward
    checkpoint: int  # per token per layer under gradient checkpointing: the layer input

    @property
    def tokens(self) -> int:
        return self.setup.micro_batch * self.setup.seq_len

    @property
    def layer(self) -> int:
        return sum(t.bytes for t in self.layer_terms)

    @property
    def head(self) -> int:
        return sum(t.bytes for t in self.head_terms)

    @property
    def saved_per_token(self) -> int:
        """Bytes per token autograd holds for backward when the forward ends."""
        per_layer = self.checkpoint if self.setup.gradient_checkpointing else self.layer
        return self.cfg.n_layers * per_layer + self.head

    @property
    def peak_per_token(self) -> int:
        n_layers, head = self.cfg.n_layers, self.head + self.ce_backward
        if self.setup.gradient_checkpointing:
            return n_layers * self.checkpoint + self.logits + max(head, self.layer + self.layer_backward)
        return n_layers * self.layer + self.logits + max(head, self.layer_backward)

    @property
    def activations(self) -> int:
        return self.tokens * self.peak_per_token


# ----------------------------------------------------------------------------- counting

def lora_params(cfg: "ModelCfg", lora: LoraSetup) -> int:
    """Adapter parameters: r x (in + out) for each targeted linear (cfg resolved)."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.ffn_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    per_layer = sum(lora.r * sum(shapes[m]) for m in lora.target_modules if m in shapes)
    head = lora.r * (d + cfg.vocab_size) if "lm_head" in lora.target_modules else 0
    return cfg.n_layers * per_layer + head


class _Saved:
    """Saved tensors by name: a tensor saved by two ops is stored, and counted, once."""

    def __init__(self):
        self.kept: dict[str, Term] = {}

    def keep(self, name: str, group: str, coef: int, sym: str, dim: int) -> None:
        self.kept[name] = Term(group, coef, sym, dim)

    def linear_input(self, module: str, name: str, group: str, sym: str, dim: int,
                     act_bytes: int, lora: LoraSetup | None) -> None:
        """What a linear (or its adapter) saves of its input (`act_bytes`: the activations' element size)."""
        if lora is None:
            self.keep(name, group, act_bytes, sym, dim)
            return
        if module not in lora.target_modules:
            return  # frozen: backward needs only the weight
        adapter_bytes = DTYPE_BYTES[lora.dtype]
        if lora.dropout > 0:
            self.keep(f"{module}.dropped", "LoRA", adapter_bytes, sym, dim)
            # CPU dropout saves its scaled mask in the input's dtype (CUDA's fused kernel: 1 B)
            self.keep(f"{module}.mask", "LoRA", adapter_bytes, sym, dim)
        elif adapter_bytes != act_bytes:
            self.keep(f"{module}.cast", "LoRA", adapter_bytes, sym, dim)
        else:
            self.keep(name, group, act_bytes, sym, dim)
        self.keep(f"{module}.hidden", "LoRA", adapter_bytes, "r", lora.r)


def _norm(saved: _Saved, name: str, group: str, d: int, act_bytes: int, full: bool) -> None:
    saved.keep(f"{name}.x32", group, 4, "d", d)  # pow and x * rsqrt save the fp32 input
    saved.keep(f"{name}.rstd", group, 4, "1", 1)
    if full:  # weight * x_hat saves x_hat only when the weight learns
        saved.keep(f"{name}.xhat", group, act_bytes, "d", d)


def layer_terms(cfg: "ModelCfg", setup: Setup) -> tuple[Term, ...]:
    """What one decoder layer saves for backward, per token (cfg resolved)."""
    # d, q, kv, f, H: the widths the module docstring's formula names; p the activations' bytes
    p, seq_len, lora = DTYPE_BYTES[setup.dtype], setup.seq_len, setup.lora
    d, H = cfg.d_model, cfg.n_heads
    q, kv, f = H * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.ffn_dim
    saved = _Saved()
    _norm(saved, "ln1", "norms", d, p, lora is None)
    _norm(saved, "ln2", "norms", d, p, lora is None)
    saved.keep("q", "attention", p, "q", q)
    if setup.attention == "sdpa":
        saved.keep("k", "attention", p, "kv", kv)
        saved.keep("v", "attention", p, "kv", kv)
        saved.keep("out", "attention", p, "q", q)
        saved.keep("lse", "attention", 4, "H", H)
        o_in = "out"  # the kernel's output is laid out as o_proj's input: one tensor
    else:
        saved.keep("k_rep", "attention", p, "q", q)
        saved.keep("v_rep", "attention", p, "q", q)
        saved.keep("probs32", "attention", 4, "Hs", H * seq_len)
        if p < 4:
            saved.keep("probs", "attention", p, "Hs", H * seq_len)
        o_in = "o_in"
    for m in ("gate", "act", "up"):
        saved.keep(m, "SwiGLU", p, "f", f)
    for m in ("q_proj", "k_proj", "v_proj"):
        saved.linear_input(m, "ln1.y", "norms", "d", d, p, lora)
    saved.linear_input("o_proj", o_in, "attention", "q", q, p, lora)
    for m in ("gate_proj", "up_proj"):
        saved.linear_input(m, "ln2.y", "norms", "d", d, p, lora)
    saved.linear_input("down_proj", "h", "SwiGLU", "f", f, p, lora)
    return tuple(saved.kept.values())


def head_terms(cfg: "ModelCfg", setup: Setup) -> tuple[Term, ...]:
    """Final norm, lm_head input, token ids, the CE log-softmax: saved per token."""
    act_bytes, lora = DTYPE_BYTES[setup.dtype], setup.lora
    saved = _Saved()
    _norm(saved, "norm", "final norm", cfg.d_model, act_bytes, lora is None)
    saved.linear_input("lm_head", "norm.y", "final norm", "d", cfg.d_model, act_bytes, lora)
    saved.keep("ids", "ids", 16, "1", 1)  # input_ids (embedding) + shifted labels (nll), int64
    saved.keep("log_softmax", "CE log-softmax", 4, "V", cfg.vocab_size)
    return tuple(saved.kept.values())


def estimate(cfg: "ModelCfg", setup: Setup = Setup(), vocab_size: int | None = None) -> Estimate:
    """Memory for training `cfg` as `setup` says. `vocab_size` fills a preset's open vocab."""
    resolved = cfg.resolved(vocab_size)
    act_bytes = DTYPE_BYTES[setup.dtype]
    params = resolved.num_params()
    if setup.lora is None:
        trainable, trainable_bytes = params, act_bytes
        weights = params * act_bytes
    else:
        trainable, trainable_bytes = lora_params(resolved, setup.lora), DTYPE_BYTES[setup.lora.dtype]
        weights = params * act_bytes + trainable * trainable_bytes
    moment_bytes = DTYPE_BYTES[setup.optimizer_dtype] if setup.optimizer_dtype else trainable_bytes
    return Estimate(
        cfg=resolved, setup=setup, params=params, trainable=trainable, weights=weights,
        master=trainable * 4 if setup.master_weights and trainable_bytes < 4 else 0,
        gradients=trainable * trainable_bytes, optimizer=trainable * 2 * moment_bytes,
        layer_terms=layer_terms(resolved, setup), head_terms=head_terms(resolved, setup),
        logits=act_bytes * resolved.vocab_size, ce_backward=8 * resolved.vocab_size,
        checkpoint=act_bytes * resolved.d_model,
        layer_backward=2 * act_bytes * resolved.ffn_dim + act_bytes * resolved.d_model,
    )


# ----------------------------------------------------------------------------- the comparison rows

def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def alternatives(cfg: "ModelCfg", setup: Setup, vocab_size: int | None = None) -> list[tuple[str, Estimate]]:
    """The same model and batch trained other common ways (the report's comparison rows)."""
    return _alternatives(setup, lambda other: estimate(cfg, other, vocab_size))


def _alternatives(setup: Setup, estimate_of) -> list:
    """(label, estimate_of(setup')) for the comparison rows, duplicates of an earlier row dropped."""
    lora8 = LoraSetup()
    cands = [("this setup", setup)]
    if setup.lora is None:  # LoRA adapters are fp32 already: no master copy, fp32 moments
        cands += [
            ("AdamW moments in fp32", replace(setup, optimizer_dtype="float32")),
            (f"mixed precision: {_short(setup.dtype) if setup.dtype != 'float32' else 'bf16'}"
             " + fp32 master + fp32 moments",
             replace(setup, dtype="bfloat16" if setup.dtype == "float32" else setup.dtype,
                     master_weights=True, optimizer_dtype="float32")),
        ]
    cands += [
        ("float32 throughout", replace(setup, dtype="float32", optimizer_dtype=None, master_weights=False)),
        ("bfloat16 throughout (float16: same bytes)",
         replace(setup, dtype="bfloat16", optimizer_dtype=None, master_weights=False)),
        (f"gradient checkpointing {'off' if setup.gradient_checkpointing else 'on'}",
         replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)),
        ("full training" if setup.lora else f"LoRA r={lora8.r}, all linear layers",
         replace(setup, lora=None if setup.lora else lora8, optimizer_dtype=None, master_weights=False)),
        (f"LoRA r={(setup.lora or lora8).r} + gradient checkpointing",
         replace(setup, lora=setup.lora or lora8, gradient_checkpointing=True, optimizer_dtype=None,
                 master_weights=False)),
    ]
    out, seen = [], []
    for label, candidate in cands:
        est = estimate_of(candidate)
        if est.breakdown() in seen:  # e.g. "fp32 moments" when the weights are fp32 already
            continue
        seen.append(est.breakdown())
        out.append((label, est))
    return out

"""Training memory from first principles: weights, gradients, optimizer state, activations.

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

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
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
        L, head = self.cfg.n_layers, self.head + self.ce_backward
        if self.setup.gradient_checkpointing:
            return L * self.checkpoint + self.logits + max(head, self.layer + self.layer_backward)
        return L * self.layer + self.logits + max(head, self.layer_backward)

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
                     p: int, lora: LoraSetup | None) -> None:
        """What a linear (or its adapter) saves of its input."""
        if lora is None:
            self.keep(name, group, p, sym, dim)
            return
        if module not in lora.target_modules:
            return  # frozen: backward needs only the weight
        a = DTYPE_BYTES[lora.dtype]
        if lora.dropout > 0:
            self.keep(f"{module}.dropped", "LoRA", a, sym, dim)
            # CPU dropout saves its scaled mask in the input's dtype (CUDA's fused kernel: 1 B)
            self.keep(f"{module}.mask", "LoRA", a, sym, dim)
        elif a != p:
            self.keep(f"{module}.cast", "LoRA", a, sym, dim)
        else:
            self.keep(name, group, p, sym, dim)
        self.keep(f"{module}.hidden", "LoRA", a, "r", lora.r)


def _norm(saved: _Saved, name: str, group: str, d: int, p: int, full: bool) -> None:
    saved.keep(f"{name}.x32", group, 4, "d", d)  # pow and x * rsqrt save the fp32 input
    saved.keep(f"{name}.rstd", group, 4, "1", 1)
    if full:  # weight * x_hat saves x_hat only when the weight learns
        saved.keep(f"{name}.xhat", group, p, "d", d)


def layer_terms(cfg: "ModelCfg", setup: Setup) -> tuple[Term, ...]:
    """What one decoder layer saves for backward, per token (cfg resolved)."""
    p, s, lora = DTYPE_BYTES[setup.dtype], setup.seq_len, setup.lora
    d, H = cfg.d_model, cfg.n_heads
    q, kv, f = H * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.ffn_dim
    sv = _Saved()
    _norm(sv, "ln1", "norms", d, p, lora is None)
    _norm(sv, "ln2", "norms", d, p, lora is None)
    sv.keep("q", "attention", p, "q", q)
    if setup.attention == "sdpa":
        sv.keep("k", "attention", p, "kv", kv)
        sv.keep("v", "attention", p, "kv", kv)
        sv.keep("out", "attention", p, "q", q)
        sv.keep("lse", "attention", 4, "H", H)
        o_in = "out"  # the kernel's output is laid out as o_proj's input: one tensor
    else:
        sv.keep("k_rep", "attention", p, "q", q)
        sv.keep("v_rep", "attention", p, "q", q)
        sv.keep("probs32", "attention", 4, "Hs", H * s)
        if p < 4:
            sv.keep("probs", "attention", p, "Hs", H * s)
        o_in = "o_in"
    for m in ("gate", "act", "up"):
        sv.keep(m, "SwiGLU", p, "f", f)
    for m in ("q_proj", "k_proj", "v_proj"):
        sv.linear_input(m, "ln1.y", "norms", "d", d, p, lora)
    sv.linear_input("o_proj", o_in, "attention", "q", q, p, lora)
    for m in ("gate_proj", "up_proj"):
        sv.linear_input(m, "ln2.y", "norms", "d", d, p, lora)
    sv.linear_input("down_proj", "h", "SwiGLU", "f", f, p, lora)
    return tuple(sv.kept.values())


def head_terms(cfg: "ModelCfg", setup: Setup) -> tuple[Term, ...]:
    """Final norm, lm_head input, token ids, the CE log-softmax: saved per token."""
    p, lora = DTYPE_BYTES[setup.dtype], setup.lora
    sv = _Saved()
    _norm(sv, "norm", "final norm", cfg.d_model, p, lora is None)
    sv.linear_input("lm_head", "norm.y", "final norm", "d", cfg.d_model, p, lora)
    sv.keep("ids", "ids", 16, "1", 1)  # input_ids (embedding) + shifted labels (nll), int64
    sv.keep("log_softmax", "CE log-softmax", 4, "V", cfg.vocab_size)
    return tuple(sv.kept.values())


def estimate(cfg: "ModelCfg", setup: Setup = Setup(), vocab_size: int | None = None) -> Estimate:
    """Memory for training `cfg` as `setup` says. `vocab_size` fills a preset's open vocab."""
    c = cfg.resolved(vocab_size)
    p = DTYPE_BYTES[setup.dtype]
    N = c.num_params()
    if setup.lora is None:
        T, tb = N, p
        weights = N * p
    else:
        T, tb = lora_params(c, setup.lora), DTYPE_BYTES[setup.lora.dtype]
        weights = N * p + T * tb
    ob = DTYPE_BYTES[setup.optimizer_dtype] if setup.optimizer_dtype else tb
    return Estimate(
        cfg=c, setup=setup, params=N, trainable=T, weights=weights,
        master=T * 4 if setup.master_weights and tb < 4 else 0,
        gradients=T * tb, optimizer=T * 2 * ob,
        layer_terms=layer_terms(c, setup), head_terms=head_terms(c, setup),
        logits=p * c.vocab_size, ce_backward=8 * c.vocab_size, checkpoint=p * c.d_model,
        layer_backward=2 * p * c.ffn_dim + p * c.d_model,
    )


# ----------------------------------------------------------------------------- report

def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n / 1e6:.2f} M"


def _expr(terms) -> str:
    """'16d + 4q + 8' from terms: coefficients summed per width symbol."""
    coefs: dict[str, int] = {}
    for t in terms:
        coefs[t.sym] = coefs.get(t.sym, 0) + t.coef
    parts = [f"{c}{'' if s == '1' else s}" for s, c in coefs.items() if s != "1"]
    if "1" in coefs:
        parts.append(str(coefs["1"]))
    return " + ".join(parts)


def _groups(terms) -> list[tuple[str, str, int]]:
    out: dict[str, list[Term]] = {}
    for t in terms:
        out.setdefault(t.group, []).append(t)
    return [(g, _expr(ts), sum(t.bytes for t in ts)) for g, ts in out.items()]


def describe(est: Estimate) -> str:
    s = est.setup
    mode = "full training" if s.lora is None else (
        f"LoRA r={s.lora.r} on {', '.join(s.lora.target_modules)} (adapters {s.lora.dtype})")
    opt = s.optimizer_dtype or (s.dtype if s.lora is None else s.lora.dtype)
    return (f"{mode}, AdamW, {s.dtype} weights, moments {opt}"
            + (", fp32 master weights" if est.master else "")
            + f", micro-batch {s.micro_batch} x {s.seq_len} tokens, {s.attention} attention, "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}")


def formula_lines(est: Estimate, unit: int = GB) -> list[str]:
    """How each number was reached, one line per quantity (the report's body)."""
    s, c = est.setup, est.cfg
    p = DTYPE_BYTES[s.dtype]
    u = "GB" if unit == GB else "MB"

    def row(name: str, how: str, value: int) -> str:
        return f"  {name:<12}{how:<62}= {value / unit:>9.2f} {u}"

    tdt = s.dtype if s.lora is None else s.lora.dtype
    tb = DTYPE_BYTES[tdt]
    odt = s.optimizer_dtype or tdt
    if s.lora is None:
        w = f"{est.params:,} params x {p} B ({s.dtype})"
    else:
        w = f"{est.params:,} frozen x {p} B + {est.trainable:,} adapter x {tb} B"
    lines = [row("weights", w, est.weights)]
    if est.master:
        lines.append(row("master", f"{est.trainable:,} trainable x 4 B (float32 copy)", est.master))
    lines.append(row("gradients", f"{est.trainable:,} trainable x {tb} B ({tdt})", est.gradients))
    lines.append(row("optimizer", f"{est.trainable:,} trainable x 2 moments x {DTYPE_BYTES[odt]} B ({odt})",
                     est.optimizer))
    static = est.weights + est.master + est.gradients + est.optimizer
    lines.append(row("= static", "weights + " + ("master + " if est.master else "") + "gradients + optimizer",
                     static))
    lines.append(row("activations", f"{s.micro_batch} x {s.seq_len} tokens x {est.peak_per_token:,} B/token (below)",
                     est.activations))
    lines.append(row("= total", "", est.total))
    lines.append("")
    L = c.n_layers
    lay = _groups(est.layer_terms)
    lines.append(f"  activation bytes per token (p = {p}, {s.dtype}):")
    lines.append(f"    each layer   {' + '.join(f'{g} ({e})' for g, e, _ in lay)}")
    lines.append(f"                 = {' + '.join(f'{v:,}' for _, _, v in lay)} = {est.layer:,}")
    hd = _groups(est.head_terms)
    lines.append(f"    head         {' + '.join(f'{g} ({e})' for g, e, _ in hd)}")
    lines.append(f"                 = {' + '.join(f'{v:,}' for _, _, v in hd)} = {est.head:,}")
    lines.append(f"    logits       {p}V = {est.logits:,} (kept alive by the model output)")
    lines.append(f"    CE backward  8V = {est.ce_backward:,} (fp32 grads of the log-softmax output and input)")
    lines.append(f"    layer bwd    {2 * p}f + {p}d = {est.layer_backward:,} (grads alive in one layer's backward)")
    head = est.head + est.ce_backward
    if s.gradient_checkpointing:
        lines.append(f"    peak         {L} layers x {p}d (checkpointed inputs) + logits + max(head + CE backward, "
                     f"one recomputed layer + layer bwd)")
        lines.append(f"                 = {L} x {est.checkpoint:,} + {est.logits:,} + max({head:,}, "
                     f"{est.layer + est.layer_backward:,}) = {est.peak_per_token:,}")
    else:
        lines.append(f"    peak         {L} layers x each layer + logits + max(head + CE backward, layer bwd)")
        lines.append(f"                 = {L} x {est.layer:,} + {est.logits:,} + max({head:,}, {est.layer_backward:,})"
                     f" = {est.peak_per_token:,}")
    lines.append(f"    where d = {c.d_model}, q = n_heads x d_head = {c.n_heads * c.d_head}, "
                 f"kv = n_kv_heads x d_head = {c.n_kv_heads * c.d_head}, f = {c.ffn_dim}, H = {c.n_heads}, "
                 f"V = {c.vocab_size}" + (f", Hs = {c.n_heads * s.seq_len}" if s.attention == "eager" else "")
                 + (f", r = {s.lora.r}" if s.lora else ""))
    return lines


def alternatives(cfg: "ModelCfg", setup: Setup, vocab_size: int | None = None) -> list[tuple[str, Estimate]]:
    """The same model and batch trained other common ways (the report's comparison rows)."""
    return _alternatives(setup, lambda st: estimate(cfg, st, vocab_size))


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
    for label, st in cands:
        est = estimate_of(st)
        if est.breakdown() in seen:  # e.g. "fp32 moments" when the weights are fp32 already
            continue
        seen.append(est.breakdown())
        out.append((label, est))
    return out


def report(cfg: "ModelCfg", setup: Setup, vocab_size: int | None = None, name: str = "model",
           notes: list[str] | None = None) -> str:
    """The `kdforge estimate-memory` text: the setup, the formula lines, the comparison table."""
    est = estimate(cfg, setup, vocab_size)
    c = est.cfg
    unit = GB if est.total >= GB else MB
    u = "GB" if unit == GB else "MB"
    lines = [
        f"model        {name}: d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads "
        f"({c.n_kv_heads} kv) x {c.d_head}, ffn {c.ffn_dim}, vocab {c.vocab_size}",
        f"parameters   {est.params:,} ({_count(est.params)}); trainable {est.trainable:,}",
        f"setup        {describe(est)}",
        *[f"note         {n}" for n in notes or []],
        "",
        f"how it adds up ({u} = 10^{9 if unit == GB else 6} bytes):",
        *formula_lines(est, unit),
        "",
    ]
    if setup.lora is None and est.optimizer == est.trainable * 4 and not est.master:
        static = (est.weights + est.gradients + est.optimizer) / unit
        lines += [
            f"The optimizer line assumes AdamW's two moments in {setup.optimizer_dtype or setup.dtype}, as "
            "torch.optim.AdamW keeps them for 16-bit weights.",
            f"The seed's '9B params x 2 bytes = 18GB + gradients (18GB) + optimizer states (36GB) = ~72GB "
            f"minimum' is this static sum ({static:.2f} {u}).",
            "fp32 moments double the optimizer; mixed precision adds an fp32 master copy: see the rows below.",
            "",
        ]
    lines.append(f"{'same model and batch, trained as':<52}{'weights':>9}{'master':>9}{'grads':>9}"
                 f"{'optim':>9}{'activ':>9}{'total':>9}   ({u})")
    for label, e in alternatives(cfg, setup, vocab_size):
        vals = [e.weights, e.master, e.gradients, e.optimizer, e.activations, e.total]
        lines.append(f"{label:<52}" + "".join(f"{v / unit:>9.2f}" if v else f"{'-':>9}" for v in vals))
    lines.append("")
    lines.append("Not counted: CUDA context and allocator slack (1-2 GB on a GPU), a teacher model or its "
                 "logits for KD, kernel workspaces.")
    return "\n".join(lines)


def to_json(cfg: "ModelCfg", setup: Setup, vocab_size: int | None = None, name: str = "model",
            notes: list[str] | None = None) -> dict:
    est = estimate(cfg, setup, vocab_size)
    return {
        "model": {"name": name, **asdict(est.cfg)},
        "params": est.params,
        "trainable_params": est.trainable,
        "setup": asdict(setup),
        "bytes": est.breakdown(),
        "activation_bytes_per_token": {"layer": est.layer, "head": est.head, "logits": est.logits,
                                       "ce_backward": est.ce_backward,
                                       "layer_backward": est.layer_backward, "peak": est.peak_per_token},
        "formula": formula_lines(est),
        "notes": notes or [],
        "alternatives": [{"label": label, "setup": asdict(e.setup), "bytes": e.breakdown()}
                         for label, e in alternatives(cfg, setup, vocab_size)],
    }


# ----------------------------------------------------------------------------- any local causal LM

# For a `model.path` model of any family (GPT-2's Conv1D, Phi's biases, Gemma-2's soft-capping, a
# mixture of experts) the layer formula above does not apply. Instead the model is built from its
# own config.json under torch's FakeTensorMode (shapes and dtypes, no memory, no compute) with the
# LoRA the trainer would add, so the parameter counts are exact; one forward of a fake
# micro-batch runs under autograd's saved-tensor hooks, so the activations are what this
# architecture saves at these shapes, storage by storage. The transient terms of the backward
# (logits, the loss backward's fp32 V-wide buffers, the gradients alive in one layer) and the
# gradient checkpointing case are composed from that trace as in the formula above.


@dataclass(frozen=True)
class Traced:
    """What one fake forward of a `model.path` model at micro-batch x seq_len showed (bytes)."""

    model_type: str
    n_layers: int
    d_model: int
    ffn_dim: int
    vocab_size: int
    params: int  # base parameters (adapters excluded)
    trainable: int
    weight_bytes: int  # all parameters, adapters included, in their own dtypes
    trainable_bytes: int
    trainable_dtype: str
    targets: tuple[str, ...]  # LoRA's resolved target modules (empty: full training)
    saved_layers: int  # saved for backward before the output head (embeddings, decoder layers, final norm)
    saved_head: int  # saved from the output head on (lm_head input, soft-capping, the loss)
    logits: int  # the logits tensor the model output keeps alive, when autograd did not save it


@contextmanager
def _as_in_eager_mode():
    """Make transformers take, on fake tensors, the paths it takes on real ones: a fake tensor
    position ids read as "tracing" to the mask code, which then takes the rows for packed
    sequences and builds an s x s mask that a real run of unpacked rows leaves to sdpa's is_causal; and fake tensors have no float32 grouped_mm (its meta kernel
    wants bf16), so a mixture of experts goes through its fallback op, which saves the same
    input and weight."""
    import importlib

    patches = []
    for module, name, value in (("transformers.masking_utils", "find_packed_sequence_indices", lambda *a, **k: None),
                                ("transformers.integrations.moe", "_can_use_grouped_mm", lambda *a, **k: False)):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if not hasattr(mod, name):
            continue
        orig = getattr(mod, name)
        patches.append((mod, name, orig))
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, orig in patches:
            setattr(mod, name, orig)


def _to_fake(model) -> None:
    """Replace the meta parameters and buffers of `model` by fake CPU tensors (called inside a
    FakeTensorMode), one new parameter per old one so tied weights stay tied."""
    import torch

    new: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table, wrap in ((mod._parameters, True), (mod._buffers, False)):
            for k, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                    new[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if wrap else fake
                table[k] = new[id(t)]


def _ffn_dim(conf) -> int:
    d = conf.hidden_size
    return getattr(conf, "intermediate_size", None) or getattr(conf, "n_inner", None) or 4 * d


def trace_model(path, setup: Setup, lora_targets: list[str] | None = None, lora_alpha: float = 16,
                conf=None) -> Traced:
    """Build the model at `path` (a Hugging Face folder) on fake tensors with `setup`'s dtype,
    attention and LoRA (targets None: PEFT's all-linear, as the trainer does) and trace one
    forward of a micro-batch of `setup.micro_batch` x `setup.seq_len` tokens. `conf`: the
    folder's transformers config when the caller has loaded it already."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    conf = conf if conf is not None else hf_config(path)
    dtype = getattr(torch, setup.dtype)
    # Built on the meta device (PEFT cannot move fake parameters), then every tensor swapped for
    # a fake CPU one, so the forward dispatches to the CPU kernels' shape functions (sdpa's
    # flash kernel saves its output and logsumexp, not the probabilities).
    # sdpa: the family's default attention, as training loads it (Gemma-2's is eager)
    attn = {"attn_implementation": "eager"} if setup.attention == "eager" else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, trust_remote_code=False, **attn)
    params = sum(p.numel() for p in model.parameters())
    targets: tuple[str, ...] = ()
    if setup.lora is not None:
        from kdforge.model.adapters import with_lora
        from kdforge.model.student import peft_lora_config

        model = with_lora(model, peft_lora_config(setup.lora.r, lora_alpha, setup.lora.dropout,
                                                  lora_targets))
        pc = model.peft_config["default"]
        targets = tuple(sorted(pc.target_modules or ())) + tuple(sorted(getattr(pc, "target_parameters", None) or ()))
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True), _as_in_eager_mode():
        _to_fake(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, int] = {}
        head_from = [None]

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in param_storages and key not in saved:
                saved[key] = t.untyped_storage().nbytes()
            return t

        def mark(*_):
            if head_from[0] is None:
                head_from[0] = len(saved)

        hook = model.get_output_embeddings().register_forward_pre_hook(mark)
        ids = torch.randint(0, conf.vocab_size, (setup.micro_batch, setup.seq_len))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        hook.remove()
        sizes = list(saved.values())
        cut = head_from[0] if head_from[0] is not None else len(sizes)
        lg = out.logits
        logits = 0 if lg.untyped_storage()._cdata in saved else lg.untyped_storage().nbytes()
        tdt = str(trainable[0].dtype).removeprefix("torch.") if trainable else setup.dtype
        return Traced(
            model_type=conf.model_type, n_layers=conf.num_hidden_layers, d_model=conf.hidden_size,
            ffn_dim=_ffn_dim(conf), vocab_size=conf.vocab_size, params=params,
            trainable=sum(p.numel() for p in trainable),
            weight_bytes=weight_bytes, trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            trainable_dtype=tdt, targets=targets, saved_layers=sum(sizes[:cut]), saved_head=sum(sizes[cut:]),
            logits=logits)


@dataclass(frozen=True)
class ModelEstimate(_Totals):
    """`Estimate`'s numbers for a traced `model.path` model (all activation terms in bytes for
    the whole micro-batch)."""

    traced: Traced
    setup: Setup
    name: str = "model"

    @property
    def params(self) -> int:
        return self.traced.params

    @property
    def trainable(self) -> int:
        return self.traced.trainable

    @property
    def weights(self) -> int:
        return self.traced.weight_bytes

    @property
    def _tb(self) -> int:
        return DTYPE_BYTES[self.traced.trainable_dtype]

    @property
    def master(self) -> int:
        return self.trainable * 4 if self.setup.master_weights and self._tb < 4 else 0

    @property
    def gradients(self) -> int:
        return self.traced.trainable_bytes

    @property
    def optimizer(self) -> int:
        ob = DTYPE_BYTES[self.setup.optimizer_dtype] if self.setup.optimizer_dtype else self._tb
        return self.trainable * 2 * ob

    @property
    def tokens(self) -> int:
        return self.setup.micro_batch * self.setup.seq_len

    @property
    def ce_backward(self) -> int:
        return self.tokens * 8 * self.traced.vocab_size

    @property
    def layer_backward(self) -> int:
        p = DTYPE_BYTES[self.setup.dtype]
        return self.tokens * (2 * p * self.traced.ffn_dim + p * self.traced.d_model)

    @property
    def checkpoint(self) -> int:
        return self.tokens * self.traced.n_layers * DTYPE_BYTES[self.setup.dtype] * self.traced.d_model

    @property
    def activations(self) -> int:
        t = self.traced
        head = t.saved_head + self.ce_backward
        if self.setup.gradient_checkpointing:
            one = t.saved_layers // max(t.n_layers, 1)
            return self.checkpoint + t.logits + max(head, one + self.layer_backward)
        return t.saved_layers + t.logits + max(head, self.layer_backward)


def hf_config(path):
    """The transformers config of the Hugging Face folder at `path` (its config.json)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def lora_field(e: Exception) -> str:
    """The config field a PEFT refusal to build the adapter is about."""
    return "model.lora.dropout" if "lora_dropout" in str(e) else "model.lora.target_modules"


def estimate_model(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
                   _cache: dict | None = None, conf=None) -> ModelEstimate:
    """Memory for training the `model.path` model at `path` as `setup` says (`conf`: its
    transformers config, when loaded already)."""
    key = (setup.dtype, setup.attention, setup.micro_batch, setup.seq_len,
           None if setup.lora is None else (setup.lora.r, setup.lora.dropout))
    cache = {} if _cache is None else _cache
    if key not in cache:
        cache[key] = trace_model(path, setup, lora_targets, conf=conf)
    return ModelEstimate(cache[key], setup, name)


def model_alternatives(path, setup: Setup, lora_targets: list[str] | None = None,
                       conf=None) -> list[tuple[str, ModelEstimate]]:
    """`alternatives` for a `model.path` model: its config.json read once for all the rows."""
    cache: dict = {}
    conf = conf if conf is not None else hf_config(path)
    return _alternatives(setup, lambda st: estimate_model(path, st, lora_targets if st.lora else None, _cache=cache,
                                                          conf=conf))


def _model_lines(e: ModelEstimate, unit: int) -> list[str]:
    s, t = e.setup, e.traced
    u = "GB" if unit == GB else "MB"

    def row(name: str, how: str, value: int) -> str:
        return f"  {name:<12}{how:<62}= {value / unit:>9.2f} {u}"

    tb, tdt = e._tb, t.trainable_dtype
    odt = s.optimizer_dtype or tdt
    w = (f"{e.params:,} params ({s.dtype})" if s.lora is None
         else f"{e.params:,} frozen ({s.dtype}) + {e.trainable:,} adapter ({tdt})")
    lines = [row("weights", w, e.weights)]
    if e.master:
        lines.append(row("master", f"{e.trainable:,} trainable x 4 B (float32 copy)", e.master))
    lines += [row("gradients", f"{e.trainable:,} trainable x {tb} B ({tdt})", e.gradients),
              row("optimizer", f"{e.trainable:,} trainable x 2 moments x {DTYPE_BYTES[odt]} B ({odt})", e.optimizer),
              row("activations", f"{s.micro_batch} x {s.seq_len} tokens (below)", e.activations),
              row("= total", "", e.total), "",
              f"  activations, traced: one forward of {s.micro_batch} x {s.seq_len} fake tokens through the model "
              "built from its config.json, autograd's saved tensors counted storage by storage:",
              f"    saved before the output head  {t.saved_layers / unit:.3f} {u} ({t.n_layers} layers, embeddings, "
              "final norm)",
              f"    saved from the head on        {t.saved_head / unit:.3f} {u} (lm_head input, logit soft-capping, "
              "the loss)",
              f"    logits kept by the output     {t.logits / unit:.3f} {u}",
              f"    loss backward                 {e.ce_backward / unit:.3f} {u} (8V per token: two fp32 V-wide grads)",
              f"    one layer's backward          {e.layer_backward / unit:.3f} {u} ({2 * DTYPE_BYTES[s.dtype]}f + "
              f"{DTYPE_BYTES[s.dtype]}d per token, f = {t.ffn_dim}, d = {t.d_model})"]
    if s.gradient_checkpointing:
        lines.append(f"    peak = {t.n_layers} checkpointed layer inputs ({e.checkpoint / unit:.3f} {u}) + logits "
                     "+ max(head + loss backward, one recomputed layer + its backward)")
    else:
        lines.append("    peak = saved before the head + logits + max(saved from the head + loss backward, "
                     "one layer's backward)")
    return lines


def model_report(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
                 notes: list[str] | None = None, conf=None) -> str:
    """`kdforge estimate-memory` for a `model.path` model of any family."""
    alts = model_alternatives(path, setup, lora_targets, conf)
    e = alts[0][1]
    t = e.traced
    unit = GB if e.total >= GB else MB
    u = "GB" if unit == GB else "MB"
    mode = "full training" if setup.lora is None else (
        f"LoRA r={setup.lora.r} on {', '.join(t.targets)} (adapters {t.trainable_dtype})")
    lines = [f"model        {name}: a {t.model_type!r} model, d_model {t.d_model}, {t.n_layers} layers, "
             f"ffn {t.ffn_dim}, vocab {t.vocab_size}",
             f"parameters   {e.params:,} ({_count(e.params)}); trainable {e.trainable:,}",
             f"setup        {mode}, AdamW, {setup.dtype} weights, micro-batch {setup.micro_batch} x {setup.seq_len} "
             f"tokens, {setup.attention} attention, gradient checkpointing "
             f"{'on' if setup.gradient_checkpointing else 'off'}",
             *[f"note         {n}" for n in notes or []], "",
             f"how it adds up ({u} = 10^{9 if unit == GB else 6} bytes):", *_model_lines(e, unit), "",
             f"{'same model and batch, trained as':<52}{'weights':>9}{'master':>9}{'grads':>9}"
             f"{'optim':>9}{'activ':>9}{'total':>9}   ({u})"]
    for label, a in alts:
        vals = [a.weights, a.master, a.gradients, a.optimizer, a.activations, a.total]
        lines.append(f"{label:<52}" + "".join(f"{v / unit:>9.2f}" if v else f"{'-':>9}" for v in vals))
    lines += ["", "Not counted: CUDA context and allocator slack (1-2 GB on a GPU), a teacher model or its "
              "logits for KD, kernel workspaces."]
    return "\n".join(lines)


def model_json(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
               notes: list[str] | None = None, conf=None) -> dict:
    alts = model_alternatives(path, setup, lora_targets, conf)
    e = alts[0][1]
    return {"model": {"name": name, "path": str(path), **asdict(e.traced)},
            "params": e.params, "trainable_params": e.trainable, "setup": asdict(setup),
            "bytes": e.breakdown(),
            "activation_bytes": {"saved_layers": e.traced.saved_layers, "saved_head": e.traced.saved_head,
                                 "logits": e.traced.logits, "ce_backward": e.ce_backward,
                                 "layer_backward": e.layer_backward, "peak": e.activations},
            "formula": _model_lines(e, GB), "notes": notes or [],
            "alternatives": [{"label": label, "setup": asdict(a.setup), "bytes": a.breakdown()}
                             for label, a in alts]}

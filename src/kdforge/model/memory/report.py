"""The `kdforge estimate-memory` report: how each number adds up, and the comparison table
(text or JSON), for a built student (`report`, `to_json`) or a traced model (`model_report`,
`model_json`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from kdforge.model.memory.estimate import DTYPE_BYTES, GB, MB, Estimate, Setup, Term, alternatives, estimate
from kdforge.model.memory.trace import ModelEstimate, model_alternatives

if TYPE_CHECKING:
    from kdforge.model.shape import ModelCfg


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


# ----------------------------------------------------------------------------- a traced model

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

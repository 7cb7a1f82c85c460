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
    for term in terms:
        coefs[term.sym] = coefs.get(term.sym, 0) + term.coef
    parts = [f"{coef}{'' if sym == '1' else sym}" for sym, coef in coefs.items() if sym != "1"]
    if "1" in coefs:
        parts.append(str(coefs["1"]))
    return " + ".join(parts)


def _groups(terms) -> list[tuple[str, str, int]]:
    out: dict[str, list[Term]] = {}
    for term in terms:
        out.setdefault(term.group, []).append(term)
    return [(group, _expr(members), sum(term.bytes for term in members)) for group, members in out.items()]


def describe(est: Estimate) -> str:
    setup = est.setup
    mode = "full training" if setup.lora is None else (
        f"LoRA r={setup.lora.r} on {', '.join(setup.lora.target_modules)} (adapters {setup.lora.dtype})")
    opt = setup.optimizer_dtype or (setup.dtype if setup.lora is None else setup.lora.dtype)
    return (f"{mode}, AdamW, {setup.dtype} weights, moments {opt}"
            + (", fp32 master weights" if est.master else "")
            + f", micro-batch {setup.micro_batch} x {setup.seq_len} tokens, {setup.attention} attention, "
            f"gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}")


def formula_lines(est: Estimate, unit: int = GB) -> list[str]:
    """How each number was reached, one line per quantity (the report's body)."""
    setup, model = est.setup, est.cfg
    act_bytes = DTYPE_BYTES[setup.dtype]
    units = "GB" if unit == GB else "MB"

    def row(name: str, how: str, value: int) -> str:
        return f"  {name:<12}{how:<62}= {value / unit:>9.2f} {units}"

    trainable_dtype = setup.dtype if setup.lora is None else setup.lora.dtype
    trainable_bytes = DTYPE_BYTES[trainable_dtype]
    moment_dtype = setup.optimizer_dtype or trainable_dtype
    if setup.lora is None:
        weights = f"{est.params:,} params x {act_bytes} B ({setup.dtype})"
    else:
        weights = f"{est.params:,} frozen x {act_bytes} B + {est.trainable:,} adapter x {trainable_bytes} B"
    lines = [row("weights", weights, est.weights)]
    if est.master:
        lines.append(row("master", f"{est.trainable:,} trainable x 4 B (float32 copy)", est.master))
    lines.append(row("gradients", f"{est.trainable:,} trainable x {trainable_bytes} B ({trainable_dtype})",
                     est.gradients))
    lines.append(row("optimizer", f"{est.trainable:,} trainable x 2 moments x {DTYPE_BYTES[moment_dtype]} B "
                     f"({moment_dtype})", est.optimizer))
    static = est.weights + est.master + est.gradients + est.optimizer
    lines.append(row("= static", "weights + " + ("master + " if est.master else "") + "gradients + optimizer",
                     static))
    lines.append(row("activations", f"{setup.micro_batch} x {setup.seq_len} tokens x {est.peak_per_token:,} "
                     "B/token (below)", est.activations))
    lines.append(row("= total", "", est.total))
    lines.append("")
    n_layers = model.n_layers
    layer_groups = _groups(est.layer_terms)
    lines.append(f"  activation bytes per token (p = {act_bytes}, {setup.dtype}):")
    lines.append(f"    each layer   {' + '.join(f'{group} ({expr})' for group, expr, _ in layer_groups)}")
    lines.append(f"                 = {' + '.join(f'{v:,}' for _, _, v in layer_groups)} = {est.layer:,}")
    head_groups = _groups(est.head_terms)
    lines.append(f"    head         {' + '.join(f'{group} ({expr})' for group, expr, _ in head_groups)}")
    lines.append(f"                 = {' + '.join(f'{v:,}' for _, _, v in head_groups)} = {est.head:,}")
    lines.append(f"    logits       {act_bytes}V = {est.logits:,} (kept alive by the model output)")
    lines.append(f"    CE backward  8V = {est.ce_backward:,} (fp32 grads of the log-softmax output and input)")
    lines.append(f"    layer bwd    {2 * act_bytes}f + {act_bytes}d = {est.layer_backward:,} "
                 "(grads alive in one layer's backward)")
    head = est.head + est.ce_backward
    if setup.gradient_checkpointing:
        lines.append(f"    peak         {n_layers} layers x {act_bytes}d (checkpointed inputs) + logits + "
                     "max(head + CE backward, one recomputed layer + layer bwd)")
        lines.append(f"                 = {n_layers} x {est.checkpoint:,} + {est.logits:,} + max({head:,}, "
                     f"{est.layer + est.layer_backward:,}) = {est.peak_per_token:,}")
    else:
        lines.append(f"    peak         {n_layers} layers x each layer + logits + max(head + CE backward, layer bwd)")
        lines.append(f"                 = {n_layers} x {est.layer:,} + {est.logits:,} + "
                     f"max({head:,}, {est.layer_backward:,}) = {est.peak_per_token:,}")
    lines.append(f"    where d = {model.d_model}, q = n_heads x d_head = {model.n_heads * model.d_head}, "
                 f"kv = n_kv_heads x d_head = {model.n_kv_heads * model.d_head}, f = {model.ffn_dim}, "
                 f"H = {model.n_heads}, V = {model.vocab_size}"
                 + (f", Hs = {model.n_heads * setup.seq_len}" if setup.attention == "eager" else "")
                 + (f", r = {setup.lora.r}" if setup.lora else ""))
    return lines


def report(cfg: "ModelCfg", setup: Setup, vocab_size: int | None = None, name: str = "model",
           notes: list[str] | None = None) -> str:
    """The `kdforge estimate-memory` text: the setup, the formula lines, the comparison table."""
    est = estimate(cfg, setup, vocab_size)
    model = est.cfg
    unit = GB if est.total >= GB else MB
    units = "GB" if unit == GB else "MB"
    lines = [
        f"model        {name}: d_model {model.d_model}, {model.n_layers} layers, {model.n_heads} heads "
        f"({model.n_kv_heads} kv) x {model.d_head}, ffn {model.ffn_dim}, vocab {model.vocab_size}",
        f"parameters   {est.params:,} ({_count(est.params)}); trainable {est.trainable:,}",
        f"setup        {describe(est)}",
        *[f"note         {n}" for n in notes or []],
        "",
        f"how it adds up ({units} = 10^{9 if unit == GB else 6} bytes):",
        *formula_lines(est, unit),
        "",
    ]
    if setup.lora is None and est.optimizer == est.trainable * 4 and not est.master:
        static = (est.weights + est.gradients + est.optimizer) / unit
        lines += [
            f"The optimizer line assumes AdamW's two moments in {setup.optimizer_dtype or setup.dtype}, as "
            "torch.optim.AdamW keeps them for 16-bit weights.",
            f"The seed's '9B params x 2 bytes = 18GB + gradients (18GB) + optimizer states (36GB) = ~72GB "
            f"minimum' is this static sum ({static:.2f} {units}).",
            "fp32 moments double the optimizer; mixed precision adds an fp32 master copy: see the rows below.",
            "",
        ]
    lines.append(f"{'same model and batch, trained as':<52}{'weights':>9}{'master':>9}{'grads':>9}"
                 f"{'optim':>9}{'activ':>9}{'total':>9}   ({units})")
    for label, other in alternatives(cfg, setup, vocab_size):
        vals = [other.weights, other.master, other.gradients, other.optimizer, other.activations, other.total]
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
        "alternatives": [{"label": label, "setup": asdict(other.setup), "bytes": other.breakdown()}
                         for label, other in alternatives(cfg, setup, vocab_size)],
    }


# ----------------------------------------------------------------------------- a traced model

def _model_lines(est: ModelEstimate, unit: int) -> list[str]:
    setup, traced = est.setup, est.traced
    units = "GB" if unit == GB else "MB"

    def row(name: str, how: str, value: int) -> str:
        return f"  {name:<12}{how:<62}= {value / unit:>9.2f} {units}"

    trainable_bytes, trainable_dtype = est._tb, traced.trainable_dtype
    moment_dtype = setup.optimizer_dtype or trainable_dtype
    weights = (f"{est.params:,} params ({setup.dtype})" if setup.lora is None
         else f"{est.params:,} frozen ({setup.dtype}) + {est.trainable:,} adapter ({trainable_dtype})")
    lines = [row("weights", weights, est.weights)]
    if est.master:
        lines.append(row("master", f"{est.trainable:,} trainable x 4 B (float32 copy)", est.master))
    lines += [row("gradients", f"{est.trainable:,} trainable x {trainable_bytes} B ({trainable_dtype})",
                  est.gradients),
              row("optimizer", f"{est.trainable:,} trainable x 2 moments x {DTYPE_BYTES[moment_dtype]} B "
                  f"({moment_dtype})", est.optimizer),
              row("activations", f"{setup.micro_batch} x {setup.seq_len} tokens (below)", est.activations),
              row("= total", "", est.total), "",
              f"  activations, traced: one forward of {setup.micro_batch} x {setup.seq_len} fake tokens through the model "
              "built from its config.json, autograd's saved tensors counted storage by storage:",
              f"    saved before the output head  {traced.saved_layers / unit:.3f} {units} ({traced.n_layers} layers, "
              "embeddings, final norm)",
              f"    saved from the head on        {traced.saved_head / unit:.3f} {units} (lm_head input, logit "
              "soft-capping, the loss)",
              f"    logits kept by the output     {traced.logits / unit:.3f} {units}",
              f"    loss backward                 {est.ce_backward / unit:.3f} {units} (8V per token: two fp32 "
              "V-wide grads)",
              f"    one layer's backward          {est.layer_backward / unit:.3f} {units} "
              f"({2 * DTYPE_BYTES[setup.dtype]}f + "
              f"{DTYPE_BYTES[setup.dtype]}d per token, f = {traced.ffn_dim}, d = {traced.d_model})"]
    if setup.gradient_checkpointing:
        lines.append(f"    peak = {traced.n_layers} checkpointed layer inputs ({est.checkpoint / unit:.3f} {units}) "
                     "+ logits + max(head + loss backward, one recomputed layer + its backward)")
    else:
        lines.append("    peak = saved before the head + logits + max(saved from the head + loss backward, "
                     "one layer's backward)")
    return lines


def model_report(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
                 notes: list[str] | None = None, conf=None) -> str:
    """`kdforge estimate-memory` for a `model.path` model of any family."""
    alts = model_alternatives(path, setup, lora_targets, conf)
    est = alts[0][1]
    traced = est.traced
    unit = GB if est.total >= GB else MB
    units = "GB" if unit == GB else "MB"
    mode = "full training" if setup.lora is None else (
        f"LoRA r={setup.lora.r} on {', '.join(traced.targets)} (adapters {traced.trainable_dtype})")
    lines = [f"model        {name}: a {traced.model_type!r} model, d_model {traced.d_model}, {traced.n_layers} layers, "
             f"ffn {traced.ffn_dim}, vocab {traced.vocab_size}",
             f"parameters   {est.params:,} ({_count(est.params)}); trainable {est.trainable:,}",
             f"setup        {mode}, AdamW, {setup.dtype} weights, micro-batch {setup.micro_batch} x {setup.seq_len} "
             f"tokens, {setup.attention} attention, gradient checkpointing "
             f"{'on' if setup.gradient_checkpointing else 'off'}",
             *[f"note         {n}" for n in notes or []], "",
             f"how it adds up ({units} = 10^{9 if unit == GB else 6} bytes):", *_model_lines(est, unit), "",
             f"{'same model and batch, trained as':<52}{'weights':>9}{'master':>9}{'grads':>9}"
             f"{'optim':>9}{'activ':>9}{'total':>9}   ({units})"]
    for label, other in alts:
        vals = [other.weights, other.master, other.gradients, other.optimizer, other.activations, other.total]
        lines.append(f"{label:<52}" + "".join(f"{v / unit:>9.2f}" if v else f"{'-':>9}" for v in vals))
    lines += ["", "Not counted: CUDA context and allocator slack (1-2 GB on a GPU), a teacher model or its "
              "logits for KD, kernel workspaces."]
    return "\n".join(lines)


def model_json(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
               notes: list[str] | None = None, conf=None) -> dict:
    alts = model_alternatives(path, setup, lora_targets, conf)
    est = alts[0][1]
    return {"model": {"name": name, "path": str(path), **asdict(est.traced)},
            "params": est.params, "trainable_params": est.trainable, "setup": asdict(setup),
            "bytes": est.breakdown(),
            "activation_bytes": {"saved_layers": est.traced.saved_layers, "saved_head": est.traced.saved_head,
                                 "logits": est.traced.logits, "ce_backward": est.ce_backward,
                                 "layer_backward": est.layer_backward, "peak": est.activations},
            "formula": _model_lines(est, GB), "notes": notes or [],
            "alternatives": [{"label": label, "setup": asdict(other.setup), "bytes": other.breakdown()}
                             for label, other in alts]}

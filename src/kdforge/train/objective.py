"""The distillation objective as a module: decoder -> selected hidden states -> loss sums.

Wrapping the whole loss in one `nn.Module` lets DDP see it as the forward pass, and lets the
loss read hidden states instead of full logits: only positions that carry a label are projected
onto the vocabulary, `chunk_size` tokens at a time (see `losses.chunked_loss_sums`).

Packed rows (`seq_ids` in the batch) go to the decoder as position ids that restart at 0 with no
attention mask: transformers' masking (`masking_utils.find_packed_sequence_indices`) then keeps each
example to itself, as a block-diagonal causal mask (sdpa, eager, flex) or varlen kernels (flash
attention). Under sdpa, attention runs example by example instead (`packed_sdpa`): the same
result without the L x L work across examples, the largest cost of a packed CPU step. A model
whose implementation does not build its masks through `masking_utils` gets an explicit one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch
from torch import nn

from kdforge.config import LossSection, default
from kdforge.data.dataset import IGNORE, block_causal_mask
from kdforge.train import losses

PACKED_SDPA = "kdforge_packed_sdpa"
SEGMENTS = "kdforge_segments"  # decoder kwarg, passed down to attention: per row, its example lengths


def base_lm(model):
    """The underlying HF causal LM (unwrapping PEFT)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def segment_lengths(seq_ids: torch.Tensor) -> list[list[int]]:
    """Per packed row, the lengths of its runs of equal `seq_ids`: its examples, then its padding
    as one run (padding attends to padding; nothing real sees it)."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in seq_ids.cpu()]


def packed_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention, run on each packed example alone (causal within it) when
    the decoder got its lengths (`SEGMENTS`); otherwise, or where a layer asks for more than
    causal attention (sliding window, soft-capping, position bias, sinks), plain sdpa on the mask
    the model built from the position ids. Same result as that mask, without the work across
    examples. q, k, v: [B, heads, L, d]; returns [B, L, heads, d] like sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop(SEGMENTS, None)
    plain = (segments is None or args or query.shape[2] != key.shape[2]
             or kwargs.get("is_causal", getattr(module, "is_causal", True)) is False
             or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "position_bias", "s_aux")))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments, strict=True):
        parts = [sdpa_attention_forward(module, qs[None], ks[None], vs[None], None, **kwargs)[0]
                 for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


@functools.cache
def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # the fallback's mask: sdpa's


_MASKS_FROM_POSITIONS: dict[type, bool] = {}


def masks_from_positions(decoder) -> bool:
    """Whether the decoder builds its attention masks with transformers' `masking_utils`, which
    tells packed rows apart by their position ids when no attention mask is given."""
    cls = type(decoder)
    if cls not in _MASKS_FROM_POSITIONS:
        try:
            src = inspect.getsource(sys.modules[cls.__module__])
        except (OSError, TypeError, KeyError):
            src = ""
        _MASKS_FROM_POSITIONS[cls] = "masking_utils" in src and "position_ids" in src
    return _MASKS_FROM_POSITIONS[cls]


@contextlib.contextmanager
def _attention(config, name: str):
    """The decoder's attention implementation set to `name` for one forward."""
    if config._attn_implementation == name:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _hidden(lm, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    decoder = base_lm(lm).get_decoder()
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "seq_ids" not in batch:  # padded
        kwargs["attention_mask"] = batch["attention_mask"]
        return decoder(**kwargs).last_hidden_state
    kwargs["position_ids"] = batch["position_ids"]  # packed: positions restart at each example
    impl = decoder.config._attn_implementation
    if not masks_from_positions(decoder):
        kwargs["attention_mask"] = block_causal_mask(batch["seq_ids"], dtype if impl == "eager" else torch.bool)
        return decoder(**kwargs).last_hidden_state
    if impl not in ("sdpa", PACKED_SDPA):  # eager, flex, flash: the model's own packed masks / varlen
        return decoder(**kwargs).last_hidden_state
    _register_packed_sdpa()
    kwargs[SEGMENTS] = segment_lengths(batch["seq_ids"])
    with _attention(decoder.config, PACKED_SDPA):
        return decoder(**kwargs).last_hidden_state


def output_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits as the model itself computes them from its final hidden states: its own output layer
    (bias, LoRA and all), then the logit processing its config asks for. Rebuilding logits as
    hidden @ W.T drops a head bias (Phi) and final soft-capping (Gemma 2/3)."""
    base = base_lm(lm)
    return _process_logits(base.config, base.get_output_embeddings()(hidden))


def _process_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What Hugging Face causal LMs do to logits after the head, by config field (transformers 5)."""
    cfg = getattr(config, "text_config", None) or config
    kind = getattr(cfg, "model_type", "") or ""
    if kind.startswith("cohere") and getattr(cfg, "logit_scale", None):  # Cohere: logits * scale
        logits = logits * cfg.logit_scale
    if kind.startswith("granite") and getattr(cfg, "logits_scaling", None):  # Granite: logits / scaling
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _head_rows(model) -> int | None:
    """Rows of a causal LM's output layer (its logits' width); None if it has none we can read."""
    head = base_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if w is None:
        w = getattr(getattr(head, "base_layer", None), "weight", None)  # PEFT-wrapped head
    return int(w.shape[0]) if w is not None else None


def _selected(batch: dict) -> torch.Tensor:
    """[B, L-1] bool: the positions whose next token is a target (the causal shift)."""
    return batch["labels"][:, 1:] != IGNORE


class DistillObjective(nn.Module):
    """forward(batch) -> `losses.LossSums` (CE and KD sums, target and teacher-covered token
    counts) for one micro-batch.

    `teacher` (a local HF model, frozen) is held outside the module's parameters so DDP neither
    syncs nor broadcasts it. Build it from the config with `from_config(loss_section, lm, teacher)`.
    """

    AUTO_CHUNK = 256  # tokens per chunk in "auto" mode
    AUTO_THRESHOLD = 1 << 24  # labelled tokens x vocab above which "auto" chunks (16M fp32 logits, 64 MB)

    def __init__(self, lm, kind: str = default(LossSection, "kind"),
                 temperature: float = default(LossSection, "temperature"), beta: float = default(LossSection, "beta"),
                 chunk_size: int | str | None = default(LossSection, "chunk_size"), teacher=None):
        super().__init__()
        self.lm = lm
        self.kind = kind
        self.temperature = temperature
        self.beta = beta
        self.chunk_size = chunk_size
        self._teacher = [teacher]  # a list keeps it out of self.parameters()
        # A teacher with a wider (padded) vocabulary: its logits are cut to the student's ids, so
        # its distribution is renormalised over the ids both share (the rest only the teacher has).
        self._vocab = _head_rows(lm)
        self._teacher_vocab = _head_rows(teacher) if isinstance(teacher, nn.Module) else None

    def vocab_note(self) -> str | None:
        """One log line when the dense teacher has ids the student lacks (else None)."""
        tv, sv = self._teacher_vocab, self._vocab
        if tv is None or sv is None or tv <= sv:
            return None
        return (f"teacher.path has {tv:,} logits, the student {sv:,}: the {tv - sv:,} ids only the teacher has are "
                "dropped from its distribution (renormalised over the ids both share)")

    def _teacher_logits(self, teacher, h: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for hidden states `h`, on the student's ids."""
        logits = output_logits(teacher, h)
        return logits[..., :self._vocab] if self._vocab and logits.shape[-1] > self._vocab else logits

    @classmethod
    def from_config(cls, loss, lm, teacher=None) -> DistillObjective:
        """From the `loss` config section (kind, temperature, beta, chunk_size; its defaults)."""
        return cls(lm, loss.kind, loss.temperature, loss.beta, loss.chunk_size, teacher)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        """(target tokens, target tokens with teacher data) of a micro-batch, as forward counts them:
        the loop divides the step's sums by these, summed over micro-batches and ranks."""
        sel = _selected(batch)
        n = int(sel.sum())
        if self.kind == "ce":
            return n, 0
        if getattr(self._teacher[0], "cross_tokenizer", False):  # another tokenizer: rows carried by bytes
            batch = self._teacher[0].attach(batch)
        elif self._teacher[0] is not None or "topk_ids" not in batch:
            return n, n
        return n, int(((batch["topk_ids"][:, 1:] >= 0).any(dim=-1) & sel).sum())

    def forward(self, batch: dict) -> losses.LossSums:
        sel = _selected(batch)
        targets = batch["labels"][:, 1:][sel]
        dtype = next(self.lm.parameters()).dtype
        hidden = _hidden(self.lm, batch, dtype)
        h = hidden[:, :-1][sel]
        head = base_lm(self.lm).get_output_embeddings()
        chunk = self.chunk_size
        if chunk == "auto":
            chunk = self.AUTO_CHUNK if h.shape[0] * getattr(head, "out_features", 0) > self.AUTO_THRESHOLD else None
        # LoRA on lm_head (or any wrapped head) takes the plain path: logits of selected tokens only.
        chunked = bool(chunk) and type(head) is nn.Linear
        kw = dict(kind=self.kind, temperature=self.temperature, beta=self.beta)
        teacher = self._teacher[0]
        if getattr(teacher, "cross_tokenizer", False):  # train/cross_scoring.py: its top-K on our tokens
            batch, teacher = teacher.attach(batch), None
        if self.kind != "ce":
            if teacher is not None:
                with torch.no_grad():
                    th = _hidden(teacher, batch, dtype)[:, :-1][sel]
                if chunked:
                    kw.update(teacher_hidden=th, teacher_head=lambda x: self._teacher_logits(teacher, x))
                else:
                    with torch.no_grad():
                        kw.update(teacher_logits=self._teacher_logits(teacher, th))
            elif "topk_ids" in batch:
                ids = batch["topk_ids"][:, 1:][sel]
                kw.update(topk_ids=ids.clamp(min=0), topk_logprobs=batch["topk_logprobs"][:, 1:][sel],
                          topk_mask=ids >= 0)
            else:
                raise ValueError(f"loss.kind={self.kind} needs a teacher: teacher.path or top-k logprobs in the data")
        if chunked:
            return losses.chunked_loss_sums(h, None, targets, chunk_size=chunk,
                                            head=lambda x: output_logits(self.lm, x), **kw)
        return losses.loss_sums(output_logits(self.lm, h), targets, **kw)

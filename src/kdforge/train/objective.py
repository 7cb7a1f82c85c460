"""The distillation objective as a module: decoder -> selected hidden states -> loss sums.

Wrapping the whole loss in one `nn.Module` lets DDP see it as the forward pass, and lets the
loss read hidden states instead of full logits: only positions that carry a label are projected
onto the vocabulary, `chunk_size` tokens at a time (see `losses.chunked_loss_sums`).
"""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.dataset import IGNORE, block_causal_mask
from kdforge.train import losses


def base_lm(model):
    """The underlying HF causal LM (unwrapping PEFT)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _hidden(lm, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    decoder = base_lm(lm).get_decoder()
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "seq_ids" in batch:  # packed: restart positions, block-diagonal causal mask
        kwargs["position_ids"] = batch["position_ids"]
        kwargs["attention_mask"] = block_causal_mask(batch["seq_ids"], dtype)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return decoder(**kwargs).last_hidden_state


class DistillObjective(nn.Module):
    """forward(batch) -> (ce_sum, kd_sum, n_tokens) for one micro-batch.

    `teacher` (a local HF model, frozen) is held outside the module's parameters so DDP neither
    syncs nor broadcasts it.
    """

    AUTO_CHUNK = 256  # tokens per chunk in "auto" mode
    AUTO_THRESHOLD = 1 << 24  # labelled tokens x vocab above which "auto" chunks (16M fp32 logits, 64 MB)

    def __init__(self, lm, kind: str = "ce", temperature: float = 1.0, beta: float = 0.5,
                 chunk_size: int | str | None = "auto", teacher=None):
        super().__init__()
        self.lm = lm
        self.kind = kind
        self.temperature = temperature
        self.beta = beta
        self.chunk_size = chunk_size
        self._teacher = [teacher]  # a list keeps it out of self.parameters()

    def forward(self, batch: dict):
        labels = batch["labels"][:, 1:]
        sel = labels != IGNORE
        targets = labels[sel]
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
        if self.kind != "ce":
            if teacher is not None:
                with torch.no_grad():
                    th = _hidden(teacher, batch, dtype)[:, :-1][sel]
                    thead = base_lm(teacher).get_output_embeddings()
                if chunked:
                    kw.update(teacher_hidden=th, teacher_lm_head_weight=thead.weight)
                else:
                    with torch.no_grad():
                        kw.update(teacher_logits=thead(th))
            elif "topk_ids" in batch:
                ids = batch["topk_ids"][:, 1:][sel]
                kw.update(topk_ids=ids.clamp(min=0), topk_logprobs=batch["topk_logprobs"][:, 1:][sel],
                          topk_mask=ids >= 0)
            else:
                raise ValueError(f"loss.kind={self.kind} needs a teacher: teacher.path or top-k logprobs in the data")
        if chunked:
            s = losses.chunked_loss_sums(h, head.weight, targets, chunk_size=chunk,
                                         lm_head_bias=head.bias, **kw)
        else:
            s = losses.loss_sums(head(h), targets, **kw)
        return s.ce, s.kd, s.n_tokens

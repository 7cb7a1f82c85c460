"""Distillation losses: cross-entropy, forward KL, reverse KL and generalized JSD, as token SUMS.

Every function takes already-selected target positions (the loop flattens the batch, applies the
causal shift and keeps the positions whose label is not -100), so N = target tokens in the
micro-batch. Sums, not means, so that gradient accumulation is exact: `LossSums.loss` divides by the
token counts of the whole optimizer step (see its docstring). CE is divided by the target tokens; KD
by the target positions that HAVE teacher data (dense teacher: all of them; sparse: rows with a
stored top-k, so not the EOS nor CE-only records), so kd_weight means the same whatever the
teacher's coverage. All maths runs in fp32, in nats.

Divergences, with temperature T, p_T = softmax(teacher / T) and q_T = softmax(student / T):
  fkl = KL(p_T || q_T)                                        (mean-seeking, classic Hinton KD)
  rkl = KL(q_T || p_T)                                        (mode-seeking)
  jsd = beta * KL(p_T || m) + (1 - beta) * KL(q_T || m),  m = beta * p_T + (1 - beta) * q_T
each multiplied by T^2 so that gradient magnitudes do not shrink as 1/T^2 when T grows. beta = 0.5
is the symmetric Jensen-Shannon divergence. The endpoints follow TRL's generalized JSD
(GKDTrainer.generalized_jsd_loss) and GKD's reading of beta as the interpolation towards reverse KL:
beta = 0 is forward KL(p_T || q_T) and beta = 1 is reverse KL(q_T || p_T). (The mixture formula
itself is identically 0 there, since m equals one side; a silent 0 would train CE only.)
Cross-entropy is always at T = 1 on the target tokens.

The teacher is either dense logits [N, V] (a local model) or sparse: the top-K log-probs an API
returns for each position, which leave the rest of the teacher's mass unaccounted for.

Missing teacher mass (sparse top-k). Each position's vocabulary is split into K + 1 outcomes: the K
stored tokens and one "rest" bucket for every other token. The teacher's rest mass is
1 - sum(exp(stored log-probs)), known only to +- REST_EPS (1e-6) of probability because API log-probs
are rounded (and can sum past 1): within that band (clipped at 0) the teacher's rest takes the value
closest to the student's rest, with no gradient through it, so differences below the data's precision
teach nothing. The student's rest mass is its exact softmax mass outside the K ids (a logsumexp over
the complement, so no cancellation). Both bucket distributions are formed at T = 1 and then tempered as
distributions over K + 1 outcomes: log-mass / T, renormalised (so the rest bucket is tempered like one
more token, and the stored log-probs are renormalised with it). The divergence is taken between these
two (K + 1)-outcome distributions, x T^2. Consequences, all tested: at T = 1 this is the divergence
of the coarse-grained distributions, hence never larger than the dense one (data-processing
inequality); it is exactly 0 when the student equals the teacher, at any T, a near-certain teacher
(rest within rounding of 0) included; and when the K ids cover
the whole vocabulary the rest bucket is empty (mass exactly 0, not REST_EPS) and the loss equals the
dense loss at any T. Padding (topk_mask False) is removed from both distributions; ids within a row
must be distinct.

`chunked_loss_sums` computes the same sums from hidden states, chunk_size tokens at a time, with each
chunk's logits recomputed in backward (torch.utils.checkpoint), so [N, V] logits never exist at once
(torchtune's ForwardKLWithChunkedOutputLoss and Liger's fused linear losses are the references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("ce", "fkl", "rkl", "jsd")
# Precision of the teacher's rest mass (probability): within ~1e-6, 1 - sum(p_topk) is rounding of
# the API's numbers (and fp32), not information.
REST_EPS = 1e-6
# Log-prob floor: exp(LOG_FLOOR) is 0 in fp32. A KL that is truly infinite (p > 0 where q = 0) comes
# out huge (~1e30 * p) but finite.
LOG_FLOOR = -1e30


@dataclass
class LossSums:
    """One micro-batch's (or, summed, one step's) loss sums and the token counts that normalise them.

    KD is normalised by the positions that HAVE teacher data (n_kd_tokens), not by every target: EOS
    (APIs report no stop token) and CE-only records carry no teacher row, and counting them would
    shrink the effective kd_weight with the teacher's coverage. Dense teacher: every target position.
    """

    ce: torch.Tensor  # scalar, SUM over the n_tokens targets of cross-entropy (nats)
    kd: torch.Tensor  # scalar, SUM over the n_kd_tokens of the KD divergence (x T^2); 0 for kind="ce"
    n_tokens: int  # target tokens
    n_kd_tokens: int | None = None  # target tokens with teacher data; None = all of n_tokens

    def __iter__(self):
        """(ce, kd, n_tokens), for callers that unpack the older tuple form."""
        return iter((self.ce, self.kd, self.n_tokens))

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(self.ce + other.ce, self.kd + other.kd, self.n_tokens + other.n_tokens,
                        self.kd_count + other.kd_count)

    @property
    def kd_count(self) -> int:
        return self.n_tokens if self.n_kd_tokens is None else self.n_kd_tokens

    def loss(self, kd_weight: float, kind: str, n_tokens: int | None = None,
             n_kd_tokens: int | None = None) -> torch.Tensor:
        """The one combine rule, for backward and for the log alike:
        (1 - kd_weight) * ce / n_tokens + kd_weight * kd / n_kd_tokens for KL kinds, ce / n_tokens
        for "ce" (kd_weight ignored). The counts default to this object's own. Given the counts of
        the whole optimizer step (all micro-batches, all ranks), the sum of these over the
        micro-batches is the step's token-mean, whatever the split; a step without teacher data
        (n_kd_tokens 0) has kd 0 and trains CE alone at its (1 - kd_weight) weight."""
        if kind not in KINDS:
            raise ValueError(f"kind is {kind!r}; expected one of {', '.join(KINDS)}")
        n = self.n_tokens if n_tokens is None else n_tokens
        n_kd = self.kd_count if n_kd_tokens is None else n_kd_tokens
        if n <= 0:
            raise ValueError(f"n_tokens is {n}; a step with no target tokens has no loss, skip it")
        if kind == "ce":
            return self.ce / n
        return (1.0 - kd_weight) * self.ce / n + kd_weight * self.kd / max(n_kd, 1)

    def metrics(self, kd_weight: float, kind: str) -> dict[str, float]:
        """{"loss", "ce", "kd"?} token-means of summed (e.g. all-reduced) step totals, for the log."""
        out = {"loss": float(self.loss(kd_weight, kind)), "ce": float(self.ce) / self.n_tokens}
        if kind != "ce":
            out["kd"] = float(self.kd) / max(self.kd_count, 1)
        return out


# A pytree node, as the tuple it replaced was: DDP and FSDP find forward's output tensors by pytree
# flattening to hang their backward hooks on them.
torch.export.register_dataclass(LossSums, serialized_type_name="kdforge.train.losses.LossSums")


def loss_sums(student_logits, targets, *, kind="ce", temperature=1.0, beta=0.5,
              teacher_logits=None, topk_ids=None, topk_logprobs=None, topk_mask=None) -> LossSums:
    """Plain form: CE and KD sums over N selected tokens.

    student_logits [N, V] (any float dtype; computed in fp32), targets [N] long (no -100 left).
    Dense KD: teacher_logits [N, V] (never receives gradient). Sparse KD: topk_ids [N, K] long,
    topk_logprobs [N, K] (teacher log-probs at T = 1, as an API returns them), topk_mask [N, K] bool
    (False = padding; None = all valid). kind in KINDS; with "ce" the teacher is ignored and kd = 0.
    KL kinds need exactly one of the dense / sparse teacher. Raises ValueError naming what is wrong.
    """
    _check_args(kind, temperature, beta, teacher_logits is not None, topk_ids is not None)
    _check_shapes(student_logits.shape[0], targets, topk_ids, topk_logprobs, topk_mask)
    if teacher_logits is not None and kind != "ce" and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}; "
                         f"expected the student's {tuple(student_logits.shape)}")
    ce, kd = _sums(student_logits, targets, kind, temperature, beta,
                   teacher_logits, topk_ids, topk_logprobs, topk_mask)
    return LossSums(ce, kd, int(targets.shape[0]), _kd_count(kind, targets, topk_ids, topk_mask))


def chunked_loss_sums(hidden, lm_head_weight, targets, *, chunk_size=1024, kind="ce", temperature=1.0,
                      beta=0.5, teacher_hidden=None, teacher_lm_head_weight=None,
                      topk_ids=None, topk_logprobs=None, topk_mask=None, lm_head_bias=None,
                      teacher_lm_head_bias=None, head=None, teacher_head=None) -> LossSums:
    """Same result as loss_sums(F.linear(hidden, lm_head_weight, lm_head_bias), ...), chunked.

    hidden [N, D], lm_head_weight [V, D], lm_head_bias [V] or None. Dense KD: teacher_hidden [N, Dt]
    and teacher_lm_head_weight [V, Dt] (teacher_lm_head_bias [V] or None); teacher logits are
    computed per chunk under no_grad. `head` / `teacher_head`, callables hidden [n, D] -> logits
    [n, V], replace the weight-and-bias projection: the model's own output layer and logit
    processing (soft-capping, scaling), so the chunks equal what the model computes. Sparse KD: as
    in loss_sums. Each chunk of chunk_size tokens is checkpointed: its logits (student and teacher)
    are freed after the forward and recomputed in backward, so peak memory holds one chunk's
    [chunk_size, V] tensors, never [N, V]. The price is one extra lm_head (and teacher head) matmul
    per token in backward. Gradients reach hidden and the head's parameters.
    """
    dense = teacher_hidden is not None or teacher_lm_head_weight is not None or teacher_head is not None
    _check_args(kind, temperature, beta, dense, topk_ids is not None)
    _check_shapes(hidden.shape[0], targets, topk_ids, topk_logprobs, topk_mask)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size is {chunk_size!r}; expected a positive int (tokens per chunk)")
    if kind == "ce":
        teacher_hidden = teacher_lm_head_weight = teacher_head = topk_ids = topk_logprobs = topk_mask = None
    elif dense and (teacher_hidden is None or (teacher_lm_head_weight is None and teacher_head is None)):
        raise ValueError("dense KD needs teacher_hidden and teacher_lm_head_weight (or teacher_head)")
    elif dense and teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows; expected N = {hidden.shape[0]}")
    if topk_ids is not None and topk_mask is None:
        topk_mask = torch.ones_like(topk_ids, dtype=torch.bool)

    per_token = (targets, teacher_hidden, topk_ids, topk_logprobs, topk_mask)
    chunks = zip(hidden.split(chunk_size), *(_split(t, chunk_size, hidden.shape[0]) for t in per_token))
    fn = partial(_chunk_sums, kind=kind, temperature=temperature, beta=beta, head=head, teacher_head=teacher_head)
    ce_parts, kd_parts = [], []
    for h, tgt, th, ids, lps, mask in chunks:  # N = 0 still gives one (empty) chunk: a graph to backprop
        ce, kd = checkpoint(fn, h, lm_head_weight, lm_head_bias, tgt, th, teacher_lm_head_weight,
                            teacher_lm_head_bias, ids, lps, mask, use_reentrant=False, preserve_rng_state=False)
        ce_parts.append(ce)
        kd_parts.append(kd)
    return LossSums(torch.stack(ce_parts).sum(), torch.stack(kd_parts).sum(), int(targets.shape[0]),
                    _kd_count(kind, targets, topk_ids, topk_mask))


def combine(sums: LossSums, kd_weight: float, kind: str, n_global_tokens: int,
            n_global_kd_tokens: int | None = None) -> torch.Tensor:
    """The scalar to backprop for one micro-batch: `sums.loss(...)` with the step's global counts
    (n_global_kd_tokens None: the same as n_global_tokens, a dense teacher)."""
    return sums.loss(kd_weight, kind, n_global_tokens,
                     n_global_tokens if n_global_kd_tokens is None else n_global_kd_tokens)


# ----------------------------------------------------------------------------- internals


def _check_args(kind, temperature, beta, dense: bool, sparse: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind is {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "ce":
        return
    if dense == sparse:
        got = "both" if dense else "neither"
        raise ValueError(f"kind={kind!r} needs exactly one teacher, dense logits or top-k log-probs; got {got}")
    if not temperature > 0:
        raise ValueError(f"temperature is {temperature}; expected > 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta is {beta}; expected 0 <= beta <= 1 (0.5 = symmetric JSD)")


def _check_shapes(n: int, targets, topk_ids, topk_logprobs, topk_mask) -> None:
    if targets.shape != (n,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected ({n},), one per selected token")
    if topk_ids is None:
        return
    if topk_logprobs is None:
        raise ValueError("topk_ids given without topk_logprobs")
    for name, t in (("topk_logprobs", topk_logprobs), ("topk_mask", topk_mask)):
        if t is not None and t.shape != topk_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected topk_ids' {tuple(topk_ids.shape)}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected ({n}, K)")


def _kd_count(kind, targets, topk_ids, topk_mask) -> int:
    """Target positions with teacher data: all of them for a dense teacher; sparse, the rows that
    hold at least one stored id (a row of padding only, e.g. EOS, has no teacher data)."""
    if kind == "ce":
        return 0
    if topk_ids is None or topk_mask is None:
        return int(targets.shape[0])
    return int(topk_mask.any(dim=1).sum())


def _split(t, chunk_size: int, n: int) -> list:
    """t.split(chunk_size) along tokens, or one None per chunk when t is absent."""
    if t is None:
        return [None] * max(1, math.ceil(n / chunk_size))
    return list(t.split(chunk_size))


def _chunk_sums(h, weight, bias, targets, teacher_h, teacher_weight, teacher_bias, ids, lps, mask, *,
                kind, temperature, beta, head, teacher_head):
    teacher = None
    if teacher_h is not None:
        with torch.no_grad():
            teacher = (teacher_head(teacher_h) if teacher_head is not None
                       else F.linear(teacher_h, teacher_weight, teacher_bias))
    logits = head(h) if head is not None else F.linear(h, weight, bias)
    return _sums(logits, targets, kind, temperature, beta, teacher, ids, lps, mask)


def _sums(student_logits, targets, kind, temperature, beta, teacher_logits, topk_ids, topk_logprobs, topk_mask):
    """(ce_sum, kd_sum) as fp32 scalars; the one implementation behind both public forms."""
    s = student_logits.float()
    logq1 = F.log_softmax(s, dim=-1)  # student log-probs at T = 1: CE, and sparse buckets
    ce = -logq1.gather(1, targets[:, None]).sum()
    if kind == "ce":
        return ce, s.new_zeros(())
    if teacher_logits is not None:
        logq = logq1 if temperature == 1 else F.log_softmax(s / temperature, dim=-1)
        t = teacher_logits.detach().float()
        logp = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
    else:
        logp, logq = _bucket_logprobs(logq1, topk_ids, topk_logprobs.detach(), topk_mask, temperature)
    kd = _divergence(logp, logq, kind, beta).sum() * temperature**2
    return ce, kd


def _bucket_logprobs(logq1, ids, teacher_lp, mask, temperature):
    """Tempered (K + 1)-bucket log-probs (teacher, student), each [N, K + 1]; see the module docstring."""
    ids = ids.long()
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    # Which vocab entries are stored for each row; padding ids (mask False) do not count.
    in_topk = torch.zeros_like(logq1).scatter_add_(1, ids, mask.to(logq1.dtype)) > 0
    has_rest = ~in_topk.all(dim=1)
    # Student rest: log of its mass outside the ids. Rows with an empty rest keep their logits unmasked
    # so the logsumexp stays finite (an all -inf logsumexp has a NaN gradient); their rest is then -inf.
    rest_q = torch.logsumexp(logq1.masked_fill(in_topk & has_rest[:, None], -math.inf), dim=1)
    rest_q = rest_q.masked_fill(~has_rest, -math.inf)
    top_q = logq1.gather(1, ids).masked_fill(~mask, -math.inf)
    # Teacher rest: 1 - sum(p_topk). Stored log-probs are rounded (an API's digits, fp32), so the rest
    # is known only to +- REST_EPS of probability: within that band the value closest to the
    # student's rest is taken (no gradient through it). A student whose rest already agrees with the
    # teacher's to that precision is pushed nowhere, at any temperature (a near-certain teacher's
    # rest is all rounding: tempering a floored 1e-6 like a token gave 5.7e-3 nats/token at T = 2).
    top_p = teacher_lp.float().masked_fill(~mask, -math.inf)
    stored = torch.logsumexp(top_p.double(), dim=1)  # log sum(p_topk), <= ~0; float64: no cancellation
    raw = torch.clamp(-torch.expm1(stored), min=0.0)  # may be 0: the stored mass rounds to (or past) 1
    near = torch.minimum(torch.maximum(rest_q.detach().double().exp(), raw - REST_EPS), raw + REST_EPS)
    rest_p = torch.log(near).float().masked_fill(~has_rest, -math.inf)
    logp = F.log_softmax(torch.cat([top_p, rest_p[:, None]], dim=1) / temperature, dim=1)
    logq = F.log_softmax(torch.cat([top_q, rest_q[:, None]], dim=1) / temperature, dim=1)
    return logp, logq


def _divergence(logp, logq, kind, beta):
    """Per-row divergence [N] between log-prob rows p (teacher) and q (student)."""
    # Zero-probability outcomes (padding, an empty rest bucket, -inf logits) are floored to LOG_FLOOR:
    # exp() of it is exactly 0 and floor - floor = 0, so they contribute exactly 0 with zero gradient,
    # where -inf would give 0 * (-inf) = NaN (and NaN gradients through logaddexp).
    logp, logq = logp.clamp(min=LOG_FLOOR), logq.clamp(min=LOG_FLOOR)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):  # TRL: jsd at beta 0 is forward KL
        return _kl(logp, logq)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):  # and at beta 1 reverse KL
        return _kl(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def _kl(logp, logq):
    """KL(p || q) per row, in nats, from floored log-probs."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)

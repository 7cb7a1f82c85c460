"""Choosing the next token for each row of a batch, and the logprobs the API reports.

Promises:
- temperature 0 is greedy (argmax, first index on ties, as `model.generate` does);
- with a `seed`, a request samples the same tokens whatever else shares its batch: each request
  draws from its own `torch.Generator`;
- logprobs are the model's log-softmax of the raw logits at temperature 1, in fp32, whatever
  the sampling temperature, top_p, top_k, penalties or logit_bias (what OpenAI reports, and
  vLLM's default `raw_logprobs`);
- the logits processors a request asks for (`RowLogits`: logit_bias, presence / frequency /
  repetition penalties, min_tokens) shape the logits a token is chosen from, greedy included.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. `max_tokens` counts every sampled token, eos included; 0 (with
    `prompt_logprobs`) scores the prompt and samples nothing."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, 0..20 (needs logprobs)
    prompt_logprobs: int | None = None  # score the prompt's own tokens with this many alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    repetition_penalty: float = 1.0  # vLLM / transformers: over prompt and generated tokens
    top_k: int = 0  # vLLM: sample among the k most likely tokens; 0 (or -1): all
    min_tokens: int = 0  # vLLM: eos (and stop strings) cannot end generation before this many tokens
    ignore_eos: bool = False  # vLLM: eos is a token like any other; generation runs to max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def shapes_logits(self) -> bool:
        """Whether a row needs its own logits processors (`RowLogits`)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """One token: its id, its logprob, the `top` best (id, logprob), best first, and (prompt
    tokens) its rank in the whole vocabulary, 1 = the most likely."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


class RowLogits:
    """One row's logits processors and the token history they read. transformers' own
    processors where it has them (repetition penalty, min new tokens); OpenAI's presence and
    frequency penalties and logit_bias as OpenAI documents them (on the generated tokens only)."""

    def __init__(self, p: SamplingParams, prompt_ids: list[int], eos_ids: frozenset[int], device: torch.device):
        from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

        self.p = p
        self.ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # prompt + generated
        self.n_prompt = len(prompt_ids)
        self.procs = []
        if p.repetition_penalty != 1.0:
            self.procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if p.min_tokens and eos_ids and not p.ignore_eos:
            self.procs.append(MinNewTokensLengthLogitsProcessor(self.n_prompt, p.min_tokens, sorted(eos_ids),
                                                                device=str(device)))
        self.bias = None
        if p.logit_bias:
            self.bias_ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=device)
            self.bias = torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) fp32 logits -> the logits to choose this row's next token from."""
        scores = logits[None].clone()
        for proc in self.procs:
            scores = proc(self.ids, scores)
        if self.p.presence_penalty or self.p.frequency_penalty:
            counts = torch.bincount(self.ids[0, self.n_prompt:], minlength=scores.shape[-1])[:scores.shape[-1]]
            scores -= self.p.frequency_penalty * counts + self.p.presence_penalty * (counts > 0)
        if self.bias is not None:
            scores[0].index_add_(0, self.bias_ids, self.bias)
        return scores[0]

    def seen(self, token_id: int) -> None:
        """The row sampled `token_id`: it is part of the history from the next step on."""
        self.ids = torch.cat([self.ids, self.ids.new_tensor([[token_id]])], dim=1)


def shaped_logits(logits: torch.Tensor, shapers: list[RowLogits | None]) -> torch.Tensor:
    """The logits tokens are chosen from: `logits` itself unless some row has processors (then a
    copy with those rows shaped; the raw logits stay for the logprobs)."""
    if not any(shapers):
        return logits
    out = logits.clone()
    for i, sh in enumerate(shapers):
        if sh is not None:
            out[i] = sh(logits[i])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if 0 < p.top_k < logits.shape[-1]:
        from transformers import TopKLogitsWarper

        logits = TopKLogitsWarper(p.top_k)(None, logits[None])[0]
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (at least one).
        sp, si = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < p.top_p
        keep[0] = True
        return int(si[torch.multinomial(sp * keep, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row: (B, V) fp32 logits -> (B,) long token ids."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, gens[i])
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """The logprob of each chosen token and its row's top alternatives (None where a row did not
    ask for logprobs). One log-softmax over the batch, one device->host copy."""
    want = [p.logprobs for p in params]
    if not any(want):
        return [None] * len(params)
    lp = torch.log_softmax(logits.float(), dim=-1)  # temperature 1, fp32
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(p.top_logprobs for p in params)
    top_v, top_i = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    toks = tokens.tolist()
    out: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        if not p.logprobs:
            out.append(None)
            continue
        n = p.top_logprobs
        out.append(TokenLogprob(toks[i], chosen[i], tuple(zip(top_i[i][:n], top_v[i][:n]))))
    return out


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Score a prompt's own tokens: `logits` (T, V) are the model's outputs at the prompt's T
    positions; token j is scored by position j-1, so the first token has no logprob (None). fp32
    log-softmax at temperature 1, as for sampled tokens; one device->host copy per field."""
    if len(ids) < 2:
        return [None] * len(ids)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T-1, V)
    target = torch.tensor(ids[1:], device=lp.device)[:, None]
    chosen = lp.gather(1, target)
    rank = ((lp > chosen).sum(-1) + 1).tolist()  # 1 + tokens strictly more likely
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i, chosen = top_v.tolist(), top_i.tolist(), chosen[:, 0].tolist()
    return [None] + [TokenLogprob(t, c, tuple(zip(ti, tv)), r)
                     for t, c, ti, tv, r in zip(ids[1:], chosen, top_i, top_v, rank)]

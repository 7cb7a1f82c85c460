"""Response bodies in OpenAI's shapes, built from engine output (`Delta`s).

- chat logprobs: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": null}`;
- completions (legacy) logprobs: `{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}], "text_offset"}`, where each top dict also holds the sampled token, as OpenAI's does.
"""

from __future__ import annotations

import math

from kdforge.serve.sampling import TokenLogprob
from kdforge.serve.vocab import Vocab

_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports this for impossible tokens


def _lp(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


def chat_logprobs(lps: list[TokenLogprob], vocab: Vocab) -> dict:
    def entry(tid: int, lp: float) -> dict:
        return {"token": vocab.text(tid), "logprob": _lp(lp), "bytes": vocab.bytes(tid)}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in lps],
            "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], vocab: Vocab, offset: int) -> dict:
    """`offset`: characters of this choice's text already sent (text_offset of the first token)."""
    tokens, offsets, top = [], [], []
    for t in lps:
        tokens.append(vocab.text(t.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
        alts = {vocab.text(i): _lp(v) for i, v in t.top}
        alts.setdefault(tokens[-1], _lp(t.logprob))
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": [_lp(t.logprob) for t in lps], "top_logprobs": top,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

"""Response bodies in OpenAI's shapes, built from engine output (`Delta`s).

- chat logprobs: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": null}`;
- completions (legacy) logprobs: `{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}], "text_offset"}`, where each top dict also holds the sampled token, as OpenAI's does,
  plus `tokens_bytes` (each token's raw bytes: the legacy format has no `bytes`, and a token that
  is a fragment of a UTF-8 character has no exact text); with `echo`, the prompt's tokens come
  first, `null` in `token_logprobs` / `top_logprobs` for the first (nothing predicts it);
- vLLM's `prompt_logprobs`: `[null, {"<token id>": {"logprob", "rank", "decoded_token"}}, ...]`,
  each dict holding the prompt's own token and its top-K alternatives.

`ChatFormat` and `TextFormat` turn a request's deltas into choices, whole or streamed chunks.
"""

from __future__ import annotations

import codecs
import math

from kdforge.serve.output import Delta
from kdforge.serve.sampling import TokenLogprob
from kdforge.serve.schemas import ChatCompletionRequest, CompletionRequest
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


def completion_logprobs(lps: list[TokenLogprob], vocab: Vocab, offset: int,
                        eos: TokenLogprob | None = None) -> dict:
    """`offset`: characters of this choice's text already sent (text_offset of the first token).
    `eos`: the end-of-sequence token that ended generation: listed last, as OpenAI and vLLM do
    (its text is not in the completion, so its offset is the text's end)."""
    lps = lps + [eos] if eos is not None else lps
    tokens, offsets, top = [], [], []
    for t in lps:
        tokens.append(vocab.text(t.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
        alts = {vocab.text(i): _lp(v) for i, v in t.top}
        alts.setdefault(tokens[-1], _lp(t.logprob))
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": [_lp(t.logprob) for t in lps], "top_logprobs": top,
            "text_offset": offsets, "tokens_bytes": [vocab.bytes(t.token_id) for t in lps]}


def echo(ids: list[int], scored: list[TokenLogprob | None] | None, vocab: Vocab, k: int) -> tuple[str, dict]:
    """The prompt's text and its legacy logprobs. The text is the tokens' bytes decoded in order,
    so `text_offset` points into exactly what is echoed: a token's offset is the first character
    it contributes to (a continuation fragment of a character shares that character's offset)."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    text, tokens, offsets, lps, top = "", [], [], [], []
    for tid, s in zip(ids, scored or [None] * len(ids)):
        offsets.append(len(text))
        text += dec.decode(bytes(vocab.bytes(tid)))
        tokens.append(vocab.text(tid))
        lps.append(None if s is None else _lp(s.logprob))
        if s is None:
            top.append(None)
        else:
            alts = {vocab.text(i): _lp(v) for i, v in s.top[:k]}
            alts.setdefault(tokens[-1], _lp(s.logprob))
            top.append(alts)
    text += dec.decode(b"", final=True)
    return text, {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets,
                  "tokens_bytes": [vocab.bytes(t) for t in ids]}


def joined(a: dict, b: dict) -> dict:
    """Two legacy logprobs objects one after the other (the echoed prompt, then the completion)."""
    return {k: a[k] + b[k] for k in a}


def prompt_logprobs(scored: list[TokenLogprob | None], vocab: Vocab, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, its own entry then its `k` best alternatives."""
    out: list[dict | None] = []
    for s in scored:
        if s is None:
            out.append(None)
            continue
        d = {str(s.token_id): {"logprob": _lp(s.logprob), "rank": s.rank, "decoded_token": vocab.text(s.token_id)}}
        for r, (i, v) in enumerate(s.top[:k], 1):
            d.setdefault(str(i), {"logprob": _lp(v), "rank": r, "decoded_token": vocab.text(i)})
        out.append(d)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatFormat:
    """Choices of a chat completion (`/v1/chat/completions`): whole, or as streamed chunks."""

    object, prefix = "chat.completion", "chatcmpl-"

    def __init__(self, req: ChatCompletionRequest, vocab: Vocab):
        self.req, self.vocab = req, vocab

    def choice(self, index: int, delta: Delta) -> dict:
        out = {"index": index, "message": {"role": "assistant", "content": delta.text},
               "logprobs": chat_logprobs(delta.logprobs, self.vocab) if self.req.logprobs else None,
               "finish_reason": delta.finish_reason}
        return out | ({"token_ids": delta.token_ids} if self.req.return_token_ids else {})

    def opening(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk(self, index: int, delta: Delta) -> dict:
        out = {"index": index, "delta": {"content": delta.text},
               "logprobs": chat_logprobs(delta.logprobs, self.vocab) if self.req.logprobs else None,
               "finish_reason": delta.finish_reason}
        return out | ({"token_ids": delta.token_ids} if self.req.return_token_ids else {})


class TextFormat:
    """Choices of a legacy completion (`/v1/completions`), echo and prompt logprobs included."""

    object, prefix = "text_completion", "cmpl-"

    def __init__(self, req: CompletionRequest, vocab: Vocab, job_prompts: list[list[int]]):
        self.req, self.vocab, self.job_prompts = req, vocab, job_prompts
        self.sent: dict[int, int] = {}  # choice -> characters sent so far (text_offset), echo included

    def choice(self, index: int, delta: Delta) -> dict:
        """A choice's first delta (the whole of it, unless streamed) carries the echoed prompt."""
        req, text, logprobs, extra = self.req, delta.text, None, {}
        if index not in self.sent:
            self.sent[index] = 0
            if req.echo:
                prompt_text, logprobs = echo(self.job_prompts[index], delta.prompt_logprobs, self.vocab,
                                             req.logprobs or 0)
                text, self.sent[index] = prompt_text + text, len(prompt_text)
            if req.prompt_logprobs is not None:
                extra["prompt_logprobs"] = prompt_logprobs(delta.prompt_logprobs, self.vocab, req.prompt_logprobs)
        eos_id, eos_logprob = delta.eos or (None, None)
        if req.logprobs is not None:
            generated = completion_logprobs(delta.logprobs, self.vocab, self.sent[index], eos_logprob)
            logprobs = joined(logprobs, generated) if logprobs else generated
        else:
            logprobs = None
        self.sent[index] += len(delta.text)
        out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason} | extra
        # the eos was generated (usage counts it): its id is listed too, as vLLM does
        ids = delta.token_ids + ([eos_id] if eos_id is not None else [])
        return out | ({"token_ids": ids} if req.return_token_ids else {})

    def opening(self, index: int) -> dict | None:
        return None

    chunk = choice

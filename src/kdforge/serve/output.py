"""From sampled tokens to the text a client sees: decoding, stop strings, eos, max_tokens.

One `SequenceOutput` per generating sequence. Each sampled token goes in through `add`; out
comes a `Delta` with the text (and tokens) that can be released now. Text is held back while
it could still be the start of a stop string, or ends in an incomplete UTF-8 character. The
streamed deltas of a request concatenate to exactly the non-streamed text, because the
non-streamed response is built from the same deltas.

Conventions (as vLLM and OpenAI): the eos token ends generation with finish_reason "stop" and is
not part of the text, but it was generated: the last delta names it (`eos`, with its logprob), and
the legacy completions format lists it among the tokens, as OpenAI and vLLM do (lm-eval reads
`token_logprobs[ctxlen:-1]`, dropping exactly that entry); a stop string ends generation the same
way and neither it nor anything after it is returned; `completion_tokens` counts every sampled
token, the eos included. Before `min_tokens` tokens no stop string ends generation (vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kdforge.serve.sampling import SamplingParams, TokenLogprob

REPLACEMENT = "\ufffd"  # what decoding shows for bytes of a character not yet complete


@dataclass
class Delta:
    """Output released in one go. `token_ids`/`logprobs` are the tokens whose text is in `text`
    (logprobs empty unless asked for). `finish_reason` is set on a request's last delta."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # sampled so far, eos included
    # The prompt's own tokens scored (None first: nothing predicts the first token); only on a
    # request's first delta, and only when its params ask for `prompt_logprobs`.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # The eos token that ended generation (on the last delta only): id and logprob (None if not asked).
    eos: tuple[int, TokenLogprob | None] | None = None

    @classmethod
    def join(cls, deltas: list["Delta"]) -> "Delta":
        """Consecutive deltas of one request as one (all of them: the whole output)."""
        last = deltas[-1]
        return cls("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                   [lp for d in deltas for lp in d.logprobs], last.finish_reason, last.prompt_tokens,
                   last.completion_tokens, deltas[0].prompt_logprobs, last.eos)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class SequenceOutput:
    """Tracks one sequence's generated tokens and what of them has been released."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, eos_ids: frozenset[int],
                 decode: Callable[[list[int]], str]):
        self.params = params
        self.prompt_tokens = prompt_tokens
        self._eos = eos_ids
        self._decode = decode
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self.ids: list[int] = []  # generated, eos excluded
        self._lps: list[TokenLogprob | None] = []
        self._ends: list[int | None] = []  # text length once token k is in; None while unsure
        self._settled = 0  # _ends[:_settled] are all set (one pass per token, not per sequence)
        self.text = ""
        self.sampled = 0  # every sampled token, eos included
        self._sent_chars = 0
        self._sent_tokens = 0
        self.finish_reason: str | None = None
        self._eos_hit: tuple[int, TokenLogprob | None] | None = None

    def add(self, token_id: int, lp: TokenLogprob | None) -> Delta | None:
        """Take one sampled token; return what can be released (None if nothing yet)."""
        assert self.finish_reason is None, "sequence already finished"
        self.sampled += 1
        if token_id in self._eos:
            self._eos_hit = (token_id, lp)
            return self._finish("stop", len(self.text), len(self.ids))
        self.ids.append(token_id)
        self._lps.append(lp)
        self.text = self._decode(self.ids)
        self._ends.append(None)
        if not self.text.endswith(REPLACEMENT):  # every pending token's text is now settled
            for k in range(self._settled, len(self._ends)):  # the unsettled ones are a suffix
                self._ends[k] = len(self.text)
            self._settled = len(self._ends)
        if self._max_stop and self.sampled >= self.params.min_tokens:
            cut = _find_stop(self.text, self.params.stop, max(0, self._sent_chars - self._max_stop + 1))
            if cut is not None:
                # Keep the tokens that start before the stop string.
                starts = [0] + [len(self.text) if e is None else e for e in self._ends[:-1]]
                keep = sum(1 for s in starts if s < cut)
                return self._finish("stop", cut, keep)
        if self.sampled >= self.params.max_tokens:
            return self._finish("length", len(self.text), len(self.ids))
        safe = len(self.text.rstrip(REPLACEMENT))
        safe -= _stop_prefix_len(self.text[:safe], self.params.stop) if self._max_stop else 0
        n_tok = self._sent_tokens
        while n_tok < len(self._ends) and self._ends[n_tok] is not None and self._ends[n_tok] <= safe:
            n_tok += 1
        return self._release(safe, n_tok)

    def _finish(self, reason: str, cut: int, keep_tokens: int) -> Delta:
        self.finish_reason = reason
        self.text = self.text[:cut]
        del self.ids[keep_tokens:], self._lps[keep_tokens:]
        return self._release(cut, keep_tokens, force=True)

    def _release(self, end_char: int, end_tok: int, force: bool = False) -> Delta | None:
        end_char = max(end_char, self._sent_chars)
        if end_char == self._sent_chars and end_tok == self._sent_tokens and not force:
            return None
        d = Delta(self.text[self._sent_chars:end_char], self.ids[self._sent_tokens:end_tok],
                  [lp for lp in self._lps[self._sent_tokens:end_tok] if lp is not None],
                  self.finish_reason, self.prompt_tokens, self.sampled,
                  eos=self._eos_hit if self.finish_reason else None)
        self._sent_chars, self._sent_tokens = end_char, end_tok
        return d


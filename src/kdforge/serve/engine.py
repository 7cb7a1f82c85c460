"""The batching generation engine: one background thread runs every request on the model.

The loop: take the waiting requests (up to `max_batch_size` rows), prefill them as one
left-padded batch, then step every row together, one token per forward pass, with the KV cache.
Each row finishes at its own eos / stop string / max_tokens and leaves the batch; requests that
arrive meanwhile are prefilled and join the running batch before the next step (continuous
batching). One forward pass serves every active row, so throughput grows with concurrency.

Batch API rows (`submit(..., low=True)`) wait in a second queue that is served only when no
online request waits: they fill the batch's spare rows and never delay an online request's start.

Padding never changes a row's tokens: prompts are padded on the left with an attention mask
that hides the padding and position ids that count only real tokens.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from kdforge.serve.kv_batch import KVBatch, merge, reshapable, select
from kdforge.serve.output import Delta, SequenceOutput
from kdforge.serve.sampling import (RowLogits, SamplingParams, choose_tokens, make_generator,
                                    prompt_token_logprobs, shaped_logits, token_logprobs)
from kdforge.serve.vocab import Vocab

Emit = Callable[[object], None]  # called from the engine thread with a Delta or an Exception


@dataclass
class EngineStats:
    """Counters of what the engine did (read by `/stats` and the tests: behaviour, not timing)."""

    requests: int = 0  # tickets submitted
    rows_finished: int = 0  # rows that ran to eos / stop / max_tokens (scoring-only ones too)
    rows_cancelled: int = 0  # rows dropped because their client went away
    decode_steps: int = 0
    prefills: int = 0
    prompt_tokens_scored: int = 0
    rows_per_step: dict[int, int] = field(default_factory=dict)  # batch size -> decode steps run at it
    active_rows: int = 0
    waiting: int = 0


class Ticket:
    """A submitted request. `cancel()` (e.g. the client went away) drops it at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Emit, incremental: bool = True):
        if not prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.incremental = incremental  # False: one Delta with the whole output, at the end
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    ticket: Ticket
    out: SequenceOutput
    gen: torch.Generator
    held: list[Delta] = field(default_factory=list)  # deltas of a non-incremental ticket
    prompt_logprobs: list | None = None  # goes out with the row's first delta
    shaper: RowLogits | None = None  # the row's logits processors (penalties, logit_bias, min_tokens)

    def release(self, delta: Delta) -> None:
        if self.prompt_logprobs is not None:
            delta.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        if self.ticket.incremental:
            self.ticket.emit(delta)
            return
        self.held.append(delta)  # one wake-up of the caller per request, not per token
        if delta.finish_reason is not None:
            self.ticket.emit(Delta.join(self.held))


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's eos and the model's generation config's."""
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return frozenset(ids)


class Engine:
    """Owns the model; `submit`/`generate`/`stats` may be called from any thread."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        # Its own tokenizer copy: the HTTP thread tokenizes prompts with the original meanwhile.
        self._decode = Vocab(copy.deepcopy(tokenizer)).decode
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.max_batch_size = max_batch_size
        # Only the last position's logits are needed: (B, 1, V), not (B, T, V).
        self._keep = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters
                      else {})
        self._waiting: deque[Ticket] = deque()
        self._low: deque[Ticket] = deque()  # Batch API rows: taken only when _waiting is empty
        self._stats = EngineStats()
        self._active = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="kdforge-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    def stats(self) -> dict:
        """A snapshot of the counters (safe from any thread)."""
        with self._cv:
            self._stats.waiting = len(self._waiting) + len(self._low)
        self._stats.active_rows = self._active
        d = dict(vars(self._stats))
        d["rows_per_step"] = dict(d["rows_per_step"])
        return d

    def submit(self, requests: list[tuple[list[int], SamplingParams, Emit]],
               incremental: bool = True, low: bool = False) -> list[Ticket]:
        """Queue requests together (they start in the same batch when there is room). Each
        `emit` gets Deltas as text is released (or, not `incremental`, one at the end), or an
        Exception. `low`: background work (Batch API rows), started only when nothing else waits."""
        tickets = [Ticket(ids, p, emit, incremental) for ids, p, emit in requests]
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            (self._low if low else self._waiting).extend(tickets)
            self._stats.requests += len(tickets)
            self._cv.notify()
        return tickets

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 timeout: float | None = None) -> list[Delta]:
        """Blocking: run `prompts` (submitted together, so batched) and return their outputs."""
        results: list[list] = [[] for _ in prompts]
        left = threading.Semaphore(0)

        def emitter(i: int) -> Emit:
            def emit(ev: object) -> None:
                results[i].append(ev)
                if isinstance(ev, BaseException) or ev.finish_reason is not None:
                    left.release()
            return emit

        self.submit([(ids, params, emitter(i)) for i, ids in enumerate(prompts)], incremental=False)
        for _ in prompts:
            if not left.acquire(timeout=timeout):
                raise TimeoutError(f"generation did not finish within {timeout}s")
        for r in results:
            if isinstance(r[-1], BaseException):
                raise r[-1]
        return [r[-1] for r in results]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- the worker thread ------------------------------------------------------------------

    def _take(self, room: int, block: bool) -> list[Ticket]:
        with self._cv:
            if block and not self._waiting and not self._low and not self._closed:
                self._cv.wait(timeout=0.5)
            out = []
            for queue in (self._waiting, self._low):  # online first
                while queue and len(out) < room:
                    t = queue.popleft()
                    if not t.cancelled:
                        out.append(t)
                    else:
                        self._stats.rows_cancelled += 1
            return out

    def _loop(self) -> None:
        # inference_mode (per thread, like grad mode): no autograd bookkeeping (version counters,
        # view tracking) on the ~30 small ops per layer a decode step runs; nothing the engine
        # makes ever reaches autograd.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        batch: KVBatch | None = None
        rows: list[_Row] = []
        while not self._closed:
            joinable = batch is None or reshapable(batch.cache)
            new = self._take(self.max_batch_size - len(rows), block=batch is None) if joinable else []
            if new:
                try:
                    nb, nrows = self._prefill(new)
                except Exception as e:  # noqa: BLE001 - report to the requests, keep serving
                    self._fail(new, e)
                    continue
                if nb is not None:
                    batch, rows = (nb, nrows) if batch is None else (merge(batch, nb), rows + nrows)
            self._active = len(rows)
            if batch is None:
                continue
            try:
                batch, rows = self._step(batch, rows)
            except Exception as e:  # noqa: BLE001
                self._fail([r.ticket for r in rows], e)
                batch, rows = None, []
            self._active = len(rows)
        self._fail([r.ticket for r in rows] + list(self._waiting) + list(self._low),
                   RuntimeError("server shutting down"))

    @staticmethod
    def _fail(tickets: list[Ticket], err: Exception) -> None:
        for t in tickets:
            t.emit(err)

    def _prefill(self, tickets: list[Ticket]) -> tuple[KVBatch | None, list[_Row]]:
        """One forward over the new prompts. Rows that score their prompt get it from the same
        pass (full logits then, not just the last position); score-only rows (max_tokens 0)
        finish here and never join the decode batch."""
        n, t = len(tickets), max(len(tk.prompt_ids) for tk in tickets)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        for i, tk in enumerate(tickets):  # left padding: real tokens end at the last column
            ids[i, t - len(tk.prompt_ids):] = torch.tensor(tk.prompt_ids)
            mask[i, t - len(tk.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scoring = any(tk.params.prompt_logprobs is not None for tk in tickets)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                         **({} if scoring else self._keep))
        self._stats.prefills += 1
        batch = KVBatch(out.past_key_values, mask, mask.sum(-1), out.logits[:, -1].float())
        rows, keep = [], []
        for i, tk in enumerate(tickets):
            scored = None
            if tk.params.prompt_logprobs is not None:
                scored = prompt_token_logprobs(out.logits[i, t - len(tk.prompt_ids):], tk.prompt_ids,
                                               tk.params.prompt_logprobs)
                self._stats.prompt_tokens_scored += len(tk.prompt_ids)
            if tk.params.max_tokens == 0:  # scored, nothing to sample: done
                tk.emit(Delta("", finish_reason="length", prompt_tokens=len(tk.prompt_ids), prompt_logprobs=scored))
                self._stats.rows_finished += 1
                continue
            keep.append(i)
            p = tk.params
            out = SequenceOutput(p, len(tk.prompt_ids), frozenset() if p.ignore_eos else self.eos_ids, self._decode)
            shaper = RowLogits(p, tk.prompt_ids, self.eos_ids, self.device) if p.shapes_logits else None
            rows.append(_Row(tk, out, make_generator(p.seed, self.device), prompt_logprobs=scored, shaper=shaper))
        if not keep:
            return None, []
        return (batch if len(keep) == n else select(batch, keep)), rows

    def _step(self, batch: KVBatch, rows: list[_Row]) -> tuple[KVBatch | None, list[_Row]]:
        """Sample one token per row, release outputs, drop finished rows, run the next forward."""
        params = [r.ticket.params for r in rows]
        # Tokens come from the shaped logits; logprobs stay the model's own (raw) ones.
        tokens = choose_tokens(shaped_logits(batch.logits, [r.shaper for r in rows]), params, [r.gen for r in rows])
        lps = token_logprobs(batch.logits, tokens, params)
        keep = []
        for i, (row, tok, lp) in enumerate(zip(rows, tokens.tolist(), lps)):
            if row.ticket.cancelled:
                self._stats.rows_cancelled += 1
                continue
            if row.shaper is not None:
                row.shaper.seen(tok)
            delta = row.out.add(tok, lp)
            if delta is not None:
                row.release(delta)
            if row.out.finish_reason is None:
                keep.append(i)
            else:
                self._stats.rows_finished += 1
        self._stats.decode_steps += 1
        self._stats.rows_per_step[len(rows)] = self._stats.rows_per_step.get(len(rows), 0) + 1
        if not keep:
            return None, []
        if len(keep) < len(rows):
            batch, rows, tokens = select(batch, keep), [rows[i] for i in keep], tokens[keep]
        mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=batch.pos[:, None],
                         past_key_values=batch.cache, use_cache=True)
        return KVBatch(out.past_key_values, mask, batch.pos + 1, out.logits[:, -1].float()), rows

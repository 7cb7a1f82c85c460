"""A teacher with another tokenizer scores the student's sequences (SPEC "Teachers users really have").

The student's ids mean nothing to such a teacher, so it is sent what the ids spell: the student's
prompt rendering and sampled answer as bytes, decoded to text. The teacher scores that text in its
own tokens, and each of its rows (the chosen token's bytes and logprob, the top-K alternatives'
bytes and logprobs) is carried back onto the student's tokens by byte offsets with
`data.align.align_rows` (1:1 where the two tokenizations cut at the same bytes; conditioned on the
bytes already emitted where the student's piece starts inside a teacher token). The loss then runs
on the student's tokens as with a same-tokenizer teacher: rows are {student id: teacher logprob}
(the rest of the mass is the sparse loss's rest bucket).

Two teachers:
- `teacher.url` (`CrossPricedScorer`): one `POST {url}/completions` per sequence with the TEXT as
  `prompt`, `echo: true`, `max_tokens: 0`, `logprobs: K`; the echoed legacy logprobs give the
  teacher's tokens, their bytes (`tokens_bytes`, kdforge serve; else the echoed text cut at
  `text_offset`) and the alternatives by text (an alternative whose text is a fragment of a UTF-8
  character has unknown bytes: its mass stays in the rest bucket). Priced, cached, rate limited and
  retried like same-tokenizer scoring (`PricedScorer.send`, its cache); the worst case reserved is
  one token per byte of text (+2: a BOS or the like), settled at the reported usage.
- `teacher.path` (`LocalCrossTeacher`): the teacher runs on its own tokenization of the same text
  (its special tokens added as it is used to), its top-K per position read with exact token bytes
  (`data.tokenizer.token_bytes`). It attaches rows to any batch, so on-policy and dataset batches
  alike train on it (`DistillObjective` calls `attach`).

What both sides spell. The student's EOS ends its answer: the local teacher is sent its own EOS
there (its bytes renamed to the student's, so the stop is aligned 1:1 as a stop); over HTTP the
student's EOS text is sent, which a teacher with the same stop string (ChatML's `<|im_end|>`) reads
as its own stop. Bytes the student sampled that are not UTF-8 (a byte-level model can sample half
a character) cannot be sent as text: the sequence is scored up to the last token boundary before
them, and the tokens after get no teacher row (counted in `stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdforge.data.align import AlignError, StudentPieces, TeacherToken, align_rows

Rows = list[dict[int, float] | None]  # per student position: {student id: teacher logprob}; None: no row


@dataclass
class CrossStats:
    """What carrying cost, for the log: answer tokens with a row, of them 1:1, and tokens left
    without a row (a sequence that did not align, bytes that were not UTF-8)."""

    positions: int = 0
    one_to_one: int = 0
    unscored: int = 0
    sequences: int = 0

    def line(self) -> str:
        share = self.one_to_one / self.positions if self.positions else 0.0
        return (f"cross-tokenizer scoring: {self.sequences:,} sequences, {self.positions:,} answer tokens carried "
                f"({share:.0%} 1:1), {self.unscored:,} without a teacher row")


class StudentSide:
    """The student's tokenizer seen as bytes: each id's raw bytes and the pieces table align uses."""

    def __init__(self, tokenizer):
        from kdforge.data.tokenizer import special_ids, token_bytes

        self.tokenizer = tokenizer
        self.table = token_bytes(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pieces = StudentPieces(self.table, special_ids(tokenizer))

    def spelled(self, ids: list[int]) -> tuple[list[bytes], int]:
        """Each token's bytes, and how many leading tokens can be sent as text (their bytes, joined,
        are whole UTF-8, cut at a token boundary)."""
        parts = [self.table[i] if i < len(self.table) and self.table[i] is not None else None for i in ids]
        n = len(parts)
        if None in parts:
            n = parts.index(None)
        while n > 0:
            try:
                b"".join(parts[:n]).decode("utf-8")
                return parts, n
            except UnicodeDecodeError as e:  # cut before the first token holding a bad byte
                ends, at = [], 0
                for p in parts[:n]:
                    at += len(p)
                    ends.append(at)
                n = sum(1 for x in ends if x <= e.start)
        return parts, 0


def carry(ids: list[int], n_prompt: int, side: StudentSide, teacher: list[TeacherToken],
          stats: CrossStats | None = None) -> Rows:
    """Rows for the student's answer tokens (positions >= n_prompt) of the sequence `ids`, from the
    teacher's tokens of the text those ids spell (possibly with extra leading bytes: a BOS, a
    dummy-prefix space). Prompt positions get None; so do answer tokens the teacher's tokens cannot
    be matched with."""
    stats = stats if stats is not None else CrossStats()
    stats.sequences += 1
    rows: Rows = [None] * len(ids)
    answer = len(ids) - n_prompt
    parts, n_ok = side.spelled(ids)
    S = b"".join(parts[:n_ok])
    T = b"".join(t.bytes for t in teacher)
    if n_ok <= n_prompt or not T.endswith(S):
        stats.unscored += answer
        return rows
    shift = len(T) - len(S)
    s_start, at = [], 0
    for p in parts[:n_ok]:
        s_start.append(at)
        at += len(p)
    t_start, at = [], -shift
    for t in teacher:
        t_start.append(at)
        at += len(t.bytes)
    i0, j0 = _common_boundary(s_start, t_start, teacher, n_prompt)
    if i0 is None:
        stats.unscored += answer
        return rows
    try:
        got = align_rows(S[s_start[i0]:], ids[i0:n_ok], side.pieces, teacher[j0:])
    except AlignError:
        stats.unscored += answer
        return rows
    at_start = {o: j for j, o in enumerate(t_start) if teacher[j].bytes}
    for k, (rid, rlp) in enumerate(zip(got.ids, got.logprobs)):
        t = i0 + k
        if t >= n_prompt and rid:
            rows[t] = dict(zip(rid, rlp))
            j = at_start.get(s_start[t])
            if j is not None and teacher[j].bytes != parts[t]:
                _stop_to_stop(rows[t], teacher[j], side)
    stats.positions += sum(1 for t in range(n_prompt, n_ok) if rows[t] is not None)
    stats.one_to_one += _one_to_one_in_answer(got, i0, n_prompt, parts, s_start, t_start, teacher)
    stats.unscored += sum(1 for t in range(n_prompt, len(ids)) if rows[t] is None)
    return rows


def _stop_to_stop(row: dict[int, float], tok: TeacherToken, side: StudentSide) -> None:
    """At a student piece that starts where teacher token `tok` starts but is not it, align.py
    gives a teacher alternative that is the stop (the student's EOS bytes) to the first ordinary
    piece of its text ("<" of "<|im_end|>"): move that mass to the student's EOS, where it means
    what the teacher meant. Nothing is conditioned at a token start, so it is the stop's own logprob."""
    eos = side.eos_id
    stop = side.table[eos] if eos is not None else None
    lp = next((v for b, v in tok.top if b == stop), None) if stop else None
    if lp is None:
        return
    first = side.pieces.first_piece(stop)
    if first is not None and first in row:
        left = math.exp(row[first]) - math.exp(lp)
        if left > 1e-12:
            row[first] = math.log(left)
        else:
            del row[first]
    row[eos] = lp


def _one_to_one_in_answer(got, i0, n_prompt, parts, s_start, t_start, teacher) -> int:
    """How many answer positions were 1:1 (a teacher token of the same bytes at the same offset)."""
    starts = {(s, t.bytes) for s, t in zip(t_start, teacher)}
    return sum(1 for t in range(max(i0, n_prompt), i0 + len(got.ids)) if (s_start[t], parts[t]) in starts)


def _common_boundary(s_start: list[int], t_start: list[int], teacher, n_prompt: int):
    """The latest byte offset at or before the answer's start where a student token and a teacher
    token both begin: (student index, teacher index), or (None, None). Carrying starts there, so a
    teacher token across the prompt/answer boundary conditions the answer's first rows."""
    import bisect

    i = n_prompt
    while i >= 0:
        o = s_start[i] if i < len(s_start) else None
        if o is None:
            return None, None
        j = bisect.bisect_right(t_start, o) - 1  # the teacher token covering byte o
        while j > 0 and len(teacher[j].bytes) == 0:
            j -= 1
        if j < 0:
            return None, None
        if t_start[j] == o:
            return i, j
        i = bisect.bisect_right(s_start, t_start[j]) - 1  # the student token covering that start
        if i < 0 or t_start[j] < 0:
            return None, None
        if s_start[i] == t_start[j]:
            return i, j
    return None, None


# ---------------------------------------------------------------------------------------- over HTTP
def legacy_tokens(logprobs: dict, text: str) -> list[TeacherToken]:
    """The teacher's tokens of `text` from an echoed legacy `logprobs` object (kdforge serve, vLLM,
    OpenAI's legacy completions). Raises ValueError naming what is missing or malformed."""
    tokens, lps, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(lps, list) or not isinstance(tops, list) \
            or not (len(tokens) == len(lps) == len(tops)):
        raise ValueError("no echoed tokens, token_logprobs and top_logprobs of equal length")
    raw = logprobs.get("tokens_bytes")
    if isinstance(raw, list) and len(raw) == len(tokens):
        spelled = [bytes(b) for b in raw]
    else:
        spelled = _bytes_from_offsets(logprobs.get("text_offset"), text, len(tokens))
    out = []
    for n, (b, lp, top) in enumerate(zip(spelled, lps, tops)):
        if lp is None and n > 0 or lp is not None and not (math.isfinite(float(lp)) and float(lp) <= 1e-6):
            raise ValueError(f"token {n} has logprob {lp!r}")
        alts = []
        for t, v in (top or {}).items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-6):
                raise ValueError(f"token {n}'s alternative {t!r} has logprob {v!r}")
            if "\ufffd" not in t:  # part of a character: its bytes are unknown, its mass stays in the rest
                alts.append((t.encode("utf-8"), min(0.0, float(v))))
        out.append(TeacherToken(b, min(0.0, float(lp or 0.0)), tuple(alts)))
    return out


def _bytes_from_offsets(offsets, text: str, n: int) -> list[bytes]:
    """Each token's bytes from character offsets into the echoed text (no `tokens_bytes`): tokens
    that share a character's offset (its fragments) give it to the first of them."""
    if not isinstance(offsets, list) or len(offsets) != n:
        raise ValueError("neither tokens_bytes nor text_offset for every token")
    ends = [*offsets[1:], len(text)]
    return [text[a:max(a, e)].encode("utf-8") for a, e in zip(offsets, ends)]


class CrossPricedScorer:
    """`score(ids)` -> (rows, USD, cache hit) for the student's sequence `ids`, scored over HTTP as
    text by a teacher with another tokenizer: what a PricedScorer is for a same-tokenizer teacher,
    with its ledger, cache and limiter. `n_prompt(ids)` says where the answer starts."""

    def __init__(self, priced, student_tokenizer, log=print):
        self.priced = priced  # teacher.scoring.PricedScorer: ledger, cache, limiter, HTTP client
        self.side = StudentSide(student_tokenizer)
        self.stats = CrossStats()
        self.last_answer: dict | None = None
        self.last_tokens = 0  # the teacher's tokens of the last sequence scored (what it billed)
        self.log = log

    @property
    def spent(self) -> float:
        return self.priced.spent

    def text_of(self, ids: list[int]) -> tuple[str, int]:
        parts, n = self.side.spelled(ids)
        return b"".join(parts[:n]).decode("utf-8"), n

    def request(self, text: str, probe: bool = False) -> dict:
        s = self.priced.scorer
        body = {"model": s.resolved_model(), "prompt": text, "max_tokens": 0, "echo": True,
                "logprobs": s.top_k, "temperature": 0}
        if probe:  # the ids the teacher gives the text (kdforge serve, recent vLLM): tells its tokenizer
            body["return_token_ids"] = True
        return body

    def score_text(self, text: str, probe: bool = False) -> tuple[list[TeacherToken], float, bool]:
        """The teacher's tokens of `text` (priced, cached, rate limited), USD charged, cache hit.
        The answer's JSON (as cached) is kept in `last_answer`."""
        from kdforge.errors import KdforgeError
        from kdforge.teacher.cache import request_key

        p, body = self.priced, self.request(text, probe)
        key = request_key(p.scorer.url, body)
        hit = p.cache.get(key)
        if hit is not None:
            self.last_answer = hit
            return legacy_tokens(hit["logprobs"], text), 0.0, True
        # priced at its worst case, one token per byte (+2: a BOS or the like), settled at its usage;
        # the ledger, limiter and retry rules of same-tokenizer scoring (PricedScorer.send)
        answer, usd = p.send(body, len(text.encode("utf-8")) + 2)
        lp = (answer.get("choices") or [{}])[0].get("logprobs")
        try:
            toks = legacy_tokens(lp if isinstance(lp, dict) else {}, text)
        except ValueError as e:
            raise KdforgeError(f"teacher.url {p.scorer.url} answered a text scoring request without usable echoed "
                               f"logprobs ({e}): a teacher with another tokenizer must support echo + logprobs "
                               "on /completions (kdforge serve, vLLM)") from None
        self.last_answer = {"text": "", "logprobs": lp, "prompt_token_ids": answer.get("prompt_token_ids")}
        p.cache.put(key, self.last_answer)
        return toks, usd, False

    def score(self, ids: list[int], n_prompt: int = 0) -> tuple[Rows, float, bool]:
        """Rows for every position of `ids` from `n_prompt` on (StepScorer scores whole sequences:
        the prompt's rows are dropped by the labels, and cost nothing extra: the text is sent whole)."""
        text, n_ok = self.text_of(ids)
        if not text:
            self.stats.unscored += len(ids) - n_prompt
            self.last_tokens = 0
            return [None] * len(ids), 0.0, False
        toks, usd, hit = self.score_text(text)
        self.last_tokens = len(toks)
        return carry(ids, n_prompt, self.side, toks, self.stats), usd, hit

    def close(self) -> None:
        if self.log and self.stats.sequences:
            self.log(self.stats.line())
        self.priced.close()


def scored_tokens(scorer, ids: list[int]) -> int:
    """Tokens the teacher scored (and bills) for the sequence `scorer.score(ids)` just sent: the
    teacher's own tokens of its text for a CrossPricedScorer, the ids themselves otherwise."""
    return scorer.last_tokens if isinstance(scorer, CrossPricedScorer) else len(ids)


# ---------------------------------------------------------------------------------------- in-process
@dataclass
class LocalCrossTeacher:
    """A local teacher model with its own tokenizer, scoring the student's sequences in its tokens.
    `attach(batch)` adds the carried rows to a student batch as `topk_ids` / `topk_logprobs`."""

    model: object
    tokenizer: object
    student: StudentSide
    top_k: int = 20
    stats: CrossStats = field(default_factory=CrossStats)
    log: object = None  # said once, after the first batch: how many of its answer tokens lined up 1:1
    cross_tokenizer = True  # what DistillObjective asks before calling attach

    def __post_init__(self):
        from kdforge.data.tokenizer import token_bytes

        self.table = token_bytes(self.tokenizer)
        self.eos_text = self.tokenizer.eos_token  # sent where the student stopped (None: the student's text)
        self.eos_id = self.tokenizer.eos_token_id  # read once: a tokenizer attribute costs ~50 us a call
        self.student_stop = self.student.table[self.student.eos_id] if self.student.eos_id is not None else None

    def teacher_tokens(self, texts: list[str]) -> list[list[TeacherToken]]:
        """The teacher's tokens of each text, with its top-K per position (exact bytes)."""
        import torch

        enc = [self.tokenizer(t)["input_ids"] for t in texts]
        device = next(self.model.parameters()).device
        width = max(map(len, enc))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        k = min(self.top_k, logp.shape[-1])
        top = logp.topk(k, dim=-1)
        out = []
        for b, e in enumerate(enc):
            chosen = logp[b, :-1].gather(-1, ids[b, 1:, None])[:, 0].tolist() if len(e) > 1 else []
            tv, ti = top.values[b].tolist(), top.indices[b].tolist()
            toks = [TeacherToken(self._bytes(e[0]) or b"", 0.0)]
            for t in range(1, len(e)):
                alts = tuple((bb, v) for i, v in zip(ti[t - 1], tv[t - 1]) if (bb := self._bytes(i)) is not None)
                toks.append(TeacherToken(self._bytes(e[t]) or b"", chosen[t - 1], alts))
            out.append(toks)
        return out

    def _bytes(self, i: int) -> bytes | None:
        if i == self.eos_id and self.eos_text:  # the teacher's stop is the student's stop
            return self.student_stop
        return self.table[i] if i < len(self.table) else None

    def text(self, ids: list[int]) -> str:
        """What the teacher is sent for the student's `ids`: their text up to the last whole UTF-8
        token boundary, the student's EOS as the teacher's."""
        parts, n = self.student.spelled(ids)
        pieces = [self.eos_text.encode("utf-8") if i == self.student.eos_id and self.eos_text else p
                  for i, p in zip(ids[:n], parts[:n])]
        return b"".join(pieces).decode("utf-8")

    def count(self, ids: list[int]) -> int:
        """How many of its own tokens the teacher scores for the student's `ids` (as `score` sends them)."""
        return len(self.tokenizer(self.text(ids) or " ")["input_ids"])

    def score(self, seqs: list[tuple[list[int], int]]) -> list[Rows]:
        """Rows for each (student ids, prompt length)."""
        texts = [self.text(ids) for ids, _ in seqs]
        toks = self.teacher_tokens([t if t else " " for t in texts]) if seqs else []
        return [carry(ids, n_prompt, self.student, tt if text else [], self.stats)
                for (ids, n_prompt), tt, text in zip(seqs, toks, texts)]

    def attach(self, batch: dict) -> dict:
        """The batch with the teacher's carried rows (in place; a batch that has them is left as it is)."""
        if "topk_ids" in batch:
            return batch
        from kdforge.train.on_policy import _attach_scores, example_spans  # rows as the sparse loss reads them

        seqs, where = [], []
        for b, span in example_spans(batch):
            x, y = batch["input_ids"][b][span].tolist(), batch["labels"][b][span].tolist()
            first = next((i for i, v in enumerate(y) if v >= 0), len(y))
            seqs.append((x, first))
            where.append((b, span.nonzero()[:, 0].tolist()))
        scored = self.score(seqs)
        B, L = batch["input_ids"].shape
        per_row: list[Rows] = [[None] * L for _ in range(B)]
        for (b, cols), rows in zip(where, scored):
            for c, r in zip(cols, rows):
                per_row[b][c] = r
        _attach_scores(batch, per_row)
        for k in ("topk_ids", "topk_logprobs"):
            batch[k] = batch[k].to(batch["input_ids"].device)
        if self.log:
            self.log(f"first batch: {self.stats.line()}")
            self.log = None
        return batch


# ---------------------------------------------------------------------------------------- detection
# What the URL probe sends: accents, CJK, an emoji and the sort task's spaced letters, so that two
# tokenizers that differ almost anywhere segment it differently.
PROBE = [{"role": "user", "content": "Sort: q d m — café naïve, 東京の天気 🙂"}]


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids for the same bytes (same vocabulary, same stop)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token == b.eos_token


def _refuse_off(what: str):
    from kdforge.errors import ConfigError

    return ConfigError([("loss.cross_tokenizer", f"off, and {what} has another tokenizer than the student's: set "
                         "loss.cross_tokenizer: auto (its rows carried onto the student's tokens by bytes) or "
                         "train the student on the teacher's tokenizer")])


def local_teacher(cfg, model, student_tokenizer, log=print):
    """The teacher the objective gets: `model` itself when it shares the student's tokenizer, else a
    LocalCrossTeacher (its rows carried by bytes). With loss.cross_tokenizer off, another tokenizer
    is refused (exit 2)."""
    if model is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.teacher.path, trust_remote_code=False)
    if same_tokenizer(tok, student_tokenizer):
        return model
    if getattr(cfg.loss, "cross_tokenizer", "auto") == "off":
        raise _refuse_off(f"teacher.path {cfg.teacher.path}")
    if log:
        log(f"teacher.path has its own tokenizer ({len(tok):,} tokens; the student's {len(student_tokenizer):,}): "
            f"it scores the student's text in its tokens, its top-{cfg.teacher.top_logprobs} carried onto the "
            "student's tokens by bytes")
    return LocalCrossTeacher(model, tok, StudentSide(student_tokenizer), cfg.teacher.top_logprobs, log=log)


def _tokenize(scorer, text: str) -> list[int] | None:
    """The teacher's ids of `text` from vLLM's `POST /tokenize` (kdforge serve has it too; it is
    at the server's root, beside /v1), or None where the server has none."""
    import httpx

    root = scorer.url[:-3] if scorer.url.endswith("/v1") else scorer.url
    for url in dict.fromkeys([f"{root}/tokenize", f"{scorer.url}/tokenize"]):
        try:
            r = scorer._http.post(url, json={"model": scorer.resolved_model(), "prompt": text})
        except httpx.HTTPError:
            return None
        if r.status_code == 200:
            tokens = r.json().get("tokens") if isinstance(r.json(), dict) else None
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return tokens
        elif r.status_code in (401, 403):
            scorer._check(r)
    return None


def probe(scorer, student_tokenizer) -> tuple[str, list[int], list[int] | None]:
    """(the probe text as the student renders it, the student's ids of it, the teacher's ids from the
    server's free /tokenize, None where it has none): whether a teacher over HTTP shares the
    student's tokenizer (on-policy scoring here, `kdforge eval --teacher URL`)."""
    from kdforge.data.dataset import prompt_text

    text = prompt_text(student_tokenizer, PROBE)
    return text, student_tokenizer(text)["input_ids"], _tokenize(scorer, text)


def over_http(cfg, step_scorer, student_tokenizer, log=print):
    """`step_scorer` (on_policy.StepScorer) made to score text when teacher.url has another
    tokenizer. A probe text (accents, CJK, emoji, the chat template) is tokenized by the teacher
    with vLLM's free `/tokenize`; where a server has none, one scoring request (priced and cached
    like any other) asks for its ids (`return_token_ids`, else compares its tokens' bytes). Ids
    equal to the student's: the scorer is returned as it is (ids are sent, as always). Rank > 0
    holds no scorer and is returned as it is (rank 0 scores for it)."""
    priced = getattr(step_scorer, "scorer", None)
    if priced is None:
        return step_scorer
    cross = CrossPricedScorer(priced, student_tokenizer, log)
    text, ids, theirs = probe(priced.scorer, student_tokenizer)  # free where the server has vLLM's /tokenize
    if theirs is None:  # else one priced scoring request (cached: a resumed run does not pay again)
        toks, answer = cross.score_text(text, probe=True)[0], cross.last_answer or {}
        got = answer.get("prompt_token_ids")
        if isinstance(got, list) and got and isinstance(got[0], list):
            theirs = got[0]
        else:  # no ids: the same bytes cut at the same places
            theirs = ids if [t.bytes for t in toks] == [cross.side.table[i] for i in ids] else []
    if theirs == ids:
        return step_scorer
    if getattr(cfg.loss, "cross_tokenizer", "auto") == "off":
        raise _refuse_off(f"teacher.url {cfg.teacher.url}")
    if log:
        log(f"teacher.url {cfg.teacher.url} has another tokenizer ({len(theirs)} tokens for a probe's {len(ids)}): "
            "on-policy sends the student's text, the teacher's rows carried onto its tokens by bytes")
    step_scorer.scorer = cross
    return step_scorer

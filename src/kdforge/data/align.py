"""Cross-tokenizer alignment: a teacher's per-token top-k distribution carried onto the student's
tokens by their bytes. Pure functions over bytes and floats (no torch), shared by sparse KD (stored
API logprobs), dense KD from a local teacher with its own tokenizer, and on-policy scoring.

API (kept stable; other modules import it):

    pieces = StudentPieces(token_bytes(student_tokenizer))
    teacher = teacher_tokens(record.teacher_logprobs)      # generate's entries -> TeacherToken list
    rows = align_rows(response_bytes, student_ids, pieces, teacher)
    rows.ids[t], rows.logprobs[t]   # the teacher's distribution for student token t (sparse row)
    rows.one_to_one                 # positions whose teacher token was the student's piece

How a row is carried. Student position t is the piece B (bytes) at byte offset o of the response.
The teacher token covering o starts at c <= o; bytes c..o of it (the prefix P) are already emitted.
- 1:1 (c == o and the teacher token is exactly B): the row as the same-tokenizer path has always
  built it: each alternative mapped by its exact bytes to a student id, the chosen token closing
  the row when the top-k left it out; an alternative the student's vocabulary lacks goes to its
  first student piece (below) instead of being dropped.
- Otherwise the teacher's row is conditioned on the prefix: only alternatives whose bytes start
  with P are still possible. Their masses are rescaled so the row keeps the share of mass the
  top-k does not cover (the rest bucket of the loss, `train/losses.py`): q(A) = p(A) * K / S, where
  K is the mass the top-k covers and S the mass of the alternatives that start with P. (Rescaling to
  S alone would claim the uncovered mass never starts with P.) Each surviving alternative's
  remainder A[len(P):] goes to the student piece it begins with (the longest student token that is
  a prefix of it: the student's own split of a remainder is unknown without what follows); masses
  landing on one student id are summed. The chosen continuation's mass goes to the student's actual
  piece B. An alternative whose remainder is empty (it ends where the prefix does: what follows is
  another teacher token, unknown here) leaves its mass in the rest bucket.
- A student piece longer than the chosen teacher remainder (B spans several teacher tokens): the
  actual piece gets q(chosen) times the teacher's probability of the following bytes of B: the
  chosen logprobs of the teacher tokens B covers whole, and for a teacher token B covers only in
  part, the mass of its alternatives that start with the covered bytes. The first teacher
  position's other alternatives go to their first student pieces as above.

Everything works on bytes, never decoded text: a token holding part of a UTF-8 character (on either
side) is matched by the bytes it holds (TRL's GOLD trainer once aligned decoded strings, which
never reconcile across a split multi-byte character; see trl#4393 / #5885). The response is the
bytes both sides spell: a BOS or other special token is not part of it (an asymmetric BOS shifts
nothing), and a mismatch in what they spell raises `AlignError` (the caller counts the record as
misaligned and trains it with CE only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


class AlignError(ValueError):
    """The teacher's and the student's tokens do not spell the same bytes (or lack bytes)."""


@dataclass(frozen=True)
class TeacherToken:
    """One teacher position: the chosen token's bytes and logprob, and the top alternatives
    ((bytes, logprob) pairs, the chosen one possibly among them)."""

    bytes: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class Aligned:
    """Carried rows, one per student token of the response: ids (distinct within a row) and their
    teacher logprobs (each row's mass <= 1; the rest is the loss's rest bucket). An empty row has
    no teacher data. `one_to_one` counts positions where the teacher's token was the student's."""

    ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    one_to_one: int = 0

    @property
    def positions(self) -> int:
        return len(self.ids)


def unique_keys(pairs) -> dict:
    """key -> id for keys that name exactly one id (an ambiguous key maps to nothing)."""
    first: dict = {}
    twice = set()
    for key, i in pairs:
        if key in first:
            twice.add(key)
        first.setdefault(key, i)
    return {k: i for k, i in first.items() if k not in twice}


class StudentPieces:
    """The student vocabulary by bytes: `table[i]` is token i's raw bytes (`data.tokenizer.token_bytes`,
    None where unknown). `special` ids (EOS, chat markers) never receive carried mass: a teacher
    alternative spelling "<|im_end|>" as text is not the student's stop token."""

    def __init__(self, table: Sequence[bytes | None], special: set[int] | frozenset = frozenset()):
        self.table = list(table)
        self.by_bytes = unique_keys((b, i) for i, b in enumerate(self.table) if b is not None)
        self.plain = {b: i for b, i in self.by_bytes.items() if i not in special and b}
        self.max_len = max((len(b) for b in self.plain), default=0)

    def exact(self, b: bytes) -> int | None:
        """The one student id whose bytes are `b` (None: none or ambiguous)."""
        return self.by_bytes.get(b)

    def first_piece(self, b: bytes) -> int | None:
        """The longest non-special student token that is a prefix of `b` (None: no such token)."""
        for n in range(min(len(b), self.max_len), 0, -1):
            i = self.plain.get(b[:n])
            if i is not None:
                return i
        return None


def entry_bytes(entry: dict) -> bytes | None:
    """The raw bytes of a generate-format entry ({token, logprob, bytes?}): its `bytes`, else the
    UTF-8 of its text unless that text is lossy ("\ufffd": part of a character, bytes unknown)."""
    if entry.get("bytes") is not None:
        return bytes(entry["bytes"])
    text = entry.get("token")
    return None if not isinstance(text, str) or "\ufffd" in text else text.encode("utf-8")


def teacher_tokens(entries: Sequence[dict]) -> list[TeacherToken]:
    """generate's `teacher_logprobs` entries as TeacherTokens. Alternatives without known bytes are
    dropped; a chosen token without them raises AlignError (its place in the text is unknown)."""
    out = []
    for n, e in enumerate(entries):
        b = entry_bytes(e)
        if b is None:
            raise AlignError(f"teacher token {n} ({e.get('token')!r}) has no bytes: cannot place it")
        top = tuple((tb, float(a["logprob"])) for a in e.get("top") or [] if (tb := entry_bytes(a)) is not None)
        out.append(TeacherToken(b, float(e["logprob"]), top))
    return out


def _logsumexp(xs: Sequence[float]) -> float:
    if not xs:
        return -math.inf
    m = max(xs)
    return m if m == -math.inf else m + math.log(sum(math.exp(x - m) for x in xs))


def _alternatives(tok: TeacherToken) -> list[tuple[bytes, float]]:
    """The row's distinct outcomes in order: the top-k, then the chosen token if it was left out
    (first occurrence of a byte string wins, as the same-tokenizer path does)."""
    seen, out = set(), []
    for b, lp in [*tok.top, (tok.bytes, tok.logprob)]:
        if b not in seen:
            seen.add(b)
            out.append((b, lp))
    return out


def _row_one_to_one(tok: TeacherToken, student_id: int, pieces: StudentPieces) -> tuple[list[int], list[float]]:
    """The same-tokenizer row: alternatives by exact bytes (the first of equal ids wins), the chosen
    token as the student's id. An alternative the student's vocabulary lacks (another tokenizer's
    word) goes to its first student piece, summed there, instead of being dropped."""
    pairs = [*tok.top, (tok.bytes, tok.logprob)]
    chosen = tok.bytes
    get = pieces.by_bytes.get
    ids = [student_id if b == chosen else get(b) for b, _ in pairs]
    if None not in ids:  # every alternative is a student token (the usual case): first of each id kept
        first: dict[int, float] = {}
        for i, (_, lp) in zip(ids, pairs):
            first.setdefault(i, lp)
        return list(first), list(first.values())
    masses: dict[int, list[float]] = {}
    exact = set()
    for b, lp in pairs:
        j = student_id if b == chosen else pieces.exact(b)
        if j is not None:
            if j not in exact:
                exact.add(j)
                masses.setdefault(j, []).append(lp)
        elif (j := pieces.first_piece(b)) is not None:
            masses.setdefault(j, []).append(lp)
    ids = list(masses)
    return ids, [masses[i][0] if len(masses[i]) == 1 else min(0.0, _logsumexp(masses[i])) for i in ids]


def _prefix_mass(tok: TeacherToken, covered: bytes) -> float:
    """log of the teacher's known mass on tokens that start with `covered` at this position."""
    return _logsumexp([lp for b, lp in _alternatives(tok) if b.startswith(covered)])


def _row_carried(teacher: Sequence[TeacherToken], starts: list[int], j: int, o: int, piece: bytes,
                 student_id: int, pieces: StudentPieces, response: bytes) -> tuple[list[int], list[float]]:
    """The row of a student piece that does not coincide with teacher token j (see the module
    docstring): conditioned on the prefix inside token j, remainders mapped to student pieces."""
    tok = teacher[j]
    prefix = response[starts[j]:o]
    alts = _alternatives(tok)
    covered = _logsumexp([lp for _, lp in alts])  # log K
    consistent = [(b, lp) for b, lp in alts if b.startswith(prefix)]
    shift = covered - _logsumexp([lp for _, lp in consistent])  # log K - log S
    chosen_rest = tok.bytes[len(prefix):]
    chosen_lp = tok.logprob + shift
    if len(piece) > len(chosen_rest):  # the piece runs on into later teacher tokens
        at, k = o + len(chosen_rest), j + 1
        while at < o + len(piece):
            end = starts[k] + len(teacher[k].bytes)
            if end <= o + len(piece):
                chosen_lp += teacher[k].logprob
            else:
                chosen_lp += _prefix_mass(teacher[k], response[starts[k]:o + len(piece)])
            at, k = end, k + 1
    masses: dict[int, list[float]] = {}
    for b, lp in consistent:
        if b == tok.bytes:
            masses.setdefault(student_id, []).append(chosen_lp)
            continue
        rest = b[len(prefix):]
        i = pieces.first_piece(rest) if rest else None
        if i is not None:
            masses.setdefault(i, []).append(lp + shift)
    ids = list(masses)
    return ids, [min(0.0, _logsumexp(masses[i])) for i in ids]


def align_rows(response: bytes, student_ids: Sequence[int], pieces: StudentPieces,
               teacher: Sequence[TeacherToken]) -> Aligned:
    """The teacher's rows carried onto the student's tokens of `response` (see the module docstring).

    `student_ids`: the student's tokens of the response (no EOS), whose bytes (`pieces.table`)
    spell `response`; `teacher`: the teacher's tokens, whose chosen bytes spell it too. Returns one
    row per student token. Raises AlignError when either side does not spell `response`."""
    sb = [pieces.table[i] for i in student_ids]
    if any(b is None for b in sb) or b"".join(sb) != response:
        raise AlignError("the student's tokens do not spell the response bytes")
    if b"".join(t.bytes for t in teacher) != response:
        raise AlignError(f"the teacher's {len(teacher)} tokens do not spell the response "
                         f"({len(response)} bytes) the student trains on")
    starts, at = [], 0
    for t in teacher:
        starts.append(at)
        at += len(t.bytes)
    out = Aligned()
    j = o = 0
    for sid, piece in zip(student_ids, sb):
        while j + 1 < len(teacher) and starts[j + 1] <= o:
            j += 1  # the teacher token covering byte o (empty teacher tokens are skipped)
        if starts[j] == o and teacher[j].bytes == piece:
            ids, lps = _row_one_to_one(teacher[j], sid, pieces)
            out.one_to_one += 1
        elif piece:
            ids, lps = _row_carried(teacher, starts, j, o, piece, sid, pieces, response)
        else:
            ids, lps = [], []
        out.ids.append(ids)
        out.logprobs.append(lps)
        o += len(piece)
    return out

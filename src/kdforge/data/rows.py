"""Teacher rows at speed: the token store's fast path for `kdforge generate` lines (issue 21).

A top-20 line holds ~21 {token, logprob, bytes} objects per answer token. Decoding them into Python
dicts and checking them one by one (records.py) is ~80% of a build; this module decodes such a line
with msgspec into typed structs whose `bytes` stay raw JSON text, maps each entry to the student's id by
that text (one dict lookup: `TokenMap.by_raw`), and checks and lays out the rows with numpy.

It is a fast path only, never a second definition: a line takes it when it is a generate line
({"teacher_text", "teacher_logprobs": [...]}) whose every entry and alternative has bytes, written as
`json.dumps` writes them (or compactly), naming one student token, and logprobs <= LOGPROB_SLACK.
Rows of another tokenizer (bytes no student token has alone) are handed to `dataset.align_record`,
the one aligner, as the dicts `json.loads` would give (bytes as a bytes object): the line is not
parsed twice nor checked entry by entry again (~2.4x less CPU for such a build). Anything else
(another shape, invalid JSON, an entry without bytes, bytes that are not 0-255, a bad logprob)
returns None, and the caller takes the general path (`json.loads`, `records.parse_record`,
`dataset.align_record`), which gives the same records, rows and error messages as before;
tests/test_rows.py checks that the paths agree.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from kdforge.data.records import LOGPROB_SLACK, Record, is_byte_list, parse_record

_NO_BYTES = msgspec.Raw(b"")


class _Alt(msgspec.Struct, gc=False):  # not tracked: ~20% faster to make and free millions
    token: str
    logprob: float
    bytes: msgspec.Raw = _NO_BYTES


class _Entry(msgspec.Struct, gc=False):
    token: str
    logprob: float
    bytes: msgspec.Raw = _NO_BYTES
    top: list[_Alt] | None = None


U = msgspec.UNSET


class _Line(msgspec.Struct):
    """The fields `records.parse_record` reads from a generate line (others are ignored there too)."""

    teacher_text: Any = U
    teacher_logprobs: list[_Entry] | None | msgspec.UnsetType = U
    prompt: Any = U
    messages: Any = U
    teacher_reasoning: Any = U
    id: Any = U
    metadata: Any = U
    source: Any = U


_DECODER = msgspec.json.Decoder(_Line)
_FIELDS = _Line.__struct_fields__
_BYTES, _LP, _TOP = attrgetter("bytes"), attrgetter("logprob"), attrgetter("top")


def raw_bytes_index(by_bytes: dict[bytes, int]) -> dict[bytes, int]:
    """JSON text of a token's bytes -> its id, for every id its bytes name alone (`by_bytes`), in the
    two spellings writers use: `json.dumps` ("[104, 105]") and compact ("[104,105]")."""
    out = {}
    for b, i in by_bytes.items():
        nums = [str(x) for x in b]
        out[("[" + ", ".join(nums) + "]").encode()] = i
        out[("[" + ",".join(nums) + "]").encode()] = i
    return out


class TeacherRows:
    """One line's teacher_logprobs, decoded and checked: the teacher's chosen ids, and every row's
    alternatives (top-k, then the chosen token) as flat arrays. `line` is kept for the general path."""

    __slots__ = ("chosen", "n_top", "top_ids", "top_lp", "chosen_lp", "line")

    def __init__(self, chosen, n_top, top_ids, top_lp, chosen_lp, line: str):
        self.chosen, self.n_top, self.top_ids = chosen, n_top, top_ids
        self.top_lp, self.chosen_lp, self.line = top_lp, chosen_lp, line

    def __len__(self) -> int:
        return len(self.chosen)

    def entries(self) -> list[dict]:
        """The entries as dicts, exactly as `json.loads` gives them (the general path's input)."""
        import json

        line = self.line
        return json.loads(line if isinstance(line, (str, bytes)) else bytes(line))["teacher_logprobs"]

    def spells(self, tm, response: str) -> bool:
        """Whether the teacher's chosen tokens spell `response` (align_record's teacher_ids): then
        they are the response's ids, and the response need not be tokenised."""
        return b"".join(map(tm.bytes.__getitem__, self.chosen)).decode("utf-8", "replace") == response

    def align(self, tm, response: str, response_ids: list[int] | None):
        """(response ids, row lengths, alternative ids, alternative logprobs) as `align_record` makes
        them for a teacher on the student's tokenizer, or None where its rows do not line up 1:1 with
        the student's tokens (the general path then carries them, or refuses the record).
        `response_ids` None: the response was not tokenised, as the chosen tokens spell it."""
        chosen = self.chosen
        if response_ids is None or self.spells(tm, response):
            response_ids = chosen  # the teacher's own tokens (align_record's teacher_ids)
        elif chosen != response_ids:
            return None
        return (response_ids, *layout(self.n_top, self.top_ids, self.top_lp,
                                      np.asarray(response_ids, dtype=np.int64), self.chosen_lp))


def layout(n_top: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray, chosen_ids: np.ndarray,
           chosen_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of [top-k..., chosen] with each id kept at its first place (align_record's rule: the
    chosen token closes the row only when the top-k left it out). -> (row_len, ids, logprobs)."""
    T = len(n_top)
    if T and (n_top == n_top[0]).all() and n_top[0] > 0:
        fast = _layout_uniform(int(n_top[0]), top_ids, top_lp, chosen_ids, chosen_lp)
        if fast is not None:
            return fast
    per_row = n_top + 1
    ends = np.cumsum(per_row)
    total = int(ends[-1]) if T else 0
    is_chosen = np.zeros(total, dtype=bool)
    is_chosen[ends - 1] = True
    ids = np.empty(total, dtype=np.int64)
    lps = np.empty(total, dtype=np.float64)
    ids[is_chosen], lps[is_chosen] = chosen_ids, chosen_lp
    ids[~is_chosen], lps[~is_chosen] = top_ids, top_lp
    row = np.repeat(np.arange(T, dtype=np.int64), per_row)
    _, first = np.unique(row * (int(ids.max(initial=0)) + 1) + ids, return_index=True)
    keep = np.sort(first)
    return np.bincount(row[keep], minlength=T), ids[keep], lps[keep]


def _layout_uniform(k: int, top_ids: np.ndarray, top_lp: np.ndarray, chosen_ids: np.ndarray,
                    chosen_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`layout` where every row has k alternatives, none twice (as an API sends them): the chosen
    token closes a row only when its top-k left it out. None where a row repeats an id (`layout`'s
    general rule then keeps first occurrences). ~3x faster than sorting every row's ids together."""
    T = len(chosen_ids)
    top = top_ids.reshape(T, k)
    by_id = np.sort(top, axis=1)
    if (by_id[:, 1:] == by_id[:, :-1]).any():
        return None
    left_out = ~(top == chosen_ids[:, None]).any(axis=1)
    keep = np.ones((T, k + 1), dtype=bool)
    keep[:, k] = left_out
    ids = np.concatenate([top, chosen_ids[:, None]], axis=1)[keep]
    lps = np.concatenate([top_lp.reshape(T, k), chosen_lp[:, None]], axis=1)[keep]
    return k + left_out.astype(np.int64), ids, lps


def fast_record(text: str | bytes, by_raw: dict[bytes, int], prompt_only: bool = False) -> Record | None:
    """The Record of a generate line with its teacher_logprobs as `TeacherRows`, or None where the
    line is for the general path (see the module docstring). Raises ValueError as parse_record does
    for the line's other fields (the rows are already known good)."""
    try:
        line = _DECODER.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    entries = line.teacher_logprobs
    if line.teacher_text is U or not entries:
        return None
    rows = _rows(entries, by_raw, text)
    if rows is None:
        return None
    obj = {f: v for f in _FIELDS if (v := getattr(line, f)) is not U and f != "teacher_logprobs"}
    rec = parse_record(obj, prompt_only)
    rec.teacher_logprobs = rows
    return rec


def _rows(entries: list[_Entry], by_raw: dict[bytes, int], text: str) -> TeacherRows | list[dict] | None:
    tops = list(map(_TOP, entries))
    if None in tops:
        tops = [t or () for t in tops]
    flat = list(chain.from_iterable(tops))
    top_lp = np.fromiter(map(_LP, flat), dtype=np.float64, count=len(flat))
    chosen_lp = np.fromiter(map(_LP, entries), dtype=np.float64, count=len(entries))
    if (top_lp > LOGPROB_SLACK).any() or (chosen_lp > LOGPROB_SLACK).any():
        return None  # the general path names the entry
    chosen = list(map(by_raw.get, map(bytes, map(_BYTES, entries))))
    top_ids = list(map(by_raw.get, map(bytes, map(_BYTES, flat)))) if None not in chosen else [None]
    if None in chosen or None in top_ids:
        return _dict_entries(entries, tops)  # bytes no student token has alone: another tokenizer
    return TeacherRows(chosen, np.fromiter(map(len, tops), dtype=np.int64, count=len(tops)),
                       np.array(top_ids, dtype=np.int64), top_lp, chosen_lp, text)


_MISS = object()
_RAW_BYTES: dict[bytes, bytes | None] = {}  # a bytes text ("[104, 105]") -> the bytes (None: not bytes)


def _raw_bytes(raw: msgspec.Raw) -> bytes | None:
    """The bytes a `bytes` field's JSON text holds, or None unless it is a list of integers 0-255
    (records.is_byte_list, the general path's rule). A teacher's vocabulary is finite: remembered per text."""
    text = bytes(raw)
    b = _RAW_BYTES.get(text, _MISS)
    if b is _MISS:
        import json

        try:
            v = json.loads(text)
        except ValueError:
            v = None
        b = bytes(v) if is_byte_list(v) else None
        if len(_RAW_BYTES) < 1 << 18:  # ~40 MB at most: a 200k-token vocabulary in one spelling
            _RAW_BYTES[text] = b
    return b


def _dict_entries(entries: list[_Entry], tops: list) -> list[dict] | None:
    """The entries as `json.loads` + `records.parse_record` give them to `align_record` (the ONE
    aligner: it carries another tokenizer's rows), but for `bytes`, given as a bytes object (TokenMap
    and align.entry_bytes read both alike): no second parse of the line, no check entry by entry
    (msgspec's types did it; logprobs are checked above). None where an entry or alternative has no
    bytes or bytes that are not a list of 0-255: the general path takes the line."""
    out = []
    for e, top in zip(entries, tops):
        alts = []
        for a in top:
            ab = _raw_bytes(a.bytes)
            if ab is None:
                return None
            alts.append({"token": a.token, "logprob": a.logprob, "bytes": ab})
        b = _raw_bytes(e.bytes)
        if b is None:
            return None
        out.append({"token": e.token, "logprob": e.logprob, "bytes": b, "top": alts})
    return out

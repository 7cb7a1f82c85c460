"""`kdforge data validate`: a quality report per JSONL file.

Per file: lines, valid records, unusable lines (each file:line with its reason; empty or
whitespace-only responses are unusable), truncated answers (`finish_reason: length`), refusals
(a reply that opens like "I'm sorry, but I can't ..."), exact duplicates (same prompt and
response) and duplicate prompts, near-duplicate responses and prompts (MinHash over word
3-grams, each candidate verified by an exact Jaccard similarity >= 0.8), token lengths (with a tokenizer: prompt as the chat template renders
it, and response; without one, the teacher's counts from `metadata.tokens` when present), and
prompt diversity per source (distinct-1/distinct-2: unique n-grams over all n-grams).
`check_reports` raises DataError (exit 2) if any line is unusable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdforge.data.records import Record, parse_record
from kdforge.errors import DataError

NEAR_DUP_JACCARD = 0.8
_PERMS, _BANDS = 64, 16  # MinHash signature size, LSH bands (4 rows each: catches Jaccard >~ 0.5)
_CACHED = 64  # shingle sets held while candidates are checked (bounds memory whatever the file size)
_WORD = re.compile(r"\w+", re.UNICODE)
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i apologi[sz]e, but|i can(no|')t (help|assist|comply|provide|do that)"
    r"|i (am|'m) (not able|unable) to|i won'?t be able to|as an ai( language model)?,? i)", re.IGNORECASE)


@dataclass
class FileReport:
    path: str
    lines: int = 0
    valid: int = 0
    unusable: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    empty: int = 0
    truncated: int = 0
    refusals: int = 0
    with_reasoning: int = 0  # records carrying a thinking teacher's `teacher_reasoning`
    exact_duplicates: int = 0  # records repeating an earlier (prompt, response)
    duplicate_prompts: int = 0  # records repeating an earlier prompt with another response
    duplicate_ids: int = 0
    near_duplicates: list[tuple[int, int, float]] = field(default_factory=list)  # responses: (line, earlier, jaccard)
    near_duplicate_prompts: list[tuple[int, int, float]] = field(default_factory=list)
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)  # prompt/response/total -> stats
    length_unit: str = ""
    diversity: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> stats

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]

    return {"n": len(s), "min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "max": s[-1]}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _shingles(text: str) -> set[str]:
    w = _words(text)
    if len(w) < 3:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + 3]) for i in range(len(w) - 2)}


# ----------------------------------------------------------------------------- near duplicates

def _signature(sh: set[str], a, b):
    """The MinHash signature (_PERMS uint32 values, multiply-shift hashing) of a shingle set."""
    import numpy as np

    h = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh))
    return ((a[:, None] * h[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1).astype(np.uint32)


def _hashes():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**61, _PERMS, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    return a, rng.integers(0, 2**61, _PERMS, dtype=np.uint64)


class Signatures:
    """MinHash signatures of texts, added in order: _PERMS uint32 values (256 bytes) a text, never
    the text. `near(text_of)` finds, for each text, the first earlier one sharing an LSH band whose
    exact word 3-gram Jaccard is >= NEAR_DUP_JACCARD; `text_of(i)` gives text i back for that check."""

    def __init__(self):
        from array import array

        self.a, self.b = _hashes()
        self.sigs = array("I")  # _PERMS per text with shingles
        self.which = array("q")  # index of each signature's text
        self.n = 0

    def add(self, text: str) -> None:
        sh = _shingles(text)
        if sh:
            self.sigs.frombytes(_signature(sh, self.a, self.b).tobytes())
            self.which.append(self.n)
        self.n += 1

    def near(self, text_of) -> list[tuple[int, int, float]]:
        """(i, j, jaccard), j < i, as `near_duplicates` finds them."""
        import numpy as np
        from functools import lru_cache

        sigs = np.frombuffer(self.sigs, dtype=np.uint32).reshape(-1, _PERMS)
        rows = _PERMS // _BANDS
        # band k of each text as one 16-byte key, and the id of its bucket (equal keys, equal ids)
        bands = [np.unique(np.ascontiguousarray(sigs[:, k * rows:(k + 1) * rows]).view(np.dtype((np.void, 4 * rows)))
                           .ravel(), return_inverse=True)[1] for k in range(_BANDS)]
        reps = [np.full(int(g.max()) + 1 if len(g) else 0, -1, dtype=np.int64) for g in bands]
        # a few texts' shingles: the current one's, across its bands, and the buckets' most asked-for
        shingles = lru_cache(maxsize=_CACHED)(lambda i: frozenset(_shingles(text_of(i))))
        out = []
        for row, i in enumerate(self.which):
            match = None
            for k in range(_BANDS):
                j = int(reps[k][bands[k][row]])
                if j >= 0 and match is None:
                    a, b = shingles(i), shingles(j)
                    jac = len(a & b) / len(a | b)
                    if jac >= NEAR_DUP_JACCARD:
                        match = (i, j, round(jac, 3))
            if match:
                out.append(match)
            else:
                for k in range(_BANDS):  # only non-duplicates represent their bucket
                    if reps[k][bands[k][row]] < 0:
                        reps[k][bands[k][row]] = i
        return out


def near_duplicates(texts: list[str]) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with j < i the first earlier text whose 3-gram Jaccard with i is >= 0.8."""
    sig = Signatures()
    for t in texts:
        sig.add(t)
    return sig.near(texts.__getitem__)


# ----------------------------------------------------------------------------- one pass over a file

def _digest(*parts: str) -> bytes:
    """16 bytes that stand for `parts` (length-prefixed: ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


class _NotUtf8(Exception):
    pass


def _lines(path: Path):
    """(line number, byte offset of its physical line, index in it, text) of every line, numbered as
    `str.splitlines` numbers the whole text, read a physical (\\n-ended) line at a time."""
    n = 0
    with open(path, "rb") as f:
        off = 0
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _NotUtf8(f"not UTF-8 text ({e.reason} at byte {off + e.start})") from None
            for k, line in enumerate(text.splitlines()):
                n += 1
                yield n, off, k, line
            off += len(raw)


class _Reader:
    """A valid record of the file again, by where its line is (for the Jaccard of a candidate pair)."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")

    def record(self, off: int, k: int) -> Record:
        self.f.seek(off)
        return parse_record(json.loads(self.f.readline().decode("utf-8").splitlines()[k]))

    def close(self) -> None:
        self.f.close()


class _Diversity:
    """Per source: prompts, distinct prompts (digests), distinct words and word pairs (word ids)."""

    def __init__(self):
        self.src: dict[str, dict] = {}

    def add(self, source: str, prompt: str) -> None:
        s = self.src.setdefault(source, {"n": 0, "prompts": set(), "vocab": {}, "bi": set(), "uni": 0, "n_bi": 0})
        s["n"] += 1
        s["prompts"].add(_digest(prompt))
        ids = [s["vocab"].setdefault(w, len(s["vocab"])) for w in _words(prompt)]
        s["uni"] += len(ids)
        s["n_bi"] += max(0, len(ids) - 1)
        s["bi"].update(x << 32 | y for x, y in zip(ids, ids[1:]))

    def report(self) -> dict[str, dict[str, float]]:
        return {src: {"prompts": s["n"], "unique_prompts": len(s["prompts"]),
                      "distinct_1": round(len(s["vocab"]) / s["uni"], 3) if s["uni"] else 0.0,
                      "distinct_2": round(len(s["bi"]) / s["n_bi"], 3) if s["n_bi"] else 0.0}
                for src, s in sorted(self.src.items())}


@dataclass
class _Pass:
    """What one pass over a file keeps: digests, counts, signatures, where each kept record is."""

    pairs: set = field(default_factory=set)  # 16-byte digests of (prompt, response)
    prompts: set = field(default_factory=set)
    ids: set = field(default_factory=set)
    kept: array = field(default_factory=lambda: array("q"))  # first of each (prompt, response): line, offset, index
    responses: Signatures = field(default_factory=Signatures)
    prompt_sigs: Signatures = field(default_factory=Signatures)
    diversity: _Diversity = field(default_factory=_Diversity)
    teacher_counts: array | None = field(default_factory=lambda: array("q"))  # metadata.tokens: prompt, completion

    def add(self, rep: FileReport, r: Record, where: tuple[int, int, int]) -> None:
        rep.truncated += r.metadata.get("finish_reason") == "length"
        rep.refusals += bool(_REFUSAL.match(r.response[:200]))
        rep.with_reasoning += bool(r.reasoning)
        pair, prompt = _digest(r.prompt, r.response), _digest(r.prompt)
        if pair in self.pairs:
            rep.exact_duplicates += 1
        else:
            if r.prompt and prompt in self.prompts:
                rep.duplicate_prompts += 1
            self.pairs.add(pair)
            self.kept.extend(where)
            self.responses.add(r.response)
            self.prompt_sigs.add(r.prompt)
        self.prompts.add(prompt)
        if r.id is not None:
            rid = _digest(json.dumps(r.id, sort_keys=True, default=str))
            rep.duplicate_ids += rid in self.ids
            self.ids.add(rid)
        if not r.is_text:
            self.diversity.add(r.source or "-", r.prompt)
        t = r.metadata.get("tokens")
        if self.teacher_counts is not None:
            if isinstance(t, dict) and "prompt" in t and "completion" in t:
                self.teacher_counts.extend((int(t["prompt"]), int(t["completion"])))
            else:
                self.teacher_counts = None


def validate_file(path: str | Path, tokenizer=None) -> FileReport:
    """The report for one file (see the module docstring). Never raises for bad lines. Reads the file
    a line at a time and keeps digests and MinHash signatures, not records: memory grows by bytes a
    record, whatever their text."""
    path = Path(path)
    rep = FileReport(str(path))
    if not path.is_file():
        rep.unusable.append((0, "file not found"))
        return rep
    seen = _Pass()
    try:
        for i, off, k, line in _lines(path):
            if not line.strip():
                continue
            rep.lines += 1
            try:
                rec = parse_record(json.loads(line))
            except json.JSONDecodeError as e:
                rep.unusable.append((i, f"invalid JSON ({e.msg})"))
                continue
            except ValueError as e:
                if "response is empty" in str(e):
                    rep.empty += 1
                rep.unusable.append((i, str(e)))
                continue
            rep.valid += 1
            seen.add(rep, rec, (i, off, k))
    except _NotUtf8 as e:
        return FileReport(str(path), unusable=[(0, str(e))])
    rep.near_duplicates, rep.near_duplicate_prompts = _near(path, seen)
    rep.lengths, rep.length_unit = _lengths(path, rep.valid, tokenizer, seen.teacher_counts)
    rep.diversity = seen.diversity.report()
    return rep


def _near(path: Path, seen: _Pass) -> tuple[list, list]:
    """Near-duplicate responses and prompts among the first of each (prompt, response), as
    (line, earlier line, jaccard); a candidate pair's texts are read back from the file."""
    kept = seen.kept
    reader = _Reader(path)
    try:
        def text_of(name: str):
            return lambda n: getattr(reader.record(kept[3 * n + 1], kept[3 * n + 2]), name)

        return tuple([(kept[3 * i], kept[3 * j], jac) for i, j, jac in sig.near(text_of(name))]
                     for sig, name in ((seen.responses, "response"), (seen.prompt_sigs, "prompt")))
    finally:
        reader.close()


def _store_lengths(path: Path, n: int, tokenizer) -> tuple[list[int], list[int]] | None:
    """(prompt, response) token counts of the file's records as training reads them, from the token
    store (built here when missing, so the train that follows maps it); None if the store holds
    another number of records than `n` (then they are counted one by one)."""
    from kdforge.data.store import Store, ensure_store, first_has_topk

    store = Store.open(ensure_store([path], tokenizer, with_topk=first_has_topk(path)).path)
    if len(store) != n:
        return None
    ex = store.examples
    return ex[:, 1].tolist(), (ex[:, 2] - 1).tolist()  # the response's count without its EOS


def token_lengths(path: Path, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt, response) token counts of the file's valid records, one by one: the prompt rendered as
    training renders it (`dataset.prompt_text`: the chat template, or its documented fallback for a
    tokenizer without one; 0 for a text record), the response without EOS."""
    from kdforge.data.dataset import prompt_text

    p, c = [], []
    for _, _, _, line in _lines(path):
        try:
            r = parse_record(json.loads(line)) if line.strip() else None
        except ValueError:  # json.JSONDecodeError too: unusable lines are reported apart
            continue
        if r is None:
            continue
        p.append(0 if r.is_text else len(tokenizer(prompt_text(tokenizer, r.prompt_messages),
                                                   add_special_tokens=False)["input_ids"]))
        c.append(len(tokenizer(r.response, add_special_tokens=False)["input_ids"]))
    return p, c


def _lengths(path: Path, n: int, tokenizer, teacher_counts: array | None) -> tuple[dict, str]:
    counted = _store_lengths(path, n, tokenizer) if tokenizer is not None else None
    if counted is not None:
        p, c = counted
        unit = f"tokens ({getattr(tokenizer, 'name_or_path', 'tokenizer')}; chat template as trained)"
    elif tokenizer is not None:
        p, c = token_lengths(path, tokenizer)
        unit = f"tokens ({getattr(tokenizer, 'name_or_path', 'tokenizer')})"
    else:
        if not n or teacher_counts is None:
            return {}, ""
        p, c = list(teacher_counts[0::2]), list(teacher_counts[1::2])
        unit = "teacher tokens (metadata.tokens; pass --tokenizer for the student's)"
    return {"prompt": _stats(p), "response": _stats(c), "total": _stats([a + b for a, b in zip(p, c)])}, unit


def validate_files(paths: list[str | Path], tokenizer_dir: str | Path | None = None) -> list[FileReport]:
    tok = None
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).exists():
            raise DataError("tokenizer folder not found (make one: kdforge tokenizer train ...)", str(tokenizer_dir))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    return [validate_file(p, tok) for p in paths]


def render(reports: list[FileReport]) -> str:
    out = []
    for r in reports:
        out.append(f"{r.path}")
        out.append(f"  lines {r.lines} · valid {r.valid} · unusable {len(r.unusable)} (empty responses {r.empty})")
        out.append(f"  truncated (finish_reason=length) {r.truncated} · refusals {r.refusals}"
                   + (f" · with reasoning {r.with_reasoning} (teacher_reasoning; trained by io.reasoning)"
                      if r.with_reasoning else ""))
        out.append(f"  duplicates: exact {r.exact_duplicates} · same prompt {r.duplicate_prompts} · "
                   f"repeated ids {r.duplicate_ids}")
        out.append(f"  near duplicates (word 3-gram Jaccard >= {NEAR_DUP_JACCARD}): responses {len(r.near_duplicates)}"
                   f" · prompts {len(r.near_duplicate_prompts)}")
        for what, pairs in (("response", r.near_duplicates), ("prompt", r.near_duplicate_prompts)):
            for line, first, jac in pairs[:3]:
                out.append(f"    near-duplicate {what}: line {line} ~ line {first} (Jaccard {jac})")
        if r.lengths:
            out.append(f"  lengths in {r.length_unit}:")
            for k, s in r.lengths.items():
                if s:
                    out.append(f"    {k:<8} min {s['min']} · mean {s['mean']} · p50 {s['p50']} · p90 {s['p90']} · "
                               f"p99 {s['p99']} · max {s['max']}")
        if r.diversity:
            out.append("  prompt diversity per source (distinct-1 / distinct-2 over all prompt n-grams):")
            for src, d in r.diversity.items():
                out.append(f"    {src:<12} {d['prompts']} prompts ({d['unique_prompts']} unique) · "
                           f"distinct-1 {d['distinct_1']} · distinct-2 {d['distinct_2']}")
        for line, why in r.unusable[:20]:
            out.append(f"  {r.path}:{line}: {why}")
        if len(r.unusable) > 20:
            out.append(f"  ... and {len(r.unusable) - 20} more unusable lines")
    return "\n".join(out)


def check_reports(reports: list[FileReport]) -> None:
    """Raise DataError (exit 2) naming every unusable line (the first 20), if there is any."""
    bad = [(r.path, line, why) for r in reports for line, why in r.unusable]
    if bad:
        where = "; ".join(f"{p}:{line}: {why}" if line else f"{p}: {why}" for p, line, why in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} unusable line(s): {where}{more}; fix or remove them")

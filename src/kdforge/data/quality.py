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

import json
import math
import re
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdforge.data.records import Record, parse_record
from kdforge.errors import DataError

NEAR_DUP_JACCARD = 0.8
_PERMS, _BANDS = 64, 16  # MinHash signature size, LSH bands (4 rows each: catches Jaccard >~ 0.5)
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


def near_duplicates(texts: list[str]) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with j < i the first earlier text whose 3-gram Jaccard with i is >= 0.8."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**61, _PERMS, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**61, _PERMS, dtype=np.uint64)
    sets = [_shingles(t) for t in texts]
    buckets: dict[tuple, int] = {}
    out = []
    rows = _PERMS // _BANDS
    for i, sh in enumerate(sets):
        if not sh:
            continue
        h = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh))
        sig = ((a[:, None] * h[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1)  # multiply-shift hashing
        match = None
        keys = [(k, sig[k * rows:(k + 1) * rows].tobytes()) for k in range(_BANDS)]
        for key in keys:
            j = buckets.get(key)
            if j is not None and match is None:
                jac = len(sh & sets[j]) / len(sh | sets[j])
                if jac >= NEAR_DUP_JACCARD:
                    match = (i, j, round(jac, 3))
        if match:
            out.append(match)
        else:
            for key in keys:  # only non-duplicates represent their bucket
                buckets.setdefault(key, i)
    return out


def _diversity(recs: list[Record]) -> dict[str, dict[str, float]]:
    by_source: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        if not r.is_text:
            by_source[r.source or "-"].append(r.prompt)
    out = {}
    for src, prompts in sorted(by_source.items()):
        words = [_words(p) for p in prompts]
        uni = [w for ws in words for w in ws]
        bi = [tuple(ws[i:i + 2]) for ws in words for i in range(len(ws) - 1)]
        out[src] = {"prompts": len(prompts), "unique_prompts": len(set(prompts)),
                    "distinct_1": round(len(set(uni)) / len(uni), 3) if uni else 0.0,
                    "distinct_2": round(len(set(bi)) / len(bi), 3) if bi else 0.0}
    return out


def validate_file(path: str | Path, tokenizer=None) -> FileReport:
    """The report for one file (see the module docstring). Never raises for bad lines."""
    path = Path(path)
    rep = FileReport(str(path))
    if not path.is_file():
        rep.unusable.append((0, "file not found"))
        return rep
    recs: list[Record] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        rep.unusable.append((0, f"not UTF-8 text ({e.reason} at byte {e.start})"))
        return rep
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rep.lines += 1
        try:
            obj = json.loads(line)
            rec = parse_record(obj)
        except json.JSONDecodeError as e:
            rep.unusable.append((i, f"invalid JSON ({e.msg})"))
            continue
        except ValueError as e:
            if "response is empty" in str(e):
                rep.empty += 1
            rep.unusable.append((i, str(e)))
            continue
        rec.line = i
        recs.append(rec)
    rep.valid = len(recs)

    seen_pairs, seen_prompts, seen_ids = set(), set(), set()
    for r in recs:
        rep.truncated += r.metadata.get("finish_reason") == "length"
        rep.refusals += bool(_REFUSAL.match(r.response[:200]))
        rep.with_reasoning += bool(r.reasoning)
        pair = (r.prompt, r.response)
        if pair in seen_pairs:
            rep.exact_duplicates += 1
        elif r.prompt and r.prompt in seen_prompts:
            rep.duplicate_prompts += 1
        seen_pairs.add(pair)
        seen_prompts.add(r.prompt)
        if r.id is not None:
            rep.duplicate_ids += r.id in seen_ids
            seen_ids.add(r.id)
    uniq = {}
    for r in recs:
        uniq.setdefault((r.prompt, r.response), r)
    kept = list(uniq.values())
    rep.near_duplicates = [(kept[i].line, kept[j].line, jac) for i, j, jac in near_duplicates([r.response for r in kept])]
    rep.near_duplicate_prompts = [(kept[i].line, kept[j].line, jac)
                                  for i, j, jac in near_duplicates([r.prompt for r in kept])]
    rep.lengths, rep.length_unit = _lengths(recs, tokenizer, path)
    rep.diversity = _diversity(recs)
    return rep


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


def _lengths(recs: list[Record], tokenizer, path: Path | None = None) -> tuple[dict, str]:
    counted = _store_lengths(path, len(recs), tokenizer) if tokenizer is not None and path is not None else None
    if counted is not None:
        p, c = counted
        unit = f"tokens ({getattr(tokenizer, 'name_or_path', 'tokenizer')}; chat template as trained)"
    elif tokenizer is not None:
        p, c = [], []
        for r in recs:
            if r.is_text:
                p.append(0)
            elif getattr(tokenizer, "chat_template", None):
                rendered = tokenizer.apply_chat_template(r.prompt_messages, tokenize=False, add_generation_prompt=True)
                p.append(len(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
            else:
                p.append(len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]))
            c.append(len(tokenizer(r.response, add_special_tokens=False)["input_ids"]))
        unit = f"tokens ({getattr(tokenizer, 'name_or_path', 'tokenizer')})"
    else:
        toks = [r.metadata.get("tokens") for r in recs]
        if not toks or not all(isinstance(t, dict) and "prompt" in t and "completion" in t for t in toks):
            return {}, ""
        p = [int(t["prompt"]) for t in toks]
        c = [int(t["completion"]) for t in toks]
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

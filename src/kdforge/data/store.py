"""The tokenised KD store: JSONL read once into flat, memory-mapped arrays (SPEC "KD data at scale").

A store is a folder named by its key, the sha256 of what its content depends on: the data files'
bytes (sha256 per file), the tokenizer (its serialised vocabulary/merges, chat template, EOS), whether
top-k rows are aligned, and the settings of alignment and reasoning (`settings`). The maximum sequence
length is not in the key: a store keeps whole examples and truncation applies when an example is read,
so every curriculum stage and every `max_seq_length` shares one store. Any change is a new key, so a
store is never stale; an old one is simply not opened again.

Layout (little-endian raw arrays; `meta.json` says dtypes and lengths):
- `tokens.bin` int32: each example's prompt ids then response ids (the response ends with EOS);
- `examples.bin` int64 [N, 8]: token start, prompt length, response length, first top-k row, first
  alternative, file index, line, flags (1: CE only, no teacher rows; 2: misaligned top-k, CE only);
- with top-k: `row_len.bin` uint16 (one row per response token, EOS's is empty), `alt_ids.bin`
  int32 and `alt_lp.bin` float16 (the alternatives of every row, back to back).
fp16 logprobs: the absolute error is at most |logprob| * 2**-11, and a probability's share of the
loss is p * |log p| <= 1/e, so the loss moves by < 2e-4 relative (tests/test_store.py measures loss
and gradient against fp32 storage). ~6 bytes per stored alternative where JSONL takes ~74.

Building streams: the files are hashed once, cut into chunks at line ends, and each chunk is parsed,
tokenised and aligned by a worker process (one per core) that returns small numpy arrays; the parent
appends them in order. Memory is bounded by a few chunks, whatever the file size. The store is built
in a hidden folder beside its final place and renamed when complete (never half-used); a file whose
bytes change while it is read is detected (per-chunk checksums against the first pass, then size and
mtime) and the build is retried once, then refused. A file lock lets concurrent builders (DDP ranks,
two runs) build once: the others wait and open the result.

A first build (files no hash memo knows, more than one worker) does not wait for the hashing pass:
a thread hashes the files and hands each chunk to the workers as it is cut, and the store's key is
known when the pass ends; a store found under that key after all is opened and the build dropped.
While one process builds so, others asking for the same paths wait for it (a lock on the paths,
the tokenizer and the settings), then open its store.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field
from itertools import chain, groupby
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from kdforge.errors import DataError, UsageError

STORE_VERSION = 1
CHUNK_BYTES = 4 << 20  # a worker's unit: ~2,700 tokens of top-20 JSONL; bounds each worker's memory
IN_PROCESS_BYTES = 8 << 20  # smaller inputs are built in this process: forking costs more than it saves
STORE_ENV = "KDFORGE_STORE_DIR"  # where stores go when set (else beside the data, else the user cache)
DEFAULT_SETTINGS = {"alignment": {"cross_tokenizer": "auto"}, "reasoning": "think", "prompt_only": False}
FLAG_CE_ONLY, FLAG_MISALIGNED = 1, 2
EX_COLS = 8  # columns of examples.bin
ARRAYS = {"tokens": np.int32, "examples": np.int64, "row_len": np.uint16, "alt_ids": np.int32, "alt_lp": np.float16}


# ============================================================================ fingerprints

def tokenizer_fingerprint(tok) -> str:
    """sha256 of what decides a tokenizer's ids: its serialised model (fast tokenizers) or vocabulary,
    its chat template, EOS and class. Memoised on the object (a tokenizer is not changed in use)."""
    memo = getattr(tok, "_kdforge_fingerprint", None)
    if memo:
        return memo
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Without truncation/padding: a call with truncation=True or padding sets them on the backend,
        # and they change no id of an unpadded, untruncated encoding (the store's).
        model = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(model, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    # Not the special tokens' roles: load_tokenizer gives a pad-less tokenizer EOS as its pad, which
    # changes no id, so the same folder has one fingerprint however it was loaded.
    h.update(json.dumps([type(tok).__name__, getattr(tok, "chat_template", None), tok.eos_token_id]).encode())
    fp = h.hexdigest()
    try:
        tok._kdforge_fingerprint = fp
    except AttributeError:
        pass
    return fp


@dataclass
class Chunk:
    """A run of whole lines of one file: bytes [start, end) and a checksum. Its lines are numbered
    from 1 by the worker and rebased by the parent (`Encoded.line_ends`), so the scan counts none."""

    file_index: int
    path: str
    start: int
    end: int
    crc: int


def _newlines(block: bytes) -> int:
    """Line ends in a chunk as Python's text mode counts them (\\n, \\r, \\r\\n: `iter_lines` reads
    so). A chunk ends at a \\n, so no \\r\\n is split between two."""
    n = block.count(b"\n")
    return n + block.count(b"\r") - block.count(b"\r\n") if b"\r" in block else n


def scan_file(path: str | Path, file_index: int = 0, chunk_bytes: int = CHUNK_BYTES) -> tuple[dict, list[Chunk]]:
    """One pass over a file: its fingerprint {file, size, sha256} (as in trainer_state.json) and its
    chunks, each cut after a newline once `chunk_bytes` are gathered, with a CRC32 of its bytes."""
    out: dict = {}
    chunks = list(scan_chunks(path, file_index, chunk_bytes, out))
    return out["fingerprint"], chunks


def scan_chunks(path: str | Path, file_index: int, chunk_bytes: int, out: dict) -> Iterator[Chunk]:
    """`scan_file` as it goes: each chunk as soon as it is cut; the fingerprint in out["fingerprint"]
    once the file is read to its end."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", str(p))
    h, n_chunks = hashlib.sha256(), 0
    pos = start = crc = 0  # bytes read; current chunk's start and CRC
    with open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            off = 0
            while off < len(block):
                want = max(0, start + chunk_bytes - (pos + off) - 1)  # bytes to pass before a cut may come
                cut = block.find(b"\n", off + want) if off + want < len(block) else -1
                end = len(block) if cut < 0 else cut + 1
                crc = zlib.crc32(memoryview(block)[off:end], crc)
                off = end
                if cut >= 0:
                    yield Chunk(file_index, str(p), start, pos + end, crc)
                    n_chunks += 1
                    start, crc = pos + end, 0
            pos += len(block)
    if pos > start or not n_chunks:
        yield Chunk(file_index, str(p), start, pos, crc)
    out["fingerprint"] = {"file": str(p), "size": pos, "sha256": h.hexdigest()}


def file_fingerprints(paths: Sequence[str | Path]) -> list[dict]:
    """[{file, size, sha256}] per file, in order: the trainer's data fingerprint. A file hashed
    before whose stat (device, inode, size, mtime, ctime) is unchanged is not read again (`_memo_get`):
    reopening a 5M-token store then costs no pass over 7.5 GB of JSONL."""
    return _fingerprint_scans(paths, 1 << 62)[0]


def _fingerprint_scans(paths: Sequence[str | Path], chunk_bytes: int) -> tuple[list[dict], dict[int, tuple]]:
    """(fingerprints, {file index: scan_file's result}): a file the memo does not know is hashed by
    `scan_file`, whose chunks a first build then uses (one pass over new data, not two)."""
    out, scans = [], {}
    for i, p in enumerate(paths):
        fp = _memo_get(p)
        if fp is None:
            st, t = os.stat(p), time.time()
            scans[i] = scan_file(p, i, chunk_bytes)
            fp = scans[i][0]
            _memo_put(p, fp, st, t)
        out.append(fp)
    return out, scans


MEMO_NAME = "sha256-memo.json"
QUIET_S = 2.0  # a file is remembered only if unchanged this long before its hashing began


def _stat_sig(st) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _memo_get(path: str | Path) -> dict | None:
    """The remembered {file, size, sha256} of `path` if its stat is the one recorded, else None."""
    try:
        entry = json.loads((default_root([path])[0] / MEMO_NAME).read_text()).get(str(Path(path).resolve()))
        if entry and entry["stat"] == _stat_sig(os.stat(path)):
            return {"file": str(path), "size": entry["size"], "sha256": entry["sha256"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _memo_put(path: str | Path, fp: dict, st, began: float) -> None:
    """Remember a hash only for a file that had been quiet QUIET_S when hashing began and is
    unchanged after it: any later write sets a ctime past the recorded one (the kernel's file clock
    is coarse: a write in the very tick of the hash could otherwise keep the recorded ctime), and
    ctime cannot be set back by a user (`touch -d` sets mtime, and moves ctime forward)."""
    try:
        if began - st.st_ctime < QUIET_S or _stat_sig(os.stat(path)) != _stat_sig(st):
            return
        memo_file = default_root([path])[0] / MEMO_NAME
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        memo[str(Path(path).resolve())] = {"stat": _stat_sig(st), "size": fp["size"], "sha256": fp["sha256"]}
        from kdforge.atomic import atomic_write_text

        atomic_write_text(memo_file, json.dumps(memo))
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # a memo is an optimisation: without it the file is hashed again


def store_key(files: list[dict], tok_fp: str, with_topk: bool, settings: dict) -> str:
    """The store's name: sha256 over everything its content depends on (file paths are not: a copy
    of the same bytes elsewhere is the same data, but file:line messages name the path it was built
    from, so the path is in the key too; a moved file rebuilds)."""
    blob = json.dumps({"v": STORE_VERSION, "files": [(str(Path(f["file"]).resolve()), f["size"], f["sha256"])
                                                     for f in files],
                       "tokenizer": tok_fp, "topk": with_topk, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def merged_settings(settings: dict | None) -> dict:
    """DEFAULT_SETTINGS with the caller's keys over them (a new setting makes a new store key)."""
    out = json.loads(json.dumps(DEFAULT_SETTINGS))
    for k, v in (settings or {}).items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# ============================================================================ location

def default_root(paths: Sequence[str | Path]) -> tuple[Path, str | None]:
    """(store root, note): $KDFORGE_STORE_DIR; else `.kdforge-store/` beside the first data file;
    else, when that folder cannot be written (read-only data), the user cache, and a note saying so."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env), None
    beside = Path(paths[0]).resolve().parent / ".kdforge-store"
    if _writable(beside):
        return beside, None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdforge" / "store"
    return cache, f"{beside.parent} is not writable: the token store goes to {cache} (set {STORE_ENV} to choose)"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


# ============================================================================ encoding (one chunk)

@dataclass
class Encoded:
    """Flat arrays of some examples (a chunk, or records in memory) and what their encoding found."""

    tokens: np.ndarray
    examples: np.ndarray  # [n, EX_COLS]; starts relative to this piece until appended
    row_len: np.ndarray
    alt_ids: np.ndarray
    alt_lp: np.ndarray
    problems: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line, message): unusable lines
    misaligned: list[tuple[str, int, str]] = field(default_factory=list)
    carried: list[int] = field(default_factory=lambda: [0, 0, 0])  # dataset.CarryCount's fields
    lines: int = 0
    line_ends: int = 0  # a chunk's line ends: what the next chunk's line numbers are rebased by
    files: list[str] = field(default_factory=list)  # file index -> path (records read in memory)


class Encoder:
    """Appends tokenised records to flat lists; `take()` turns them into an `Encoded` piece.

    The per-record alignment of teacher rows is ONE function, `align` (default: `align_record`,
    same tokenizer on both sides); a cross-tokenizer aligner with the same signature plugs in there."""

    def __init__(self, tokenizer, with_topk: bool, settings: dict | None = None, token_map=None,
                 align: Callable | None = None):
        from kdforge.data.dataset import TokenMap, align_record

        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.with_topk = with_topk
        self.settings = merged_settings(settings)
        self.tm = token_map if token_map is not None or not with_topk else TokenMap(tokenizer)
        self.align = align or align_record
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.ex: list[tuple] = []
        self.n_rows = self.n_alts = 0
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per record: row_len, ids, logprobs
        self.misaligned: list[tuple[str, int, str]] = []
        self.carried = [0, 0, 0]

    def add_all(self, recs: list, path: str, file_index: int) -> None:
        """Add every record of one file, their prompts and responses tokenised in two batched calls
        (a tokenizer call's own overhead is ~0.1 ms: per record, it was a tenth of a build)."""
        from kdforge.data.dataset import prompt_text

        if not recs:
            return
        from kdforge.data.rows import TeacherRows

        tok = self.tok
        texts = [prompt_text(tok, r.prompt_messages) for r in recs if not r.is_text]
        prompts = iter(tok(texts, add_special_tokens=False)["input_ids"] if texts else ())
        # a response the teacher's tokens spell (fast path rows) has those ids: it is not tokenised
        resps: list = [None] * len(recs)
        todo = [j for j, r in enumerate(recs) if not (self.with_topk and isinstance(r.teacher_logprobs, TeacherRows)
                                                    and r.teacher_logprobs.spells(self.tm, r.response))]
        if todo:
            ids = tok([recs[j].response for j in todo], add_special_tokens=False)["input_ids"]
            for j, i in zip(todo, ids):
                resps[j] = i
        for r, resp in zip(recs, resps):
            self._add(r, path, file_index, [] if r.is_text else next(prompts), resp)

    def _add(self, rec, path: str, file_index: int, prompt: list[int], resp: list[int] | None) -> None:
        """One record, its prompt (rendered by the chat template) and response tokenised by `add_all`
        (None: the teacher's tokens spell it, TeacherRows.align takes them): its example (response +
        EOS) and its aligned rows."""
        tok = self.tok
        # io.reasoning: a thinking teacher's reasoning before the answer (think) or not (drop), tokenised
        # apart: the teacher's top-k rows cover the answer only (the thinking trains with CE)
        think = rec.thinking_prefix(self.settings["reasoning"], tok)
        think = tok(think, add_special_tokens=False)["input_ids"] if think else []
        flags, rows = 0, None
        if self.with_topk:
            if not rec.teacher_logprobs:  # text lines, prompt/completion...: CE only, counted
                flags = FLAG_CE_ONLY
            else:
                try:
                    resp, rows = self._align(rec, resp)
                except DataError as e:
                    flags = FLAG_MISALIGNED
                    self.misaligned.append((path, rec.line, bare_message(e)))
        resp = [*think, *resp, self.eos]
        self.ex.append((len(self.tokens), len(prompt), len(resp), self.n_rows, self.n_alts,
                        file_index, rec.line, flags))
        self.tokens += prompt
        self.tokens += resp
        if self.with_topk:
            row_len, ids, lps = rows if rows is not None else (_EMPTY_I, _EMPTY_I, _EMPTY_F)
            pad = len(resp) - len(row_len)  # thinking before, EOS after: no teacher row
            row_len = np.concatenate([np.zeros(len(think), np.int64), row_len,
                                      np.zeros(pad - len(think), np.int64)])
            self.rows.append((row_len, ids, lps))
            self.n_rows += len(row_len)
            self.n_alts += len(ids)

    def _align(self, rec, resp: list[int]):
        """(response ids, (row_len, ids, logprobs)) of a record with teacher rows: `TeacherRows` (the
        fast path, data/rows.py) where they line up 1:1, else the ONE aligner `self.align` on dicts."""
        from kdforge.data.rows import TeacherRows

        lp = rec.teacher_logprobs
        if isinstance(lp, TeacherRows):
            fast = lp.align(self.tm, rec.response, resp)
            if fast is not None:
                return fast[0], fast[1:]
            rec.teacher_logprobs = lp.entries()
        resp, ids, lps, *carried = self.align(self.tm, rec, resp, self.settings)
        if carried:  # another tokenizer (dataset.carry_record): counted for the log
            c = carried[0]
            self.carried = [self.carried[0] + c.records, self.carried[1] + c.positions,
                            self.carried[2] + c.one_to_one]
        return resp, (np.fromiter(map(len, ids), np.int64, len(ids)),
                      np.fromiter(chain.from_iterable(ids), np.int64),
                      np.fromiter(chain.from_iterable(lps), np.float64))

    def take(self) -> Encoded:
        rows = self.rows
        cat = (lambda k, dt: np.concatenate([r[k] for r in rows]).astype(dt) if rows else np.zeros(0, dt))
        out = Encoded(np.asarray(self.tokens, dtype=np.int32),
                      np.asarray(self.ex, dtype=np.int64).reshape(-1, EX_COLS),
                      cat(0, np.uint16), cat(1, np.int32), cat(2, np.float32).astype(np.float16),
                      misaligned=self.misaligned, carried=self.carried)
        self._reset()
        return out


_EMPTY_I, _EMPTY_F = np.zeros(0, np.int64), np.zeros(0, np.float64)


def encode_records(records, tokenizer, with_topk: bool, *, settings: dict | None = None, path: str = "",
                   token_map=None) -> Encoded:
    """Records already read (eval files, a daemon batch) as one in-memory piece, encoded exactly as a
    store's chunks are. A record's file is its `metadata['_path']` when set, else `path`."""
    enc = Encoder(tokenizer, with_topk, settings, token_map)
    files: dict[str, int] = {}
    of_file = (lambda r: r.metadata.get("_path", path) if r.metadata else path)
    for p, run in groupby(records, key=of_file):  # each run of one file's records: tokenised together
        enc.add_all(list(run), p, files.setdefault(p, len(files)))
    out = enc.take()
    out.files = list(files)
    return out


def encode_examples(examples) -> Encoded:
    """Examples made elsewhere (lists of ids and rows; eval's server-scored copies) as one piece."""
    tokens, ex, row_len, alt_ids, alt_lp = [], [], [], [], []
    for e in examples:
        ex.append((len(tokens), len(e.prompt_ids), len(e.response_ids), len(row_len), len(alt_ids), 0, e.line, 0))
        tokens += [*e.prompt_ids, *e.response_ids]
        rows = e.topk_ids if e.topk_ids is not None else [[] for _ in e.response_ids]
        lps = e.topk_logprobs if e.topk_logprobs is not None else rows
        for r_ids, r_lp in zip(rows, lps):
            row_len.append(len(r_ids))
            alt_ids += r_ids
            alt_lp += r_lp
    return Encoded(np.asarray(tokens, dtype=np.int32), np.asarray(ex, dtype=np.int64).reshape(-1, EX_COLS),
                   np.asarray(row_len, dtype=np.uint16), np.asarray(alt_ids, dtype=np.int32),
                   np.asarray(alt_lp, dtype=np.float32).astype(np.float16))


def bare_message(e: DataError) -> str:
    """A DataError's message without its "file:line: " prefix (stored apart, as path and line)."""
    msg = str(e.args[0])
    where = f"{e.path}:{e.line}: " if e.path and e.line else (f"{e.path}: " if e.path else "")
    return msg[len(where):] if msg.startswith(where) else msg


# ----------------------------------------------------------------------------- worker side

_WORK: dict = {}  # what forked workers inherit: tokenizer, token map, settings (set before the pool starts)


def encode_chunk(chunk: Chunk) -> Encoded:
    """Parse, tokenise and align one chunk's lines (in a worker, or in process). Raises DataError
    when the bytes read differ from the first pass's (the file changed while the store was built)."""
    from kdforge.data.records import parse_lines

    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        raw = f.read(chunk.end - chunk.start)
    if len(raw) != chunk.end - chunk.start or zlib.crc32(raw) != chunk.crc:
        raise FileChanged(chunk.path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {chunk.start + e.start})", chunk.path) from None
    enc: Encoder = _WORK["encoder"]
    prompt_only = bool(enc.settings.get("prompt_only"))
    by_raw = enc.tm.by_raw if enc.with_topk else None
    problems, kept = [], []
    n_lines = 0
    lines, line_ends = _chunk_lines(raw, text)
    for lineno, line in lines:
        fast = _fast(line, lineno, by_raw, prompt_only) if by_raw is not None else None
        if fast is None:  # the general path: any line, and every error message
            s = (str(line, "utf-8") if isinstance(line, memoryview) else line).strip()
            if not s:
                continue
            recs, probs = parse_lines([(lineno, s)], chunk.path, strict=False, prompt_only=prompt_only)
            problems += [(chunk.path, p.line, bare_message(p)) for p in probs]
        else:
            recs = fast
        n_lines += 1
        for r in recs:
            r.metadata = {**r.metadata, "_path": chunk.path}
        kept += recs
    enc.add_all(kept, chunk.path, chunk.file_index)
    out = enc.take()
    out.problems, out.lines = problems, n_lines
    out.line_ends = line_ends
    return out


def _chunk_lines(raw: bytes, text: str) -> tuple[Iterable, int]:
    """((line number, line) of a chunk as `records.iter_lines` numbers them, the chunk's line ends):
    views of the bytes between \n where the chunk has no \r (msgspec reads them in place: no copy of
    a 300 KB line), else universal-newline text. A line is given unstripped of non-ASCII whitespace:
    the caller strips it as text when needed."""
    if b"\r" in raw:
        return enumerate(io.StringIO(text, newline=None), 1), _newlines(raw)
    ends = list(_find_all(raw, 10))
    starts = [0, *(e + 1 for e in ends)]
    view = memoryview(raw)
    return enumerate((_stripped(view, a, b) for a, b in zip(starts, [*ends, len(raw)])), 1), len(ends)


_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() strips


def _stripped(view: memoryview, a: int, b: int) -> memoryview:
    """view[a:b] without ASCII whitespace at either end (bytes.strip, without a copy)."""
    while a < b and view[a] in _ASCII_SPACE:
        a += 1
    while b > a and view[b - 1] in _ASCII_SPACE:
        b -= 1
    return view[a:b]


def _find_all(raw: bytes, byte: int):
    """Positions of `byte` in `raw` (bytes.find from each one: lines are long, so few calls)."""
    sep = bytes([byte])
    i = raw.find(sep)
    while i >= 0:
        yield i
        i = raw.find(sep, i + 1)


def _fast(text: str | memoryview, lineno: int, by_raw: dict, prompt_only: bool) -> list | None:
    """[the line's Record] by data/rows.py's fast path, or None for the general path (also when the
    line is unusable: parse_lines then names the reason as it always has)."""
    from kdforge.data.rows import fast_record

    try:
        rec = fast_record(text, by_raw, prompt_only)
    except ValueError:
        return None
    if rec is None:
        return None
    rec.line = lineno
    return [rec]


class FileChanged(Exception):
    """A data file's bytes differ between the hashing pass and the build (a writer is still at it)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


# ============================================================================ building

@dataclass
class BuildInfo:
    """What `ensure_store` did: the store folder, whether it was built now, how long it took."""

    path: Path
    built: bool
    seconds: float
    tokens: int
    note: str | None = None


BUILD_COUNT = {"n": 0}  # builds in this process: tests count them (a resumed run must not rebuild)


def ensure_store(paths: Sequence[str | Path], tokenizer, *, with_topk: bool, settings: dict | None = None,
                 root: str | Path | None = None, workers: int | None = None, progress: bool | None = None,
                 fingerprints: list[dict] | None = None, chunk_bytes: int = CHUNK_BYTES) -> BuildInfo:
    """The store of these files on this tokenizer: opened if it exists, else built (streaming, one
    worker per core, atomically published). `fingerprints` ([{file,size,sha256}], from a pass the
    caller already made) spares hashing the files again when the store exists."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    for p in paths:
        if not Path(p).is_file():
            raise DataError("file not found", p)
    note = None
    if root is None:
        root, note = default_root(paths)
    root = Path(root)
    from kdforge.daemon.infra import machine_errors

    # a full disk (or quota, file size limit, I/O error) is the machine's: one line naming the folder
    with machine_errors(f"building the token store in {root} (KDFORGE_STORE_DIR puts stores on another disk)"):
        return _ensure(paths, root, note, tokenizer, with_topk, settings, workers, progress, fingerprints,
                       chunk_bytes, t0)


def _ensure(paths: list[str], root: Path, note: str | None, tokenizer, with_topk: bool, settings: dict | None,
            workers: int | None, progress: bool | None, fingerprints: list[dict] | None, chunk_bytes: int,
            t0: float) -> BuildInfo:
    settings = merged_settings(settings)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if fingerprints is None:  # the memo read once: all known (a reopen), or a first build
        memo = [_memo_get(p) for p in paths]
        fingerprints = memo if None not in memo else None
    if fingerprints is None:
        root.mkdir(parents=True, exist_ok=True)
        done = _build_while_hashing(paths, root, tokenizer, with_topk, settings, workers, progress, tok_fp,
                                    chunk_bytes)
        if done is not None:
            final, built, n = done
            return BuildInfo(final, built, time.perf_counter() - t0, n, note)
    for attempt in range(2):
        files, scanned = ((fingerprints, {}) if fingerprints is not None and not attempt
                          else _fingerprint_scans(paths, chunk_bytes))
        key = store_key(files, tok_fp, with_topk, settings)
        final = root / key
        if (final / "meta.json").is_file():
            return BuildInfo(final, False, time.perf_counter() - t0, _meta(final)["n_tokens"], note)
        root.mkdir(parents=True, exist_ok=True)
        # one build of these paths at a time: a build during the hashing pass (which holds this lock
        # until it publishes) is waited for, not run twice; then one builder per key
        with _Lock(root / f".build-{_intent_key(paths, tok_fp, with_topk, settings)}.lock"), \
                _Lock(root / f".{key}.lock"):
            if (final / "meta.json").is_file():  # another process built it while we waited
                return BuildInfo(final, False, time.perf_counter() - t0, _meta(final)["n_tokens"], note)
            _sweep_dead(root)
            began = [(os.stat(p), time.time()) for p in paths]
            scans = [scanned.get(i) or scan_file(p, i, chunk_bytes) for i, p in enumerate(paths)]
            if [s[0] for s in scans] != files:
                continue  # the file changed since it was fingerprinted: fingerprint it again
            for i, (p, (st, t), (fp, _)) in enumerate(zip(paths, began, scans)):
                if i not in scanned:
                    _memo_put(p, fp, st, t)
            try:
                n = _build(final, key, scans, tokenizer, with_topk, settings, workers, progress, tok_fp)
            except FileChanged as e:
                if attempt:
                    raise DataError("changed while the token store was built (a writer is still appending?); "
                                    "nothing was published: run again once the file is complete", e.path) from None
                continue
            BUILD_COUNT["n"] += 1
            return BuildInfo(final, True, time.perf_counter() - t0, n, note)
    raise DataError("kept changing while its token store was to be built: run again once the data is complete",
                    ", ".join(paths))


class _Lock:
    """An exclusive flock on a file beside the store: one builder per key across processes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()

    def try_enter(self) -> bool:
        """Take the lock if no other process holds it (True), else leave it (False)."""
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            self.f.close()
            return False


class _Hashing:
    """The hashing pass over the files in a thread: each chunk handed on as soon as it is cut (its
    CRC known), the fingerprints once the last file is read. The thread starts on the first chunk
    asked for: after the worker pool has forked (a fork never copies a running thread's locks)."""

    def __init__(self, paths: list[str], chunk_bytes: int):
        import queue
        import threading

        self.paths, self.chunk_bytes = paths, chunk_bytes
        self.queue: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.files: list[dict] = []
        self.began: list[tuple] = []  # (stat, time) of each file as its hashing began: the memo's rule
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kdforge-store-hash", daemon=True)

    def _run(self) -> None:
        try:
            for i, p in enumerate(self.paths):
                self.began.append((os.stat(p), time.time()))
                out: dict = {}
                for c in scan_chunks(p, i, self.chunk_bytes, out):
                    self.queue.put(c)
                self.files.append(out["fingerprint"])
        except BaseException as e:  # noqa: BLE001 - raised again in the thread that reads the chunks
            self.error = e
        finally:
            self.done.set()
            self.queue.put(None)

    def chunks(self) -> Iterator[Chunk]:
        self.thread.start()
        while (c := self.queue.get()) is not None:
            yield c
        if self.error is not None:
            raise self.error


def _build_while_hashing(paths: list[str], root: Path, tokenizer, with_topk: bool, settings: dict,
                         workers: int | None, progress: bool | None, tok_fp: str,
                         chunk_bytes: int) -> tuple[Path, bool, int] | None:
    """A first build of files the memo does not know: the workers take each chunk as the hashing pass
    cuts it, instead of waiting for the whole pass (~15% of a build on 2 cores). The store's key needs
    the whole pass: once it is known, a store that exists after all is opened and this build dropped.
    -> (store, built, tokens), or None where the usual way must go on: one process at a time builds
    these files so (others wait for its store under the key's lock), a small input has no workers,
    and a file that changed under the build is fingerprinted again."""
    total = sum(os.stat(p).st_size for p in paths)
    n_workers = _n_workers(workers, total)
    if n_workers <= 1:
        return None
    intent = _Lock(root / f".build-{_intent_key(paths, tok_fp, with_topk, settings)}.lock")
    if not intent.try_enter():  # another process builds these paths: wait for it, then the usual way
        with intent:  # (its memo spares hashing again where the files were quiet)
            return None
    _sweep_dead(root)
    hashing = _Hashing(paths, chunk_bytes)
    tmp = root / _tmp_name("hashing")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _Writer(tmp, with_topk)
        final = _write_pieces(writer, hashing.chunks(), total, tokenizer, with_topk, settings, n_workers, progress,
                              lambda: root / store_key(hashing.files, tok_fp, with_topk, settings)
                              if hashing.done.is_set() and hashing.error is None else None)
        if final is None:
            final = root / store_key(hashing.files, tok_fp, with_topk, settings)
        for p, (st, t), fp in zip(paths, hashing.began, hashing.files):
            _memo_put(p, fp, st, t)
        with _Lock(root / f".{final.name}.lock"):
            if (final / "meta.json").is_file():  # built by another process, or before: this one is dropped
                writer.close()
                shutil.rmtree(tmp, ignore_errors=True)
                return final, False, _meta(final)["n_tokens"]
            n = _publish(tmp, final, writer, hashing.files, final.name, tok_fp, with_topk, settings)
        BUILD_COUNT["n"] += 1
        return final, True, n
    except _Exists as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return e.final, False, _meta(e.final)["n_tokens"]
    except FileChanged:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        intent.__exit__()


def _tmp_name(what: str) -> str:
    """A build's hidden folder: named by host and pid, so a later build can tell one left by a
    killed process (`_sweep_dead`) from one another process is writing."""
    return f".tmp-{what}-{socket.gethostname()}-{os.getpid()}"


def _sweep_dead(root: Path) -> None:
    """Remove the hidden folders of builds whose process on this host is gone (SIGKILL, OOM): a cut
    build of 5M tokens leaves ~600 MB. Called holding the build lock of some paths; a folder of
    another host is never touched (its pid means nothing here)."""
    host = socket.gethostname()
    for d in root.glob(".tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not d.name.endswith(f"-{host}-{pid}"):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass  # alive (another user's)


class _Exists(Exception):
    """The store turned out to exist once the hashing pass named it: the build in progress is dropped."""

    def __init__(self, final: Path):
        self.final = final


def _intent_key(paths: list[str], tok_fp: str, with_topk: bool, settings: dict) -> str:
    """What names a build before the files are hashed: their paths, the tokenizer and the settings."""
    text = json.dumps([[str(Path(p).resolve()) for p in paths], tok_fp, with_topk, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _n_workers(workers: int | None, total_bytes: int) -> int:
    if workers is not None:
        return max(1, workers)
    if total_bytes <= IN_PROCESS_BYTES:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _build(final: Path, key: str, scans, tokenizer, with_topk: bool, settings: dict, workers: int | None,
           progress: bool | None, tok_fp: str) -> int:
    """Write the store into a hidden folder beside `final`, then rename it there. Returns its tokens."""
    files = [s[0] for s in scans]
    chunks = [c for s in scans for c in s[1]]
    total = sum(f["size"] for f in files)
    tmp = final.parent / _tmp_name(key)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _Writer(tmp, with_topk)
        _write_pieces(writer, chunks, total, tokenizer, with_topk, settings, _n_workers(workers, total), progress)
        return _publish(tmp, final, writer, files, key, tok_fp, with_topk, settings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_pieces(writer: "_Writer", chunks: Iterable[Chunk], total: int, tokenizer, with_topk: bool,
                  settings: dict, n_workers: int, progress: bool | None,
                  final_if_known: Callable[[], Path | None] | None = None) -> Path | None:
    """Encode the chunks (in order, by the workers) into `writer`, with a progress bar over `total`
    bytes. `final_if_known` (a build during the hashing pass): asked after each piece for the store's
    folder; once it names one that exists, the build stops (raises _Exists). -> that folder, if named."""
    n_files = len({c.file_index for c in chunks}) if isinstance(chunks, list) else None
    label = f"token store ({n_files} file{'s' * (n_files > 1)})" if n_files else "token store"
    bar = _Bar(total, progress, label)
    final = None
    pieces = _pieces(chunks, tokenizer, with_topk, settings, n_workers)
    try:
        lines_before = {}  # file index -> line ends in its chunks appended so far
        for piece, chunk in pieces:
            before = lines_before.get(chunk.file_index, 0)
            writer.append(piece, before)
            lines_before[chunk.file_index] = before + piece.line_ends
            bar.advance(chunk.end - chunk.start)
            if final is None and final_if_known is not None and (final := final_if_known()) is not None:
                if (final / "meta.json").is_file():
                    writer.close()
                    raise _Exists(final)
    finally:
        pieces.close()
        bar.close()
    return final


def _publish(tmp: Path, final: Path, writer: "_Writer", files: list[dict], key: str, tok_fp: str,
             with_topk: bool, settings: dict) -> int:
    """Finish the store written in `tmp` and rename it to `final` (the files must still be what was
    hashed: a write that kept every chunk's CRC still moves their size). Returns its tokens."""
    for f in files:
        if Path(f["file"]).stat().st_size != f["size"]:
            writer.close()
            raise FileChanged(f["file"])
    meta = writer.finish({"version": STORE_VERSION, "key": key, "files": files, "tokenizer": tok_fp,
                          "with_topk": with_topk, "settings": settings, "created": time.time()})
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _prune_superseded(final.parent, meta)
    return meta["n_tokens"]


def _prune_superseded(root: Path, meta: dict) -> None:
    """Remove the stores of earlier versions of the same files (same paths, tokenizer and settings,
    other bytes): never opened again (their key names bytes that are gone), they would only fill the
    disk. A process that still maps one keeps reading it (the files live until unmapped)."""
    same = ([f["file"] for f in meta["files"]], meta["tokenizer"], meta["with_topk"], meta["settings"])
    for old in root.iterdir():
        if old.name == meta["key"] or old.name.startswith(".") or not (old / "meta.json").is_file():
            continue
        try:
            m = _meta(old)
            if ([f["file"] for f in m["files"]], m["tokenizer"], m["with_topk"], m["settings"]) == same:
                shutil.rmtree(old, ignore_errors=True)
        except (OSError, ValueError, KeyError):
            continue


def _pieces(chunks: Iterable[Chunk], tokenizer, with_topk: bool, settings: dict, n_workers: int):
    """(Encoded, Chunk) in file order: in this process, or from forked workers with at most
    2 x workers chunks in flight (memory stays bounded when the parent writes slower). `chunks` may
    be cut as they are asked for (`_Hashing`): the pool forks before the first is asked for."""
    from kdforge.data.dataset import TokenMap

    enc = _WORK["encoder"] = Encoder(tokenizer, with_topk, settings,
                                     token_map=TokenMap(tokenizer) if with_topk else None)
    if with_topk:
        enc.tm.by_raw  # built once here, before the workers fork (a 150k vocabulary: ~0.3 s each)
    try:
        if n_workers <= 1 or (isinstance(chunks, list) and len(chunks) <= 1):
            for c in chunks:
                yield encode_chunk(c), c
            return
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked Rust pool would warn and deadlock
        ctx = mp.get_context("fork")
        with ctx.Pool(n_workers) as pool:
            pending = []
            it = iter(chunks)
            for c in it:
                pending.append((pool.apply_async(encode_chunk, (c,)), c))
                if len(pending) >= 2 * n_workers:
                    break
            while pending:
                res, c = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((pool.apply_async(encode_chunk, (nxt,)), nxt))
                yield res.get(), c
    finally:
        _WORK.clear()


class _Writer:
    """Appends encoded pieces to the store's raw files, rebasing their offsets."""

    def __init__(self, folder: Path, with_topk: bool):
        self.folder = folder
        names = ["tokens", "examples"] + (["row_len", "alt_ids", "alt_lp"] if with_topk else [])
        self.files = {n: open(folder / f"{n}.bin", "wb") for n in names}
        self.n = {n: 0 for n in names}  # elements written
        self.problems: list = []
        self.misaligned: list = []
        self.carried = [0, 0, 0]
        self.lines = 0

    def append(self, piece: Encoded, lines_before: int = 0) -> None:
        """Append a piece; `lines_before`: the lines of its file before it (a chunk numbers from 1)."""
        ex = piece.examples.copy()
        ex[:, 0] += self.n["tokens"]
        ex[:, 6] += lines_before
        if "row_len" in self.files:
            ex[:, 3] += self.n["row_len"]
            ex[:, 4] += self.n["alt_ids"]
        for name, arr in (("tokens", piece.tokens), ("examples", ex), ("row_len", piece.row_len),
                          ("alt_ids", piece.alt_ids), ("alt_lp", piece.alt_lp)):
            if name in self.files:
                self.files[name].write(np.ascontiguousarray(arr, dtype=ARRAYS[name]).tobytes())
                self.n[name] += len(arr)
        self.problems += [(p, line + lines_before, m) for p, line, m in piece.problems]
        self.misaligned += [(p, line + lines_before, m) for p, line, m in piece.misaligned]
        self.carried = [a + b for a, b in zip(self.carried, piece.carried)]
        self.lines += piece.lines

    def close(self) -> None:
        """Close the files without publishing (a build dropped)."""
        for f in self.files.values():
            f.close()

    def finish(self, meta: dict) -> dict:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta.update(n_examples=self.n["examples"], n_tokens=self.n["tokens"], lines=self.lines,
                    lengths={k: v for k, v in self.n.items()}, problems=self.problems, misaligned=self.misaligned,
                    carried=self.carried)
        from kdforge.atomic import atomic_write_text

        atomic_write_text(self.folder / "meta.json", json.dumps(meta))
        return meta


def records_store(records, fingerprint: dict, tokenizer, *, with_topk: bool, settings: dict | None,
                  root: Path) -> tuple["Store", bool]:
    """(store, built) of records already read (a daemon batch, `fingerprint` the bytes it read): the
    store encoded earlier from these very bytes (a restart mid-batch does not tokenise again), else
    encoded now, published atomically, and older batches' stores in `root` removed."""
    settings = merged_settings(settings)
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = store_key([fingerprint], tok_fp, with_topk, settings)
    final = root / key
    if (final / "meta.json").is_file():
        return Store.open(final), False
    piece = encode_records(records, tokenizer, with_topk, settings=settings, path=fingerprint["file"])
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = _Writer(tmp, with_topk)
        writer.append(piece)
        writer.finish({"version": STORE_VERSION, "key": key, "files": [fingerprint], "tokenizer": tok_fp,
                       "with_topk": with_topk, "settings": settings, "created": time.time()})
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():  # one batch at a time: the stores of batches done are not read again
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    BUILD_COUNT["n"] += 1
    return Store.open(final), True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class _Bar:
    """A rich progress bar over bytes read on a terminal; nothing otherwise (logs and CI stay quiet)."""

    def __init__(self, total: int, show: bool | None, label: str):
        if show is None:
            show = sys.stderr.isatty() and not os.environ.get("CI") and total > IN_PROCESS_BYTES
        self.bar = None
        if show:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                                transient=True)
            self.task = self.bar.add_task("build", total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


# ============================================================================ reading

class Store:
    """A built store opened read-only: memory-mapped arrays (or in-memory ones, for records that
    were never a file), the files it was built from, and what the build found."""

    def __init__(self, arrays: dict[str, np.ndarray], files: list[str], meta: dict, path: Path | None = None):
        self.tokens = arrays["tokens"]
        self.examples = arrays["examples"].reshape(-1, EX_COLS)
        self.row_len = arrays.get("row_len")
        self.alt_ids = arrays.get("alt_ids")
        self.alt_lp = arrays.get("alt_lp")
        self.files = files
        self.meta = meta
        self.path = path

    @classmethod
    def open(cls, folder: str | Path) -> "Store":
        """Map a published store (no data is read until an example is)."""
        folder = Path(folder)
        meta = _meta(folder)
        if meta.get("version") != STORE_VERSION:
            raise UsageError(f"{folder}: a token store of version {meta.get('version')}, this kdforge reads "
                             f"{STORE_VERSION}: delete the folder (it is rebuilt)")
        arrays = {}
        for name, n in meta["lengths"].items():
            shape = (n, EX_COLS) if name == "examples" else (n,)
            arrays[name] = (np.memmap(folder / f"{name}.bin", dtype=ARRAYS[name], mode="r", shape=shape)
                            if n else np.zeros(shape, dtype=ARRAYS[name]))
        return cls(arrays, [f["file"] for f in meta["files"]], meta, folder)

    @classmethod
    def from_encoded(cls, piece: Encoded, files: list[str], with_topk: bool) -> "Store":
        arrays = {"tokens": piece.tokens, "examples": piece.examples}
        if with_topk:
            arrays.update(row_len=piece.row_len, alt_ids=piece.alt_ids, alt_lp=piece.alt_lp)
        meta = {"problems": piece.problems, "misaligned": piece.misaligned, "carried": piece.carried,
                "with_topk": with_topk,
                "n_examples": len(piece.examples), "n_tokens": len(piece.tokens)}
        return cls(arrays, files, meta)

    def __len__(self) -> int:
        return len(self.examples)

    def nbytes(self) -> int:
        """Bytes of the arrays (the store's size on disk, less meta.json)."""
        return sum(a.nbytes for a in (self.tokens, self.examples, self.row_len, self.alt_ids, self.alt_lp)
                   if a is not None)


def iter_store_lines(problems: Iterable) -> list[DataError]:
    """The stored (path, line, message) of unusable lines as DataErrors, as read_records gives them."""
    return [DataError(msg, path, line) for path, line, msg in problems]


# ============================================================================ `kdforge data build`

def first_has_topk(path: str | Path) -> bool:
    """Whether the file's first record carries teacher_logprobs (what `data build` aligns by default)."""
    from kdforge.data.records import iter_lines

    for _, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        return isinstance(obj, dict) and bool(obj.get("teacher_logprobs"))
    return False


def build_command(files: Sequence[str | Path], tokenizer_dir: str | Path, *, max_seq_length: int | None = None,
                  out: str | Path | None = None, topk: bool | None = None) -> str:
    """`kdforge data build`: build (or find) the store of `files` and say what it holds. Raises
    DataError (exit 2) for a bad line, naming file:line, as training would."""
    from kdforge.data.dataset import CarryCount, KDDataset

    if topk is None:
        topk = first_has_topk(files[0]) if Path(files[0]).is_file() else False
    ds = KDDataset([str(f) for f in files], tokenizer_dir, max_seq_length or (1 << 62), with_topk=topk,
                   store_dir=out)
    info, s = ds.store_info, ds._store
    n_alt = len(s.alt_ids) if s.alt_ids is not None else 0
    lines = [f"{'built' if info.built else 'reused'} token store {info.path} "
             f"({'with' if topk else 'without'} teacher top-k rows)" + (f" in {info.seconds:.1f} s, "
                                                                        f"{info.tokens / max(info.seconds, 1e-9):,.0f} tokens/s"
                                                                        if info.built else "")]
    if info.note:
        lines.append(f"note: {info.note}")
    per_alt = f", {s.nbytes() / n_alt:.2f} B per stored alternative" if n_alt else ""
    lines.append(f"{len(ds):,} examples, {info.tokens:,} tokens, {n_alt:,} stored alternatives: {s.nbytes():,} bytes "
                 f"({s.nbytes() / max(info.tokens, 1):.1f} B/token{per_alt})")
    carried = CarryCount(*s.meta.get("carried", [0, 0, 0])).note()
    if carried:  # a teacher with another tokenizer: how much of it lines up 1:1, as train logs it
        lines.append(carried)
    if ds.misaligned:
        lines.append(f"{len(ds.misaligned)} records' top-k rows do not align (CE only); first: {ds.misaligned[0]}")
    if ds.ce_only:
        lines.append(f"{ds.ce_only} records without teacher_logprobs train with CE only under sparse KD")
    if max_seq_length:
        lines.append(f"{ds.truncated} examples longer than {max_seq_length} tokens (truncated when read)")
    if out is not None and os.environ.get(STORE_ENV) != str(out):
        lines.append(f"train, eval and the daemon look in {STORE_ENV} or beside the data: "
                     f"export {STORE_ENV}={out} to use this one")
    return "\n".join(lines)

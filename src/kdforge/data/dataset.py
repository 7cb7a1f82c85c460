"""The KD dataset: records -> token ids, response-only labels, aligned teacher top-k logprobs.

Every record format of `kdforge.data.records` is accepted. Chat records get the tokenizer's chat
template with `add_generation_prompt=True` as the prompt, then the response and EOS; labels are
set on the response (and its EOS) only. Plain-text records train on every token. Sequences longer
than `max_seq_length` are truncated so that the response is kept: prompt tokens go first (from the
left), and only a response longer than the budget loses its tail.

Teacher top-k logprobs (`teacher_logprobs` in generate's output) are aligned 1:1 to the response
tokens when the teacher used the same tokenizer; otherwise a clear error names the line. Tokens are
matched by their raw bytes (OpenAI's `bytes`, on every token and alternative), so a token holding
part of a UTF-8 character maps to its own id; a teacher that sends no bytes is matched by text,
where every partial character reads "\ufffd" and such alternatives are dropped, never guessed.
When every token has bytes naming a student token and they spell the response, the response IS the
teacher's own token ids (exact even where the text is lossy or the split non-canonical).
Records without teacher rows (text lines...) train with CE only and are counted (`ce_only`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdforge.data.align import unique_keys as _unique
from kdforge.data.records import Record
from kdforge.data.tokenizer import special_ids, token_bytes
from kdforge.errors import DataError

IGNORE = -100
MISALIGNED_SHARE = 0.05  # above this share of misaligned top-k samples, the tokenizers differ


@dataclass
class Example:
    """One tokenised record: prompt and response ids kept apart so truncation can favour the response."""

    prompt_ids: list[int]
    response_ids: list[int]  # includes the closing EOS for chat records
    topk_ids: list[list[int]] | None = None  # per response token: teacher's top-k token ids
    topk_logprobs: list[list[float]] | None = None
    source: str = ""
    line: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def truncate(ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) cut to max_len tokens, keeping the response.

    Prompt tokens are dropped from the left first; the response loses its tail only if it alone
    does not fit beside a quarter of the budget of prompt.
    """
    p, r = ex.prompt_ids, ex.response_ids
    p_keep, r_keep = _keep(len(p), len(r), max_len)
    return (p[len(p) - p_keep:] if p_keep else []), r[:r_keep]


def prompt_text(tokenizer, msgs: list[dict]) -> str:
    """A prompt's messages as the student sees them before its answer: the tokenizer's chat template
    with the generation prompt; without a template (some base models), a plain documented fallback.
    Dataset records and on-policy prompt pools both go through it, so the student samples from the
    prompts it trains on, and data/quality.py's length report counts the same text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant: "


class TokenMap:
    """Maps a teacher token entry ({token, logprob, bytes?}) to the student tokenizer's id.

    By OpenAI's `bytes` when the entry has them: exact, also for partial UTF-8 characters. Else by
    the token's text, a fallback for teachers that send no bytes: every partial character decodes to
    "\ufffd", so those (and any text two ids share) map to nothing.
    """

    def __init__(self, tokenizer):
        self.bytes = token_bytes(tokenizer)
        self.special = special_ids(tokenizer)
        self.pieces = None  # align.StudentPieces: built when a record's rows are carried across tokenizers
        # The same bytes as lists of ints, the form JSON gives them: compared without building bytes.
        self.byte_lists = [list(b) if b is not None else None for b in self.bytes]
        self.by_bytes = _unique((b, i) for i, b in enumerate(self.bytes) if b is not None)
        self.text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.by_text = _unique((t, i) for i, t in enumerate(self.text) if t != "\ufffd")
        # text -> id where both the text and the bytes name that one id: an entry whose token text is
        # here and whose bytes equal that id's is that id by bytes too (a lookup, no bytes() per entry).
        self.fast = {t: i for t, i in self.by_text.items()
                     if self.bytes[i] is not None and self.by_bytes.get(self.bytes[i]) == i}

    @property
    def by_raw(self) -> dict[bytes, int]:
        """JSON text of a token's bytes -> id (the store's fast path, data/rows.py), built on first use."""
        if getattr(self, "_by_raw", None) is None:
            from kdforge.data.rows import raw_bytes_index

            self._by_raw = raw_bytes_index(self.by_bytes)
        return self._by_raw

    def __call__(self, entry: dict) -> int | None:
        b = entry.get("bytes")
        if b is not None:
            i = self.fast.get(entry["token"])
            if i is not None and self.byte_lists[i] == b:
                return i
            return self.by_bytes.get(bytes(b))
        return self.by_text.get(entry["token"])

    def matches(self, entry: dict, token_id: int) -> bool:
        """Whether the teacher's entry is the student's token `token_id`."""
        b = entry.get("bytes")
        if b is not None:
            return self.byte_lists[token_id] == list(b)
        return self.text[token_id] == entry["token"] or self(entry) == token_id


def load_tokenizer(path_or_tok):
    if isinstance(path_or_tok, (str, Path)):
        from transformers import AutoTokenizer

        p = Path(path_or_tok)
        if not p.exists():
            raise DataError(f"tokenizer folder not found: {p} (make one: kdforge tokenizer train ...)")
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    else:
        tok = path_or_tok
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def teacher_ids(tm: TokenMap, rec: Record) -> list[int] | None:
    """The response as the teacher's own token ids, when every entry has bytes naming one student
    token and they spell the response. Re-tokenising the text cannot recover them where the
    teacher's tokens hold bytes of no valid character (its text then reads "\ufffd") or where
    it sampled a non-canonical split; the bytes do."""
    lp = rec.teacher_logprobs
    if not lp or any(e.get("bytes") is None for e in lp):
        return None
    ids = [tm(e) for e in lp]
    if None in ids:
        return None
    spelled = b"".join(tm.bytes[i] for i in ids).decode("utf-8", errors="replace")
    return ids if spelled == rec.response else None


def align_record(tm: TokenMap, rec: Record, response_ids: list[int], settings: dict | None = None):
    """(response ids, top-k id rows, top-k logprob rows) of one record whose teacher used the student's
    tokenizer: one row per response token (no EOS here; the caller adds it and its empty row).

    The store's builder calls this ONE function per record (`settings`: the store's alignment
    settings). Rows that do not align 1:1 with the student's tokens come from a teacher with another
    tokenizer: with `settings["alignment"]["cross_tokenizer"] == "auto"` they are carried by bytes
    (`carry_record`, which adds a 4th item, its CarryCount); else DataError (the record's file:line):
    such a record trains with CE only, and the dataset refuses the data when more than
    MISALIGNED_SHARE of the records are so."""
    teacher = teacher_ids(tm, rec)
    if teacher is not None:  # the teacher's own tokens: exact even where text is lossy
        response_ids = teacher
    lp = rec.teacher_logprobs
    if len(lp) != len(response_ids) or not all(tm.matches(e, i) for e, i in zip(lp, response_ids)):
        if ((settings or {}).get("alignment") or {}).get("cross_tokenizer") == "auto":
            return carry_record(tm, rec, response_ids)  # another tokenizer: carried by bytes
        raise DataError(
            f"teacher_logprobs ({len(lp)} tokens) do not align with the student tokenizer's "
            f"{len(response_ids)} response tokens: logit KD needs the teacher's tokenizer; "
            "use the same tokenizer on both sides or loss.kind=ce", rec.metadata.get("_path"), rec.line)
    ids, lps = [], []
    for i, e in zip(response_ids, lp):
        row_ids, row_lp = [], []
        # The chosen token closes the row when the top-k left it out: its logprob is the teacher's too.
        for alt in [*(e.get("top") or []), e]:
            j = i if alt is e else tm(alt)
            if j is not None and j not in row_ids:
                row_ids.append(j)
                row_lp.append(float(alt["logprob"]))
        ids.append(row_ids)
        lps.append(row_lp)
    return response_ids, ids, lps


@dataclass
class CarryCount:
    """Records whose teacher rows were carried across tokenizers (loss.cross_tokenizer auto), their
    response positions, and how many of those aligned 1:1 (the teacher's token was the student's)."""

    records: int = 0
    positions: int = 0
    one_to_one: int = 0

    def note(self) -> str | None:
        """The log line saying that rows were carried, or None when no record needed it."""
        if not self.records:
            return None
        return (f"the teacher's tokenizer is not the student's in {self.records:,} records: their top-k rows are "
                f"carried onto the student's tokens by bytes (loss.cross_tokenizer auto); "
                f"{self.one_to_one / max(self.positions, 1):.1%} of their {self.positions:,} positions aligned 1:1")


def carry_record(tm: TokenMap, rec: Record, response_ids: list[int]):
    """`align_record`'s result for a teacher with another tokenizer, plus its CarryCount: the rows
    carried onto the student's tokens by bytes (`data.align`). DataError (file:line) when the
    teacher's tokens do not spell the response."""
    from kdforge.data.align import AlignError, StudentPieces, align_rows, teacher_tokens

    if tm.pieces is None:
        tm.pieces = StudentPieces(tm.bytes, tm.special)
    try:
        rows = align_rows(rec.response.encode("utf-8"), response_ids, tm.pieces, teacher_tokens(rec.teacher_logprobs))
    except AlignError as e:
        raise DataError(f"teacher_logprobs cannot be placed on the response: {e}",
                        rec.metadata.get("_path"), rec.line) from None
    return response_ids, rows.ids, rows.logprobs, CarryCount(1, rows.positions, rows.one_to_one)


def _keep(n_prompt: int, n_resp: int, max_len: int) -> tuple[int, int]:
    """(prompt tokens kept from the end, response tokens kept from the start) within max_len."""
    if n_prompt + n_resp <= max_len:
        return n_prompt, n_resp
    p_keep = max(max_len - n_resp, min(n_prompt, max_len // 4))
    return p_keep, max_len - p_keep


class KDDataset(torch.utils.data.Dataset):
    """Tokenised KD examples from one or more JSONL files, read through the token store.

    `dataset[i]` is a dict of 1-D LongTensors `input_ids` and `labels` (labels = input ids on the
    response, -100 elsewhere; the model shifts them), plus, when `with_topk`, `topk_ids` [L, K]
    and `topk_logprobs` [L, K] where row t is the teacher's distribution for token t (rows outside
    the response have id -1; logprobs come from fp16 storage).

    Files are read through `kdforge.data.store`: built once per (content, tokenizer, settings),
    then memory-mapped, so memory does not grow with the dataset (`store_dir`: where; default beside
    the data). `records` (already read: eval, a daemon batch) are encoded the same way, in memory;
    with `store_dir` and the `fingerprints` of the one file they were read from, kept there (a
    daemon restarted mid-batch maps them again instead of tokenising).
    """

    def __init__(self, jsonl_path: str | Path | Sequence[str | Path], tokenizer_path=None,
                 max_seq_length: int = 4096, *, with_topk: bool = False, strict: bool = True,
                 records: list[Record] | None = None, tokenizer=None, settings: dict | None = None,
                 store_dir: str | Path | None = None, fingerprints: list[dict] | None = None,
                 progress: bool | None = None, topk_optional: bool = False):
        from kdforge.data import store as st

        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_path)
        paths = [jsonl_path] if isinstance(jsonl_path, (str, Path)) else list(jsonl_path or [])
        self.store_info = None
        if records is None:
            if not paths:
                raise DataError("no data files given")
            self.store_info = st.ensure_store(paths, self.tokenizer, with_topk=with_topk, settings=settings,
                                              root=store_dir, fingerprints=fingerprints, progress=progress)
            store = st.Store.open(self.store_info.path)
        elif store_dir is not None and fingerprints:  # records of one file whose bytes were hashed: kept
            store, built = st.records_store(records, fingerprints[0], self.tokenizer, with_topk=with_topk,
                                            settings=settings, root=Path(store_dir))
            self.store_info = st.BuildInfo(store.path, built, 0.0, len(store.tokens))
        else:
            piece = st.encode_records(records, self.tokenizer, with_topk, settings=settings,
                                      path=str(paths[0]) if paths else "")
            store = st.Store.from_encoded(piece, piece.files, with_topk)
        self._attach(store, max_seq_length, with_topk)
        if strict and self.problems:
            raise self.problems[0]
        self._check_topk(topk_optional)

    @property
    def fingerprints(self) -> list[dict]:
        """[{file, size, sha256}] of the files read, as hashed for the store's key (what a
        checkpoint keeps: one pass over the data serves both); [] for records given in memory."""
        return list(self._store.meta.get("files", [])) if self.store_info is not None else []

    def _attach(self, store, max_seq_length: int, with_topk: bool) -> None:
        from kdforge.data.store import FLAG_CE_ONLY, iter_store_lines

        self.max_seq_length = max_seq_length
        self.with_topk = with_topk
        self.eos_id = self.tokenizer.eos_token_id
        self._store = store
        self._ex = store.examples
        self._cleared: set[int] = set()  # examples whose response was dropped (prompt-only, on-policy)
        self.problems: list[DataError] = iter_store_lines(store.meta.get("problems", []))
        self.carried = CarryCount(*store.meta.get("carried", [0, 0, 0]))  # rows carried across tokenizers
        self.misaligned: list[DataError] = iter_store_lines(store.meta.get("misaligned", []))  # top-k rows that
        # did not match the response tokens; (file, line) of records without teacher_logprobs under sparse KD:
        # they train with CE only
        flags = np.asarray(self._ex[:, 7])
        self.ce_only_lines: list[tuple[str | None, int]] = [
            (store.files[int(self._ex[i, 5])] if store.files else None, int(self._ex[i, 6]))
            for i in np.flatnonzero(flags & FLAG_CE_ONLY)]
        self.lengths = np.asarray(self._ex[:, 1] + self._ex[:, 2])  # whole example, before truncation
        self.truncated = int((self.lengths > max_seq_length).sum())

    def _check_topk(self, optional: bool = False) -> None:
        """`optional`: records without top-k are scored elsewhere (teacher.url), none having any is fine."""
        n = len(self)
        if self.with_topk and not optional and n and self.ce_only == n:
            path, line = self.ce_only_lines[0]
            raise DataError("no teacher_logprobs in any record: sparse KD (loss.kind fkl/rkl/jsd without "
                            "teacher.path) needs generate --top-logprobs K, or use loss.kind=ce", path, line)
        if self.with_topk and len(self.misaligned) > MISALIGNED_SHARE * n:
            # Many samples disagree: the teacher used another tokenizer. A few: the teacher emitted
            # a non-canonical tokenization (e.g. "a"+"b" where BPE merges "ab"); those keep CE only.
            first = self.misaligned[0]
            raise DataError(f"{len(self.misaligned)} of {n} samples: {first.args[0].split(': ', 1)[-1]}",
                            first.path, first.line)

    @classmethod
    def from_examples(cls, examples: Sequence[Example], like: "KDDataset", with_topk: bool) -> "KDDataset":
        """A dataset of examples made elsewhere (eval's server-scored rows) on `like`'s tokenizer."""
        from kdforge.data.store import Store, encode_examples

        ds = cls.__new__(cls)
        ds.tokenizer = like.tokenizer
        ds.store_info = None
        ds._attach(Store.from_encoded(encode_examples(examples), like._store.files, with_topk),
                   like.max_seq_length, with_topk)
        return ds

    @property
    def ce_only(self) -> int:
        """Records that train with CE only under sparse KD because they carry no teacher_logprobs
        (text lines, prompt/completion...); a caller logs it. Misaligned ones are in `misaligned`."""
        return len(self.ce_only_lines)

    @property
    def examples(self) -> "_Examples":
        """Example i as lists (built on demand from the store; nothing is held per example)."""
        return _Examples(self)

    def clear_response(self, i: int) -> None:
        """Give example i no response (and no rows): a prompt-only record, answered on-policy."""
        self._cleared.add(int(i))
        self.lengths[i] = int(self._ex[i, 1])

    def kept(self, i: int, max_len: int | None = None) -> tuple[int, int]:
        """(prompt tokens, response tokens) of example i as `item(i, max_len)` keeps them, from the
        store's lengths alone (nothing is read)."""
        _, n_p, n_r, _, _ = self._spans(i)
        return _keep(n_p, n_r, min(max_len or self.max_seq_length, self.max_seq_length))

    def line_of(self, i: int) -> tuple[str | None, int]:
        """(file, line) that example i was read from."""
        files = self._store.files
        return (files[int(self._ex[i, 5])] if files else None), int(self._ex[i, 6])

    def _spans(self, i: int) -> tuple[int, int, int, int, int]:
        start, n_p, n_r, row, alt = (int(v) for v in self._ex[i, :5])
        return start, n_p, (0 if i in self._cleared else n_r), row, alt

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._ex)

    def example(self, i: int) -> Example:
        """Example i as lists (prompt ids, response ids, top-k rows when with_topk)."""
        start, n_p, n_r, row, alt = self._spans(i)
        toks = self._store.tokens
        ex = Example(toks[start:start + n_p].tolist(), toks[start + n_p:start + n_p + n_r].tolist(),
                     line=int(self._ex[i, 6]))
        if self.with_topk:
            lens = self._store.row_len[row:row + n_r].astype(np.int64)
            ends = np.cumsum(lens) + alt
            ids, lps = self._store.alt_ids, self._store.alt_lp
            ex.topk_ids = [ids[e - n:e].tolist() for e, n in zip(ends, lens)]
            ex.topk_logprobs = [lps[e - n:e].astype(np.float32).tolist() for e, n in zip(ends, lens)]
        return ex

    def item(self, i: int, max_len: int | None = None) -> dict:
        """Example i as tensors, truncated to max_len (default: max_seq_length)."""
        start, n_p, n_r, row, alt = self._spans(i)
        L = min(max_len or self.max_seq_length, self.max_seq_length)
        p, r = _keep(n_p, n_r, L)
        toks = self._store.tokens
        ids = np.concatenate([toks[start + n_p - p:start + n_p], toks[start + n_p:start + n_p + r]]).astype(np.int64)
        input_ids = torch.from_numpy(ids)
        labels = input_ids.clone()
        labels[:p] = IGNORE
        out = {"input_ids": input_ids, "labels": labels}
        if self.with_topk:
            lens = self._store.row_len[row:row + n_r].astype(np.int64)
            K = int(lens.max()) if n_r and lens.max() > 0 else 1
            tid = np.full((p + r, K), -1, dtype=np.int64)
            tlp = np.zeros((p + r, K), dtype=np.float32)
            kept = lens[:r]
            m = int(kept.sum())
            if m:
                rows = np.repeat(np.arange(r), kept)
                cols = np.arange(m) - np.repeat(np.cumsum(kept) - kept, kept)
                tid[p + rows, cols] = self._store.alt_ids[alt:alt + m]
                tlp[p + rows, cols] = self._store.alt_lp[alt:alt + m]
            out["topk_ids"], out["topk_logprobs"] = torch.from_numpy(tid), torch.from_numpy(tlp)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


class _Examples(Sequence):
    """`dataset.examples`: a read-only sequence of Examples made on access."""

    def __init__(self, ds: KDDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.ds.example(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.ds.example(i)


def collate(items: list[dict], pad_id: int, packed_len: int | None = None) -> dict:
    """Right-pad a list of items into a batch; or, with `packed_len`, pack them (`pack_rows`) into
    rows of exactly that many tokens: position ids restart at each example, `seq_ids` says which
    example each token is (-1: padding), from which the objective keeps examples from seeing each
    other; an example's first position is never a target. Packed and padded batches hold the same
    targets."""
    if packed_len:
        return _pack(items, pad_id, packed_len)
    L = max(len(x["input_ids"]) for x in items)
    B = len(items)
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((B, L), dtype=torch.long),
    }
    K = max((x["topk_ids"].shape[1] for x in items if "topk_ids" in x), default=0)
    if K:
        batch["topk_ids"] = torch.full((B, L, K), -1, dtype=torch.long)
        batch["topk_logprobs"] = torch.zeros((B, L, K), dtype=torch.float32)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        batch["input_ids"][b, :n] = x["input_ids"]
        batch["labels"][b, :n] = x["labels"]
        batch["attention_mask"][b, :n] = 1
        if K:
            k = x["topk_ids"].shape[1]
            batch["topk_ids"][b, :n, :k] = x["topk_ids"]
            batch["topk_logprobs"][b, :n, :k] = x["topk_logprobs"]
    return batch


def pack_rows(lengths: list[int], L: int) -> list[list[int]]:
    """Indices of examples per row of L tokens, best-fit decreasing: longest first, each into the
    row it leaves the least room in (a new row when none has room). Rows come out nearly full
    where in-order filling left the tail of every row empty. Ties go to the earlier example and
    row, and each row lists its examples in the given order: the result is a function of the
    lengths in the sampler's order, so a resumed run packs the same rows."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        fits = [r for r in range(len(rows)) if free[r] >= n]
        if fits:
            r = min(fits, key=lambda r: free[r])  # min keeps the first of equal rooms
        else:
            r = len(rows)
            rows.append([])
            free.append(L)
        rows[r].append(i)
        free[r] -= n
    return [sorted(row) for row in rows] or [[]]


def _pack(items: list[dict], pad_id: int, L: int) -> dict:
    rows = [[items[i] for i in row] for row in pack_rows([len(x["input_ids"]) for x in items], L)]
    B = len(rows)
    K = max((x["topk_ids"].shape[1] for x in items if "topk_ids" in x), default=0)
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "position_ids": torch.zeros((B, L), dtype=torch.long),
        "seq_ids": torch.full((B, L), -1, dtype=torch.long),  # which example each token belongs to
        # an example's first position where its label was a target (a {"text"} record: no prompt),
        # which packing erases below; on-policy reads it (train/on_policy.py prompts_of)
        "first_target": torch.zeros((B, L), dtype=torch.bool),
    }
    if K:
        batch["topk_ids"] = torch.full((B, L, K), -1, dtype=torch.long)
        batch["topk_logprobs"] = torch.zeros((B, L, K), dtype=torch.float32)
    for b, row in enumerate(rows):
        o = 0
        for s, x in enumerate(row):
            n = min(len(x["input_ids"]), L - o)
            batch["input_ids"][b, o:o + n] = x["input_ids"][:n]
            batch["labels"][b, o:o + n] = x["labels"][:n]
            # Position o's label would be predicted from the previous example's last token: never a
            # target (padded batches never use an example's first label either).
            batch["first_target"][b, o] = bool(x["labels"][0] != IGNORE) if n else False
            batch["labels"][b, o] = IGNORE
            batch["position_ids"][b, o:o + n] = torch.arange(n)
            batch["seq_ids"][b, o:o + n] = s
            if K:
                k = x["topk_ids"].shape[1]
                batch["topk_ids"][b, o:o + n, :k] = x["topk_ids"][:n]
                batch["topk_logprobs"][b, o:o + n, :k] = x["topk_logprobs"][:n]
            o += n
    return batch


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[B, 1, L, L] mask of packed rows: causal within each example, nothing across examples or
    from padding (padding attends to itself, so softmax stays finite). Bool (True: attend) by
    default, what sdpa takes; a float dtype gives the additive form eager attention adds."""
    B, L = seq_ids.shape
    allowed = seq_ids[:, :, None] == seq_ids[:, None, :]
    allowed &= torch.ones(L, L, dtype=torch.bool, device=seq_ids.device).tril()
    allowed &= (seq_ids[:, :, None] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool, device=seq_ids.device)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(B, 1, L, L, dtype=dtype, device=seq_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)

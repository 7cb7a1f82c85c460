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

import torch

from kdforge.data.align import unique_keys as _unique
from kdforge.data.records import Record, read_records
from kdforge.data.tokenizer import token_bytes
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
    if len(p) + len(r) <= max_len:
        return p, r
    p_keep = max(max_len - len(r), min(len(p), max_len // 4))
    r_keep = max_len - p_keep
    return (p[len(p) - p_keep:] if p_keep else []), r[:r_keep]


def prompt_text(tokenizer, msgs: list[dict]) -> str:
    """A prompt's messages as the student sees them before its answer: the tokenizer's chat template
    with the generation prompt; without a template (some base models), a plain documented fallback.
    Dataset records and on-policy prompt pools both go through it, so the student samples from the
    prompts it trains on. (data/quality.py's length report renders templated prompts the same way but
    counts a template-less prompt's bare text.)"""
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
        self.by_bytes = _unique((b, i) for i, b in enumerate(self.bytes) if b is not None)
        self.text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.by_text = _unique((t, i) for i, t in enumerate(self.text) if t != "\ufffd")

    def __call__(self, entry: dict) -> int | None:
        if entry.get("bytes") is not None:
            return self.by_bytes.get(bytes(entry["bytes"]))
        return self.by_text.get(entry["token"])

    def matches(self, entry: dict, token_id: int) -> bool:
        """Whether the teacher's entry is the student's token `token_id`."""
        if entry.get("bytes") is not None:
            return self.bytes[token_id] == bytes(entry["bytes"])
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


class KDDataset(torch.utils.data.Dataset):
    """Tokenised KD examples from one or more JSONL files.

    `dataset[i]` is a dict of 1-D LongTensors `input_ids` and `labels` (labels = input ids on the
    response, -100 elsewhere; the model shifts them), plus, when `with_topk`, `topk_ids` [L, K]
    and `topk_logprobs` [L, K] where row t is the teacher's distribution for token t (rows outside
    the response have id -1).
    """

    def __init__(self, jsonl_path: str | Path | Sequence[str | Path], tokenizer_path=None,
                 max_seq_length: int = 4096, *, with_topk: bool = False, strict: bool = True,
                 records: list[Record] | None = None, tokenizer=None):
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_path)
        self.max_seq_length = max_seq_length
        self.with_topk = with_topk
        self.problems: list[DataError] = []
        paths = [jsonl_path] if isinstance(jsonl_path, (str, Path)) else list(jsonl_path or [])
        if records is None:
            records = []
            for p in paths:
                recs, probs = read_records(p, strict=strict)
                for r in recs:
                    r.metadata = {**r.metadata, "_path": str(p)}
                records += recs
                self.problems += probs
        self.eos_id = self.tokenizer.eos_token_id
        self._token_map: TokenMap | None = None
        self.misaligned: list[DataError] = []  # top-k rows that did not match the response tokens
        # (file, line) of records without teacher_logprobs under sparse KD: they train with CE only
        self.ce_only_lines: list[tuple[str | None, int]] = []
        self.examples = [self._encode(r) for r in records]
        self.truncated = sum(1 for e in self.examples if len(e) > max_seq_length)
        if with_topk and records and self.ce_only == len(records):
            path, line = self.ce_only_lines[0]
            raise DataError("no teacher_logprobs in any record: sparse KD (loss.kind fkl/rkl/jsd without "
                            "teacher.path) needs generate --top-logprobs K, or use loss.kind=ce", path, line)
        if with_topk and len(self.misaligned) > MISALIGNED_SHARE * len(records):
            # Many samples disagree: the teacher used another tokenizer. A few: the teacher emitted
            # a non-canonical tokenization (e.g. "a"+"b" where BPE merges "ab"); those keep CE only.
            first = self.misaligned[0]
            raise DataError(f"{len(self.misaligned)} of {len(records)} samples: {first.args[0].split(': ', 1)[-1]}",
                            first.path, first.line)

    @property
    def ce_only(self) -> int:
        """Records that train with CE only under sparse KD because they carry no teacher_logprobs
        (text lines, prompt/completion...); a caller logs it. Misaligned ones are in `misaligned`."""
        return len(self.ce_only_lines)

    # ------------------------------------------------------------------ encoding
    def _encode(self, rec: Record) -> Example:
        tok = self.tokenizer
        if rec.is_text:
            ids = tok(rec.response, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ex = Example([], ids, source=rec.source or "", line=rec.line)
        else:
            prompt_ids = tok(prompt_text(tok, rec.prompt_messages), add_special_tokens=False)["input_ids"]
            resp_ids = tok(rec.response, add_special_tokens=False)["input_ids"]
            ex = Example(prompt_ids, resp_ids + [self.eos_id], source=rec.source or "", line=rec.line)
        if not self.with_topk:
            return ex
        if not rec.teacher_logprobs:  # text lines, prompt/completion...: CE only, counted
            self.ce_only_lines.append((rec.metadata.get("_path"), rec.line))
        else:
            try:
                teacher_ids = self._teacher_ids(rec)
                if teacher_ids is not None:  # the teacher's own tokens: exact even where text is lossy
                    ex.response_ids = teacher_ids + [self.eos_id]
                ex.topk_ids, ex.topk_logprobs = self._align_topk(rec, ex.response_ids[:-1])
                return ex
            except DataError as e:
                self.misaligned.append(e)  # judged once all records are read
        ex.topk_ids = ex.topk_logprobs = [[] for _ in ex.response_ids]
        return ex

    def _teacher_ids(self, rec: Record) -> list[int] | None:
        """The response as the teacher's own token ids, when every entry has bytes naming one student
        token and they spell the response. Re-tokenising the text cannot recover them where the
        teacher's tokens hold bytes of no valid character (its text then reads "\ufffd") or where
        it sampled a non-canonical split; the bytes do."""
        if self._token_map is None:
            self._token_map = TokenMap(self.tokenizer)
        lp = rec.teacher_logprobs
        if not lp or any(e.get("bytes") is None for e in lp):
            return None
        ids = [self._token_map(e) for e in lp]
        spelled = b"".join(bytes(e["bytes"]) for e in lp).decode("utf-8", errors="replace")
        return ids if None not in ids and spelled == rec.response else None

    def _align_topk(self, rec: Record, resp_ids: list[int]):
        where = (rec.metadata.get("_path"), rec.line)
        lp = rec.teacher_logprobs
        tm = self._token_map
        if len(lp) != len(resp_ids) or not all(tm.matches(e, i) for e, i in zip(lp, resp_ids)):
            raise DataError(
                f"teacher_logprobs ({len(lp)} tokens) do not align with the student tokenizer's "
                f"{len(resp_ids)} response tokens: logit KD needs the teacher's tokenizer; "
                "use the same tokenizer on both sides or loss.kind=ce", *where)
        ids, lps = [], []
        for i, e in zip(resp_ids, lp):
            row_ids, row_lp = [], []
            # The chosen token closes the row when the top-k left it out: its logprob is the teacher's too.
            for alt in [*(e.get("top") or []), e]:
                j = i if alt is e else tm(alt)
                if j is not None and j not in row_ids:
                    row_ids.append(j)
                    row_lp.append(float(alt["logprob"]))
            ids.append(row_ids)
            lps.append(row_lp)
        # The closing EOS has no teacher row (APIs do not report the stop token): empty row.
        return ids + [[]], lps + [[]]

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.examples)

    def item(self, i: int, max_len: int | None = None) -> dict:
        """Example i as tensors, truncated to max_len (default: max_seq_length)."""
        ex = self.examples[i]
        L = min(max_len or self.max_seq_length, self.max_seq_length)
        p, r = truncate(ex, L)
        input_ids = torch.tensor(p + r, dtype=torch.long)
        labels = torch.tensor([IGNORE] * len(p) + r, dtype=torch.long)
        out = {"input_ids": input_ids, "labels": labels}
        if self.with_topk:
            K = max((len(x) for x in ex.topk_ids), default=1) or 1
            tid = torch.full((len(p) + len(r), K), -1, dtype=torch.long)
            tlp = torch.zeros((len(p) + len(r), K), dtype=torch.float32)
            for t, (row_i, row_l) in enumerate(zip(ex.topk_ids[:len(r)], ex.topk_logprobs[:len(r)])):
                tid[len(p) + t, :len(row_i)] = torch.tensor(row_i, dtype=torch.long)
                tlp[len(p) + t, :len(row_l)] = torch.tensor(row_l, dtype=torch.float32)
            out["topk_ids"], out["topk_logprobs"] = tid, tlp
        return out

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


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

"""Held-out eval data: which records `kdforge eval` scores, and how.

Each line of an eval file is one of
- a KD record in any format training accepts (generate's output, prompt/completion, chat,
  Alpaca, text): its response is "the teacher's text", scored for CE/perplexity and KL (through
  the trainer's `KDDataset`, so the same tokens and labels training uses) and, when it has a
  prompt, compared with the student's greedy answer (exact match, token F1);
- a prompt with an `answer` and no teacher text (`{"prompt" | "messages", "answer"}`, like the
  demo's `assets/eval.jsonl`): only the student's greedy answer is checked, for accuracy.
Any record may carry `answer`, and then also counts for accuracy. An unusable line is a
`DataError` naming file:line: eval data is small and hand-kept, so nothing is skipped silently.

`load_eval_data` reads the KD records' tokens through the token store of the eval files (built on
the first eval, memory-mapped by every later one: a second `kdforge eval` of the same bytes does not
tokenise them again); the daemon keeps the result and scores it after every batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kdforge.data.records import Record, iter_lines, parse_record
from kdforge.errors import DataError


@dataclass
class EvalRecord:
    """One line of eval data. `record` is the KD record (None for a prompt with only an answer)."""

    path: str
    line: int
    record: Record | None
    prompt_messages: list[dict] | None  # None: a text record (nothing to answer)
    answer: str | None = None
    has_topk: bool = False  # the line carries teacher_logprobs (kept in `record` only when read with rows)


def _answer(obj: dict, path: str, line: int) -> str | None:
    a = obj.get("answer")
    if a is None:
        return None
    if isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise DataError(f"'answer' must be a string (or a number), got {type(a).__name__}; fix or remove the line",
                        path, line)
    return str(a)


def read_eval_file(path: str | Path, rows: bool = True) -> list[EvalRecord]:
    """Every line of one eval file, strictly: the first unusable line raises DataError (file:line).
    `rows=False`: each record's teacher_logprobs are dropped as it is read (the token store holds
    them compactly; parsed, they take ~40x their tokens' bytes)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("eval data file not found (give JSONL records, e.g. kdforge generate's output)", str(p))
    try:
        return [_eval_record(str(p), lineno, text, rows) for lineno, text in iter_lines(p)]
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(p)) from None


def _eval_record(path: str, line: int, text: str, rows: bool = True) -> EvalRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg}); fix or remove the line", path, line) from None
    answer = _answer(obj, path, line) if isinstance(obj, dict) else None
    try:
        rec = parse_record(obj)
    except ValueError as e:
        if answer is None or not ({"prompt", "messages"} & set(obj)):
            raise DataError(f"{e}; fix or remove the line", path, line) from None
        # A prompt with only an answer: parsed as a record whose response is the answer, so the
        # prompt is checked by the same rules as training's (roles, non-empty content).
        try:
            asked = parse_record({**{k: obj[k] for k in ("prompt", "messages") if k in obj}, "teacher_text": answer})
        except ValueError as e2:
            raise DataError(f"{e2}; fix or remove the line", path, line) from None
        return EvalRecord(path, line, None, asked.prompt_messages, answer)
    if answer is not None and rec.is_text:
        raise DataError("'answer' on a text record: there is no prompt to answer; give 'prompt' or 'messages'",
                        path, line)
    rec.line = line
    rec.metadata = {**rec.metadata, "_path": path}  # KDDataset names file:line in its errors
    has_topk = bool(rec.teacher_logprobs)
    if not rows:
        rec.teacher_logprobs = None
    return EvalRecord(path, line, rec, rec.prompt_messages, answer, has_topk)


@dataclass
class EvalData:
    """Tokenised eval data, ready to score many times (the daemon scores it after every batch).

    `scored` holds the KD records (teacher text) as the trainer's KDDataset; `asked` the
    prompt-only records (their response is the answer, used only for the answer's length).
    `items[i]` says where record i lives: ("scored" | "asked", index)."""

    records: list[EvalRecord]
    scored: object | None  # KDDataset, or None when no record has a teacher text
    asked: object | None  # KDDataset of the prompt-only records
    items: list[tuple[str, int]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    scored_by: dict = field(default_factory=dict, repr=False)  # (url, model, K) -> `scored` with a server's top-K

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_topk(self) -> bool:
        return bool(self.scored is not None and self.scored.with_topk)

    def example(self, i: int):
        """The tokenised `Example` of record i (prompt_ids, response_ids...)."""
        which, j = self.items[i]
        return (self.scored if which == "scored" else self.asked).example(j)


def load_eval_data(files: str | Path | Sequence[str | Path], tokenizer, *, max_seq_length: int = 4096,
                   max_records: int | None = None, settings: dict | None = None) -> EvalData:
    """Read and tokenise eval files with `tokenizer` (a loaded tokenizer or its folder).

    Stored top-k logprobs are aligned when any record has them (the trainer's sparse-KD path);
    `max_records` keeps the first N records over all files. `settings`: the token store's (a
    training run's `store_settings`: io.reasoning, loss.cross_tokenizer), so that records are read
    and another tokenizer's rows carried (or refused) as that run trains on them; default the
    store's defaults (think, auto). Raises DataError (file:line)."""
    from kdforge.data.dataset import KDDataset, load_tokenizer

    tok = load_tokenizer(tokenizer)
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise DataError("no eval data: give --data FILE (JSONL)")
    records: list[EvalRecord] = []
    for p in paths:  # without max_records, the store holds the rows: none are kept parsed
        records += read_eval_file(p, rows=max_records is not None)
    whole = max_records is None or max_records >= len(records)  # every line of the files is a record here
    if not whole:
        records = records[:max_records]
    if not records:
        raise DataError("no records in the eval data (every line blank)", ", ".join(map(str, paths)))
    kd = [r.record for r in records if r.record is not None]
    asked = [Record(r.prompt_messages, r.answer or "", line=r.line) for r in records if r.record is None]
    with_topk = any(r.has_topk for r in records)
    scored_ds = _scored_dataset(paths if whole else None, kd, tok, max_seq_length, with_topk, settings) if kd else None
    asked_ds = (KDDataset(None, tokenizer=tok, max_seq_length=max_seq_length, records=asked, settings=settings)
                if asked else None)
    items, n_kd, n_asked = [], 0, 0
    for r in records:
        if r.record is not None:
            items.append(("scored", n_kd))
            n_kd += 1
        else:
            items.append(("asked", n_asked))
            n_asked += 1
    return EvalData(records, scored_ds, asked_ds, items, [str(p) for p in paths])


def _scored_dataset(paths: list | None, kd: list[Record], tok, max_seq_length: int, with_topk: bool,
                    settings: dict | None = None):
    """The KD records as the trainer's KDDataset: read through the token store of `paths` (the whole
    files), so a later eval maps what the first one tokenised; its lines that are not KD records (a
    prompt with only an answer) are the store's unusable lines, left out. Encoded in memory instead
    when `paths` is None (max_records kept part of the files) or the store's examples are not exactly
    `kd`, line for line."""
    from kdforge.data.dataset import KDDataset

    if paths is not None:
        ds = KDDataset([str(p) for p in paths], tokenizer=tok, max_seq_length=max_seq_length, with_topk=with_topk,
                       strict=False, settings=settings)
        where = [(str(Path(f).resolve()) if f else None, line) for f, line in map(ds.line_of, range(len(ds)))]
        if where == [(str(Path(r.metadata["_path"]).resolve()), r.line) for r in kd]:
            return ds
        kd = [r.record for p in paths for r in read_eval_file(p) if r.record is not None]  # with their rows
    return KDDataset(None, tokenizer=tok, max_seq_length=max_seq_length, with_topk=with_topk, records=kd,
                     settings=settings)

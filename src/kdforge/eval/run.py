"""`kdforge eval`'s numbers for a student against its teacher, on held-out KD data.

- `ce`, `perplexity`: cross-entropy (nats per response token, and its exp) on the teacher's text,
  computed by the trainer's own `DistillObjective` on the trainer's own `KDDataset` batches: the
  number is the `ce` training logs, on other data.
- `kl`: forward KL(teacher || student) at T = 1 as the trainer computes it, per target token that
  has teacher data: sparse against the stored top-k (K + 1 outcomes with the rest bucket), dense
  against a local teacher's logits (a local teacher with another tokenizer: its top-K carried onto
  the student's tokens by bytes, as training carries it), or sparse against the top-K a scoring
  server returns. A local teacher scores every record: stored top-k rows are set aside then.
- `exact_match`, `token_f1`: the student's greedy answer to each record's prompt (chat template as
  in training) against the teacher's text; `accuracy`: against an `answer` field where records
  carry one; `n`: records.

`evaluate_loaded` works on an already-loaded model and tokenizer (the daemon calls it after every
batch with `EvalData` it loaded once); `evaluate_model` loads MODEL_DIR (full, LoRA or daemon
checkpoint) and the teacher first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from kdforge.errors import UsageError
from kdforge.eval import metrics
from kdforge.eval.data import EvalData, load_eval_data
from kdforge.eval.model_dir import ModelSource, load_model, load_tokenizer, resolve_model_dir

MAX_NEW_TOKENS_CAP = 512  # default greedy length: the longest teacher answer + a few, at most this
EXTRA_NEW_TOKENS = 4  # room past the longest reference, so a student that runs on shows it
# progress(phase, done, total) after each batch; phase: "teacher" (server scoring), "score", "answer"
Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """The numbers of one eval. A number that could not be measured on this data is None, not 0."""

    n: int  # records
    ce: float | None  # nats per response token of the teacher's text
    perplexity: float | None  # exp(ce)
    kl: float | None  # forward KL(teacher || student), nats per token with teacher data
    exact_match: float | None  # share of prompts whose greedy answer is the teacher's text (stripped)
    token_f1: float | None  # mean bag-of-tokens F1 of greedy answer vs teacher's text
    accuracy: float | None  # share of records with `answer` answered exactly (stripped)
    kl_teacher: str | None = None  # "topk" (stored in the data), "dense" (a local model), "url" (scored over HTTP),
    # "carried" (a local model with another tokenizer: its top-K carried onto the student's tokens by bytes)
    n_scored: int = 0  # records with a teacher text (ce, kl)
    n_greedy: int = 0  # of them, with a prompt (exact_match, token_f1)
    n_answer: int = 0  # records with an answer (accuracy)
    tokens: int = 0  # target tokens behind ce
    kl_tokens: int = 0  # target tokens behind kl
    max_new_tokens: int | None = None
    seconds: float = 0.0
    model: str | None = None
    data: list[str] = field(default_factory=list)
    # the student's greedy answer per record (None: nothing to answer); left out of to_json()
    answers: list[str | None] = field(default_factory=list, repr=False)

    def to_json(self, with_answers: bool = False) -> dict:
        """A JSON-ready dict (non-finite numbers as None: JSON has no inf or NaN)."""
        d = asdict(self)
        if not with_answers:
            d.pop("answers")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- losses

def _batches(order: list[int], size: int):
    for i in range(0, len(order), size):
        yield order[i:i + size]


def _loss_sums(model, ds, teacher, batch_size: int, device, progress: Progress | None = None):
    """Summed `LossSums` over the dataset: CE always, forward KL at T = 1 when there is a teacher
    (dense `teacher` model, or top-k rows in `ds`). A teacher model scores every record, top-k rows
    stored in the data set aside, as training does with teacher.path: one with another tokenizer too
    (a `LocalCrossTeacher`: its top-K carried onto the student's tokens, `attach`), which would
    otherwise keep a batch's stored rows and score nothing where the data has rows."""
    import torch

    from kdforge.data.dataset import collate
    from kdforge.train.losses import LossSums
    from kdforge.train.objective import DistillObjective

    kind = "fkl" if teacher is not None or ds.with_topk else "ce"
    objective = DistillObjective(model, kind, temperature=1.0, teacher=teacher)
    # Similar lengths together: less padding; padding never changes a sum (right-padded, masked).
    order = sorted(range(len(ds)), key=lambda i: int(ds.lengths[i]))
    total = LossSums(torch.zeros(()), torch.zeros(()), 0, 0)
    stored = ("topk_ids", "topk_logprobs") if teacher is not None else ()
    for done, idx in enumerate(_batches(order, batch_size)):
        batch = {k: v.to(device) for k, v in collate([ds.item(i) for i in idx], ds.tokenizer.pad_token_id).items()
                 if k not in stored}
        try:
            s = objective(batch)
        except ValueError as e:  # shapes: a teacher with another vocabulary
            raise UsageError(f"the teacher cannot score the student's tokens: {e}; logit KL needs the same "
                             "tokenizer on both sides") from None
        total = total + LossSums(s.ce.detach().float().cpu(), s.kd.detach().float().cpu(), s.n_tokens, s.kd_count)
        if progress:
            progress("score", min(len(order), (done + 1) * batch_size), len(order))
    return total, kind


def _with_scored_topk(ds, scorer, progress: Progress | None = None):
    """A copy of `ds` whose response rows are the top-K `scorer` returns for each record's tokens."""
    from kdforge.data.dataset import KDDataset, truncate

    examples = []
    for n in range(len(ds)):
        ex = ds.example(n)
        p, r = truncate(ex, ds.max_seq_length)
        rows = scorer(p + r)[len(p):]
        ids = [sorted(row) if row else [] for row in rows]
        lps = [[row[i] for i in sorted(row)] if row else [] for row in rows]
        examples.append(replace(ex, prompt_ids=p, response_ids=r, topk_ids=ids, topk_logprobs=lps))
        if progress:
            progress("teacher", len(examples), len(ds))
    return KDDataset.from_examples(examples, like=ds, with_topk=True)


# ----------------------------------------------------------------------------- greedy answers

def greedy_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
               device=None, progress: Progress | None = None) -> list[list[int]]:
    """The model's greedy continuation of each prompt (token ids, up to and without EOS), batched
    with left padding and the KV cache. Prompts longer than the model's context keep their tail."""
    import torch

    device = device or next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 20
    keep = max(1, ctx - max_new_tokens)
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for idx in _batches(order, batch_size):
        seqs = [prompts[i][-keep:] for i in idx]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True)
        for i, row in zip(idx, gen[:, width:].tolist()):
            out[i] = row[:row.index(eos)] if eos in row else row
        if progress:
            progress("answer", sum(x is not None for x in out), len(prompts))
    return out  # type: ignore[return-value]


def _answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text.strip(), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- entry points

def evaluate_loaded(model, tokenizer, data: EvalData | str | Path | Sequence[str | Path], teacher=None, *,
                    max_records: int | None = None, device=None, batch_size: int = 16,
                    max_new_tokens: int | None = None, greedy: bool = True, model_name: str | None = None,
                    max_seq_length: int = 4096, progress: Progress | None = None) -> EvalResult:
    """Score a loaded student (any HF causal LM, PEFT-wrapped or not; training mode is restored).

    `data`: `EvalData` from `load_eval_data` (tokenise once, score after every batch) or eval files.
    `teacher`: None (KL against the top-k stored in the data, if any), a loaded HF model (dense KL;
    same tokenizer), a `LocalCrossTeacher` (a model with another tokenizer, its top-K carried: what
    a daemon with such a teacher.path holds) or a `TokenScorer` (top-K over HTTP). `device`: the model's own by default.
    `greedy=False` skips generation (no exact_match, token_f1, accuracy): the cheap numbers only.
    `progress(phase, done, total)` is called after each batch (a progress bar; None: quiet).
    Raises DataError / UsageError with the file:line or the fix."""
    import torch

    t0 = time.perf_counter()
    if not isinstance(data, EvalData):
        data = load_eval_data(data, tokenizer, max_seq_length=max_seq_length, max_records=max_records)
    elif max_records is not None and max_records < len(data):
        raise UsageError("max_records: pass it to load_eval_data when the data is loaded once")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            res = _evaluate(model, tokenizer, data, teacher, device, batch_size, max_new_tokens, greedy, progress)
    finally:
        model.train(was_training)
    res.model, res.data, res.seconds = model_name, list(data.files), round(time.perf_counter() - t0, 3)
    return res


def _evaluate(model, tokenizer, data: EvalData, teacher, device, batch_size, max_new_tokens, greedy,
              progress: Progress | None) -> EvalResult:
    from kdforge.teacher.scoring import TokenScorer

    ce = kl = None
    n_tok = n_kl = 0
    kl_teacher = None
    if data.scored is not None:
        ds, dense = data.scored, teacher
        if isinstance(teacher, TokenScorer):
            # The teacher's rows do not change between calls (the daemon scores after every batch):
            # ask the server once per (url, model, K).
            key = (teacher.url, teacher.resolved_model(), teacher.top_k)
            if key not in data.scored_by:
                data.scored_by[key] = _with_scored_topk(ds, teacher, progress)
            ds, dense = data.scored_by[key], None
        sums, kind = _loss_sums(model, ds, dense, batch_size, device, progress)
        n_tok, n_kl = sums.n_tokens, sums.kd_count
        if n_tok:
            ce = float(sums.ce) / n_tok
        if kind != "ce" and n_kl:
            kl = max(0.0, float(sums.kd) / n_kl)  # a KL is >= 0; fp32 rounding can dip below
            kl_teacher = "url" if isinstance(teacher, TokenScorer) else (
                ("carried" if getattr(dense, "cross_tokenizer", False) else "dense") if dense is not None else "topk")

    asked = [i for i, r in enumerate(data.records) if r.prompt_messages is not None
             and (r.record is not None or r.answer is not None)]
    answers: list[str | None] = [None] * len(data)
    em, f1, acc = [], [], []
    if greedy and asked:
        if max_new_tokens is None:
            longest = max(len(data.example(i).response_ids) for i in asked)
            max_new_tokens = min(longest + EXTRA_NEW_TOKENS, MAX_NEW_TOKENS_CAP)
        gen = greedy_ids(model, tokenizer, [data.example(i).prompt_ids for i in asked], max_new_tokens,
                         batch_size, device, progress)
        for i, ids in zip(asked, gen):
            text = answers[i] = _answer_text(tokenizer, ids)
            rec = data.records[i]
            if rec.record is not None:
                em.append(float(metrics.matches(text, rec.record.response)))
                f1.append(metrics.token_f1(_tokens(tokenizer, text), _tokens(tokenizer, rec.record.response)))
            if rec.answer is not None:
                acc.append(float(metrics.matches(text, rec.answer)))
    n_answer = sum(r.answer is not None for r in data.records)
    return EvalResult(
        n=len(data), ce=ce, perplexity=None if ce is None else metrics.perplexity(ce), kl=kl,
        exact_match=metrics.mean(em), token_f1=metrics.mean(f1), accuracy=metrics.mean(acc),
        kl_teacher=kl_teacher, n_scored=sum(r.record is not None for r in data.records), n_greedy=len(em),
        n_answer=n_answer, tokens=n_tok, kl_tokens=n_kl if kl is not None else 0,
        max_new_tokens=max_new_tokens if greedy and asked else None, answers=answers)


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None


def local_teacher(student_tok, src: ModelSource, device, top_k: int):
    """--teacher DIR: the model itself (dense KL) on the student's tokenizer; with another tokenizer a
    `LocalCrossTeacher`, its top-`top_k` carried onto the student's tokens by bytes, as training's
    teacher.path carries it (loss.cross_tokenizer auto) and the daemon's held-out eval scores it."""
    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide, same_tokenizer

    teacher_tok, model = load_tokenizer(src), load_model(src, device)
    if same_tokenizer(teacher_tok, student_tok):
        return model
    return LocalCrossTeacher(model, teacher_tok, StudentSide(student_tok), top_k)


def _same_tokens_over_http(student_tok, scorer, url) -> None:
    """Scoring over HTTP sends the student's ids: a teacher with another tokenizer would score other
    tokens and give a KL of nonsense (10.7 nats where the stored top-k gave 0.06). Where the server
    tokenizes (vLLM's and kdforge serve's /tokenize, free), a probe of accents, CJK and emoji must
    come back as the student's ids, else exit 2."""
    from kdforge.train.cross_scoring import probe

    _, ids, theirs = probe(scorer, student_tok)
    if theirs is not None and theirs != ids:
        scorer.close()
        raise UsageError(f"--teacher {url} has another tokenizer than the student: eval scores the student's token "
                         "ids, so its KL would compare other tokens. Leave --teacher out (the KL against the top-k "
                         "stored in the data, carried onto the student's tokens by bytes) or evaluate a student "
                         "on the teacher's tokenizer")


def evaluate_model(model_dir: str | Path, data_files: str | Path | Sequence[str | Path], teacher: str | None = None,
                   *, base: str | None = None, device: str = "auto", max_records: int | None = None,
                   batch_size: int = 16, max_new_tokens: int | None = None, greedy: bool = True,
                   teacher_model: str | None = None, top_k: int = 20,
                   api_key_env: str = "OPENAI_API_KEY", progress: Progress | None = None) -> EvalResult:
    """Load MODEL_DIR (full model, LoRA checkpoint, daemon checkpoint; `base` overrides a LoRA
    base) and score it on `data_files`. `teacher`: a model folder (dense KL; another tokenizer's
    top-`top_k` carried), an OpenAI-compatible URL that scores tokens (sparse top-`top_k` KL;
    `teacher_model` names the model, default the server's only one), or None (the top-k stored in
    the data)."""
    src = resolve_model_dir(model_dir, base)
    teacher_src = None if teacher is None or _is_url(teacher) else resolve_model_dir(teacher)
    dev = pick_device(device)
    # Data before weights: a bad line is reported in a second, not after loading a model.
    tokenizer = load_tokenizer(src)
    data = load_eval_data(data_files, tokenizer, max_seq_length=src.context_len(), max_records=max_records)
    model = load_model(src, dev)
    scorer = None
    if teacher_src is not None:
        teacher_obj = local_teacher(tokenizer, teacher_src, dev, top_k)
    elif teacher is not None:
        from kdforge.teacher.scoring import TokenScorer

        teacher_obj = scorer = TokenScorer(teacher, teacher_model, top_k, api_key_env)
        _same_tokens_over_http(tokenizer, scorer, teacher)
    else:
        teacher_obj = None
    try:
        return evaluate_loaded(model, tokenizer, data, teacher_obj, device=dev, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, greedy=greedy, model_name=src.describe(),
                               progress=progress)
    finally:
        if scorer is not None:
            scorer.close()

"""The benchmark's shipped tasks, their teachers, the teacher's answers and how a student is scored.

    sort  the demo's sort-letters task and teacher (near-certain: top-1 probability ~1);
          greedy teacher answers (what `kdforge generate --temperature 0` stores), scored by exact
          match on the 200 held-out prompts of demo/assets/eval.jsonl (higher is better)
    lang  the stochastic grammar of `bench.lang` and its teacher in bench/assets/lang (broad next-token
          distribution); teacher answers sampled at temperature 1, scored by held-out forward
          KL(teacher || student) against the dense teacher and perplexity on 300 fresh teacher
          samples (kdforge eval; lower is better)
    langx the same teacher and answers (top-20 stored), a student with a tokenizer of its own: a
          byte-level BPE with OWN_MERGES merges above its 256 bytes, so the teacher's word tokens
          split into several of its pieces (cross-tokenizer KD, data/align.py); scored by held-out
          bits per byte of the teacher's samples (tokenizer-independent; lower is better)

Teacher answers are made in-process from the local teacher (faster than `kdforge serve` +
`kdforge generate` on 2 cores) in generate's record format: `teacher_text`, `teacher_logprobs` with
the chosen token, its bytes and the top-k alternatives, from the model's raw fp32 logits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdforge.bench import lang
from kdforge.demo import EVAL_FILE, TEACHER_DIR
from kdforge.demo.chat import prompt_text
from kdforge.demo.task import make_prompts
from kdforge.model import ModelCfg

LANG_DIR = Path(__file__).resolve().parent / "assets" / "lang"
TOP_K = 5  # teacher alternatives stored per answer token (as the demo does)
OWN_MERGES = 24  # langx: the student's BPE merges above its bytes (the teacher's has 140)


@dataclass(frozen=True)
class Task:
    name: str
    teacher_dir: Path
    metric: str  # "accuracy" (exact match, higher is better) or "kl" (nats/token, lower is better)
    temperature: float  # teacher answers: 0 greedy, else sampled
    max_new_tokens: int  # teacher answers and on-policy samples
    steps: int  # optimizer steps per student (batch 32)
    kd_weight: float  # off-policy recipes: loss = (1 - w) CE + w KD
    train_prompts: Callable[[int], list[str]]  # the first n prompts the teacher answers
    pool: Callable[[], list[str]]  # on-policy prompts (free: no teacher tokens until scored)
    student: ModelCfg
    top_k: int = TOP_K  # teacher alternatives stored per answer token
    own_merges: int | None = None  # the student's own BPE (merges above the bytes); None: the teacher's tokenizer
    recipes: tuple[str, ...] | None = None  # the recipes this task runs (None: all)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def _student(max_seq_len: int = 64) -> ModelCfg:
    # The demo's student shape (235,584 parameters at vocab 300): under 1/4 of either teacher.
    return ModelCfg(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                    ffn_dim=192, max_seq_len=max_seq_len)


def _lang_prompts(n: int) -> list[str]:
    return [r["prompt"] for r in lang.make_records(n, seed=7)]


TASKS = {
    "sort": Task("sort", TEACHER_DIR, "accuracy", 0.0, 12, 600, 0.5,
                 lambda n: [r["prompt"] for r in make_prompts(n, 0, "train")],
                 lambda: [r["prompt"] for r in make_prompts(20_000, 0, "train")], _student()),
    "lang": Task("lang", LANG_DIR, "kl", 1.0, 16, 300, 0.5, _lang_prompts,
                 lambda: _lang_prompts(5000), _student()),
    # its own tokenizer spells a record in ~2x the teacher's tokens: 128 positions hold one
    "langx": Task("langx", LANG_DIR, "bpb", 1.0, 16, 300, 0.5, _lang_prompts, lambda: _lang_prompts(5000),
                  _student(128), top_k=20, own_merges=OWN_MERGES, recipes=("ce", "topk_t1", "topk_t2")),
}


def student_tokenizer(task: Task, work: Path) -> Path:
    """The folder of the tokenizer the task's student trains with: the teacher's, or (own_merges)
    a byte-level BPE trained here, deterministically, on 2,000 sentences of the language and its
    prompts (`kdforge tokenizer train`'s trainer)."""
    if task.own_merges is None:
        return task.teacher_dir
    from kdforge.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

    out = work / f"{task.name}-tokenizer"
    if not (out / "tokenizer.json").exists():
        texts = [t for r in lang.make_records(2000, seed=99) for t in (r["prompt"], r["answer"])]
        train_tokenizer(texts, 256 + len(SPECIAL_TOKENS) + task.own_merges, out, min_frequency=2)
    return out


def load_teacher(task: Task):
    """(model, tokenizer) of the task's teacher, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(task.teacher_dir), dtype=torch.float32,
                                                 trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(str(task.teacher_dir), trust_remote_code=False)


def _entry(tok, token_id: int, logprob: float) -> dict:
    text = tok.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def teacher_answers(model, tok, prompts: list[str], temperature: float, max_new_tokens: int, seed: int,
                    batch_size: int = 100, top_k: int = TOP_K) -> list[dict]:
    """generate-format records for `prompts`, each with `usage` (prompt / completion tokens, EOS
    counted as a completion token, as an API bills it).

    Answered in chunks of `batch_size`, each sampled from its own seed (seed + chunk index): a
    chunk's answers and logprobs depend on its prompts alone, so the first n of a longer list are
    the answers a list of n would get when n is a whole number of chunks (the bench's budgets nest)."""
    import torch

    out = []
    pad, eos = tok.pad_token_id, tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        torch.manual_seed(seed + i // batch_size)
        chunk = prompts[i:i + batch_size]
        seqs = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 # sampling from the full distribution: no top-k/top-p truncation
                                 **({"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
                                    if temperature > 0 else {"do_sample": False}),
                                 eos_token_id=eos, pad_token_id=pad, output_logits=True,
                                 return_dict_in_generate=True)
        # raw logits per generated position (before sampling processors): the teacher's own distribution
        logp = torch.log_softmax(torch.stack(gen.logits, 1).float(), -1)
        for b, (p, s) in enumerate(zip(chunk, seqs)):
            row = gen.sequences[b, width:].tolist()
            n = row.index(eos) if eos in row else len(row)
            lps = []
            for t in range(n):
                top = logp[b, t].topk(top_k)
                e = _entry(tok, row[t], float(logp[b, t, row[t]]))
                e["top"] = [_entry(tok, int(j), float(v)) for v, j in zip(top.values, top.indices)]
                lps.append(e)
            out.append({"prompt": p, "teacher_text": tok.decode(row[:n], skip_special_tokens=True),
                        "teacher_logprobs": lps,
                        "usage": {"prompt_tokens": len(s), "completion_tokens": n + (n < len(row))}})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_file(task: Task, work: Path, teacher=None) -> Path:
    """The held-out eval file: sort's shipped prompts with exact answers; for lang, 300 teacher
    samples (seed 12345, never used for training) with their top-k."""
    if task.name == "sort":
        return EVAL_FILE
    path = work / "lang-eval.jsonl"  # langx scores the same samples
    if not path.exists():
        model, tok = teacher or load_teacher(task)
        write_jsonl(path, teacher_answers(model, tok, _lang_prompts(300), 1.0, task.max_new_tokens, 12345))
    return path


def score(task: Task, model, tok, eval_path: Path, teacher=None) -> dict:
    """The task's quality numbers of a loaded model: {"quality", and the eval's numbers}.

    sort: quality = exact-match accuracy (greedy). lang: quality = KL(teacher || student) on the
    held-out teacher samples, dense against the loaded teacher model; perplexity beside it. langx
    (metric bpb): quality = bits per byte of those samples' answers on the model's own tokens."""
    from kdforge.eval import evaluate_loaded

    if task.metric == "bpb":
        return {"quality": bits_per_byte(model, tok, eval_path)}
    if task.name == "sort":
        r = evaluate_loaded(model, tok, eval_path, max_new_tokens=task.max_new_tokens, batch_size=100)
        return {"quality": r.accuracy, "accuracy": r.accuracy}
    r = evaluate_loaded(model, tok, eval_path, teacher=teacher, greedy=False, batch_size=100)
    return {"quality": r.kl, "kl": r.kl, "ce": r.ce, "perplexity": r.perplexity if r.ce is not None
            and math.isfinite(r.ce) else None}


def bits_per_byte(model, tok, eval_path: Path) -> float:
    """Held-out bits per byte: the model's summed negative log-likelihood of each record's answer
    and its end (EOS), on its own tokenization, over the answers' UTF-8 bytes, in bits. Models with
    different tokenizers compare on it (per-token numbers do not: a finer tokenizer has more,
    easier tokens)."""
    from kdforge.data.records import read_records
    from kdforge.eval import evaluate_loaded

    recs, _ = read_records(eval_path)
    n_bytes = sum(len(r.response.encode("utf-8")) for r in recs)
    plain = eval_path.parent / f"{eval_path.stem}-text.jsonl"  # answers only: no teacher rows to align
    if not plain.exists():  # the same content from any worker: written whole, then renamed into place
        tmp = write_jsonl(plain.with_name(f"{plain.name}.{os.getpid()}"),
                          [{"prompt": r.prompt_messages[-1]["content"], "teacher_text": r.response} for r in recs])
        os.replace(tmp, plain)
    r = evaluate_loaded(model, tok, plain, greedy=False, batch_size=100)
    return r.ce * r.tokens / n_bytes / math.log(2)

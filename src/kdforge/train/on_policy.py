"""On-policy distillation: the student answers the step's prompts, the teacher scores those tokens.

Each optimizer step is on-policy with probability `on_policy.fraction`, drawn from a generator
seeded by (train.seed, global step) alone, so a resumed run makes the same draws (no state to
save). On such a step `train_steps` hands its micro-batches to `OnPolicy.replace`:

1. prompts: the prompt tokens of the step's dataset examples (the tokens before the first label);
   or, with `on_policy.prompts`, prompts drawn (seeded by the step) from those prompt-only files,
   and then the dataset is not consumed;
2. the student samples answers (`model.generate`: batched, KV-cached, no gradient, left-padded),
   at `temperature` / `top_p` for up to `max_new_tokens`, with the torch RNG seeded from the step
   inside `fork_rng` (the training RNG is untouched); everything after the first EOS is dropped;
3. the batch becomes prompt + answer with labels on the answer only (the EOS included), and the
   teacher scores exactly those tokens: `teacher.path` in the objective (dense logits, as for any
   batch); `teacher.url` over HTTP (`teacher.scoring.PricedScorer`: top-K logprobs by token id,
   through the budget ledger, cache and rate limiter), stored as the batch's `topk_ids` /
   `topk_logprobs` like a dataset's top-k;
4. the loop trains the configured divergence alone on it (kd_weight 1: there is no teacher text).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdforge.data.dataset import IGNORE, collate

# Stream salts: the step's draw, its prompts and its samples come from unrelated generators.
_DRAW, _PROMPTS, _SAMPLE = 1, 2, 3


def _seed(seed: int, step: int, salt: int, m: int = 0) -> int:
    """A 63-bit seed from (train.seed, global step, purpose, micro-batch index)."""
    return ((((seed * 1_000_003 + step) * 1_009 + salt) * 100_003 + m) * 0x9E3779B97F4A7C15) % (1 << 63)


@dataclass
class StepReport:
    """What one on-policy step cost: for the step's metrics record."""

    teacher_tokens: int = 0  # tokens the teacher scored (prompt + answer, every sequence; in ITS tokens)
    answer_tokens: int = 0  # tokens the student sampled (EOS included)
    usd: float = 0.0  # money this step's scoring charged (0 for a local teacher or a cache hit)
    cached: int = 0  # scoring requests the cache answered

    def metrics(self, spent_total: float | None, on_policy: bool = True) -> dict:
        rec = {"on_policy": on_policy, "teacher_tokens": self.teacher_tokens, "answer_tokens": self.answer_tokens,
               "teacher_usd": round(self.usd, 9)}
        if spent_total is not None:
            rec["teacher_usd_total"] = round(spent_total, 9)
            rec["teacher_cached"] = self.cached
        return rec


def on_policy_spend(metrics_path: str | Path) -> tuple[int, int]:
    """(on-policy steps, teacher tokens they scored) from a run's metrics.jsonl: the records
    `StepReport.metrics` wrote (every step's, when train.log_steps is 1). A missing file (a short
    run that never reached log_steps) is (0, 0)."""
    import json

    steps = tokens = 0
    path = Path(metrics_path)
    for line in (path.read_text().splitlines() if path.exists() else []):
        rec = json.loads(line)
        if rec.get("on_policy"):
            steps += 1
            tokens += rec.get("teacher_tokens", 0)
    return steps, tokens


class OnPolicy:
    """Decides which steps are on-policy and builds their micro-batches (see the module docstring).

    `model`: the student itself (not a DDP wrapper); `scorer`: a PricedScorer when the teacher is
    `teacher.url`, else None (the objective's dense teacher scores in-process); `teacher`: that
    in-process teacher (the session's), which counts the tokens it scores when it has another
    tokenizer (a LocalCrossTeacher)."""

    def __init__(self, section, seed: int, model, tokenizer, *, micro_batch_size: int, scorer=None,
                 prompt_pool: "PromptPool | Sequence[Sequence[int]] | None" = None, fsdp_root=None,
                 teacher=None):
        self.fraction = section.fraction
        self.max_new_tokens = section.max_new_tokens
        self.temperature = section.temperature
        self.top_p = section.top_p
        self.seed = seed
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.mbs = micro_batch_size
        self.scorer = scorer
        self.pool = prompt_pool if isinstance(prompt_pool, PromptPool) else PromptPool.of(prompt_pool or [])
        self.last = StepReport()
        self.cross_teacher = teacher if getattr(teacher, "cross_tokenizer", False) else None
        self.fsdp_root = fsdp_root  # FSDP2: the sharded root (objective) whose parameters sampling needs
        if fsdp_root is not None:
            # FSDP2 names its root at the first forward through it; sampling calls the student's
            # own forward first, which would make each decoder layer a root. Settle it now (no-op
            # once a training step ran).
            fsdp_root._get_fsdp_state()._lazy_init()

    @classmethod
    def from_session(cls, session, log=print, state_dir: str | Path | None = None,
                     fraction: float | None = None) -> OnPolicy | None:
        """From the session's config (on_policy, teacher, generate sections); None when fraction is 0.
        `state_dir`: where a priced teacher's ledger and cache live (default OUTPUT_DIR/on_policy);
        `fraction` replaces on_policy.fraction (the daemon's batch of prompts alone: 1)."""
        cfg = session.cfg
        op = cfg.on_policy
        if op.fraction <= 0 and not scores_data(cfg):
            return None
        if fraction is not None:
            op = op.model_copy(update={"fraction": fraction})
        scorer = None
        if not cfg.teacher.path:  # teacher.url (check_config guarantees one of the two)
            scorer = _step_scorer(cfg, session.world, log, state_dir, vocab_size=student_vocab(session.model))
            from kdforge.train.cross_scoring import over_http  # another tokenizer: it scores text

            scorer = over_http(cfg, scorer, session.tokenizer, log)
        pool = read_prompt_pool(op.prompts, session.tokenizer) if op.prompts else None
        return cls(op, cfg.train.seed, session.model, session.tokenizer,
                   micro_batch_size=cfg.train.micro_batch_size, scorer=scorer, prompt_pool=pool,
                   fsdp_root=session.objective if session.fsdp else None, teacher=getattr(session, "teacher", None))

    @property
    def scores_data(self) -> bool:
        """teacher.url: off-policy micro-batches' records without stored top-k are scored over HTTP."""
        return self.scorer is not None

    # ------------------------------------------------------------------ the draw
    def is_on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` (the global step before it runs) trains on-policy."""
        if self.fraction >= 1:
            return True
        g = torch.Generator().manual_seed(_seed(self.seed, step, _DRAW))
        return bool(torch.rand((), generator=g) < self.fraction)

    @property
    def uses_pool(self) -> bool:
        """Prompts come from `on_policy.prompts`: an on-policy step leaves the dataset where it is."""
        return bool(self.pool)

    def pool_prompts(self, step: int, n_micro: int) -> list[list[list[int]]]:
        """`n_micro` micro-batches of prompts drawn from the pool (with replacement), seeded by the step."""
        g = torch.Generator().manual_seed(_seed(self.seed, step, _PROMPTS))
        idx = torch.randint(len(self.pool), (n_micro, self.mbs), generator=g).tolist()
        return [[self.pool[i] for i in row] for row in idx]

    # ------------------------------------------------------------------ a step's batches
    def replace(self, step: int, prompt_sets: list[list[list[int]]], rank: int = 0, world: int = 1) -> list[dict]:
        """Micro-batches of the student's answers to each set of prompts, scored as configured.
        Set m of this rank is micro-batch m * world + rank of the step: its seed says which, and
        over HTTP the teacher scores the step's sequences in that global order (one ledger)."""
        self.last = StepReport()
        out, seqs = [], []
        sets = [(m, [p for p in prompts if p]) for m, prompts in enumerate(prompt_sets)]
        sets = [(m, prompts) for m, prompts in sets if prompts]  # a {"text"} record has no prompt to answer
        for m, prompts in sets:
            batch, s = self.answer(prompts, _seed(self.seed, step, _SAMPLE, m * world + rank))
            out.append(batch)
            seqs.append((m * world + rank, s))
        if self.fsdp_root is not None and world > 1:
            self._match_sampling_calls(len(sets))
        if self.scorer is not None:
            scored, self.last.usd, self.last.cached = self.scorer.score_step(seqs)
            self.last.teacher_tokens = self.scorer.tokens  # in the teacher's own tokens (another tokenizer)
            for batch, rows in zip(out, scored, strict=True):
                _attach_scores(batch, rows)
        elif self.cross_teacher is not None:  # the objective's teacher re-tokenises the text: its count
            self.last.teacher_tokens = sum(self.cross_teacher.count(s) for _, ss in seqs for s in ss)
        else:
            self.last.teacher_tokens = sum(len(s) for _, ss in seqs for s in ss)
        return out

    def score_missing(self, batches: list[dict], rank: int = 0, world: int = 1) -> list[dict]:
        """Off-policy micro-batches (this rank's; batch j is micro-batch j * world + rank of the step)
        with the teacher's top-K over HTTP for every example that carries no stored top-k (the whole
        example scored, as an on-policy sequence is: same ledger, cache, prices and stop). Examples
        with stored top-k keep theirs. Under torchrun every rank calls this at every off-policy step."""
        self.last = StepReport()
        spans = [unscored_spans(batch) for batch in batches]
        sets = []
        for j, (batch, found) in enumerate(zip(batches, spans)):
            seqs = [batch["input_ids"][b][pos].tolist() for b, pos in found]
            sets.append((j * world + rank, seqs))
        scored, self.last.usd, self.last.cached = self.scorer.score_step(sets)
        self.last.teacher_tokens = self.scorer.tokens
        for batch, found, rows_all in zip(batches, spans, scored, strict=True):
            _fill_scores(batch, found, rows_all)
        return batches

    def _match_sampling_calls(self, mine: int) -> None:
        """FSDP: every forward all-gathers, so every rank must sample as many times as the busiest
        one; a rank with fewer prompt sets (its {"text"} records, the data's end) samples a
        throwaway prompt to keep pace."""
        import torch.distributed as dist

        n = torch.tensor([mine], dtype=torch.long, device=next(self.model.parameters()).device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        for _ in range(int(n) - mine):
            self.sample([[self.eos_id]], 0)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """The student's answer to each prompt: sampled tokens up to and including the first EOS."""
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        gc = GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                              max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                              eos_token_id=self.eos_id, use_cache=True)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        devices = [device] if device.type == "cuda" else []
        sharded = self.fsdp_root is not None
        try:
            if sharded:  # the root's own parameters (embeddings, head); decoder layers gather themselves
                self.fsdp_root.unshard()
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                # synced_gpus under FSDP: a rank whose answers ended keeps stepping until all have
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          generation_config=gc, synced_gpus=sharded or None)
        finally:
            if sharded:
                self.fsdp_root.reshard()
            self.model.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            answers.append(row[:cut])
        return answers

    def answer(self, prompts: list[list[int]], seed: int) -> tuple[dict, list[list[int]]]:
        """One micro-batch (prompt + sampled answer, labels on the answer) and its sequences."""
        answers = self.sample(prompts, seed)
        items = []
        for p, a in zip(prompts, answers):
            items.append({"input_ids": torch.tensor(p + a, dtype=torch.long),
                          "labels": torch.tensor([IGNORE] * len(p) + a, dtype=torch.long)})
            self.last.answer_tokens += len(a)
        return collate(items, self.pad_id), [p + a for p, a in zip(prompts, answers)]

    def step_metrics(self, on_policy: bool = True) -> dict:
        """The step's record fields: on_policy, and what the teacher scored and cost (off-policy
        steps: only when teacher.url scored their records)."""
        if not on_policy and self.scorer is None:
            return {"on_policy": False}
        return self.last.metrics(self.scorer.spent if self.scorer is not None else None, on_policy)

    def describe(self) -> str:
        """One log line: what on-policy steps do here."""
        where = f"{len(self.pool):,} prompts of on_policy.prompts" if self.pool else "the step's data"
        teacher = "teacher.path (dense)"
        if self.scorer is not None:
            priced = getattr(self.scorer, "scorer", None)  # rank 0's PricedScorer (or the cross scorer's)
            priced = getattr(priced, "priced", priced)
            prices = getattr(getattr(priced, "ledger", None), "prices", None)
            priced = (f"${prices.input:g} per million scored tokens ({prices.source})" if prices is not None
                      else "priced on rank 0")
            teacher = f"teacher.url (top-K over HTTP, {priced})"
        line = (f"on-policy: {self.fraction:g} of steps; prompts from {where}; sampled at T {self.temperature:g}, "
                f"top_p {self.top_p:g}, <= {self.max_new_tokens} tokens; scored by {teacher}")
        if self.scores_data:
            line += "; off-policy records without stored top-k are scored by it too"
        return line

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def scores_data(cfg) -> bool:
    """Whether teacher.url scores off-policy KD steps (records without stored top-k)."""
    return bool(cfg.teacher.url) and not cfg.teacher.path and cfg.loss.kind != "ce"


def example_spans(batch: dict):
    """(row, bool positions) of every example of a padded micro-batch (its attention mask) or a packed
    one (each `seq_ids` segment, in order; padding is -1)."""
    segs = batch.get("seq_ids")
    for b in range(batch["labels"].shape[0]):
        if segs is None:
            yield b, batch["attention_mask"][b].bool()
        else:
            for s in segs[b].unique().tolist():
                if s >= 0:
                    yield b, segs[b] == s


def unscored_spans(batch: dict) -> list[tuple[int, torch.Tensor]]:
    """(row, bool positions) of every example of a padded or packed micro-batch that has targets
    and no stored top-k row at any of them (a record without teacher_logprobs)."""
    labels, ids = batch["labels"], batch.get("topk_ids")
    out = []
    for b, span in example_spans(batch):
        target = span & (labels[b] != IGNORE)
        if target.any() and (ids is None or not (ids[b][target] >= 0).any()):
            out.append((b, span))
    return out


def _fill_scores(batch: dict, spans: list, rows_all: list) -> None:
    """Write the teacher's rows for each scored example (`rows_all[i]` row j: token j of span i)
    at its target positions, widening the batch's top-k tensors (created if absent) to fit."""
    B, L = batch["input_ids"].shape
    K = max((len(r) for rows in rows_all for r in rows if r), default=1)
    if "topk_ids" not in batch:
        batch["topk_ids"] = torch.full((B, L, K), -1, dtype=torch.long)
        batch["topk_logprobs"] = torch.zeros((B, L, K), dtype=torch.float32)
    k0 = batch["topk_ids"].shape[-1]
    if K > k0:
        batch["topk_ids"] = torch.cat([batch["topk_ids"], torch.full((B, L, K - k0), -1, dtype=torch.long)], -1)
        batch["topk_logprobs"] = torch.cat([batch["topk_logprobs"], torch.zeros((B, L, K - k0))], -1)
    for (b, span), rows in zip(spans, rows_all, strict=True):
        for t, r in zip(span.nonzero().flatten().tolist(), rows, strict=True):
            if r and batch["labels"][b, t] != IGNORE:
                _write_row(batch, b, t, r)


def _write_row(batch: dict, b: int, t: int, row: dict) -> None:
    """Row {id: logprob} as the batch's top-k at (b, t), best first (id -1 pads the rest)."""
    top = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))
    batch["topk_ids"][b, t] = -1
    batch["topk_logprobs"][b, t] = 0.0
    batch["topk_ids"][b, t, :len(top)] = torch.tensor([i for i, _ in top])
    batch["topk_logprobs"][b, t, :len(top)] = torch.tensor([lp for _, lp in top])


def _attach_scores(batch: dict, rows_all: list) -> None:
    """The teacher's top-K for every token of each sequence, as a dataset's top-k tensors
    (row t is the teacher's distribution for token t; id -1 marks no entry)."""
    B, L = batch["input_ids"].shape
    K = max((len(r) for rows in rows_all for r in rows if r), default=1)
    ids = torch.full((B, L, K), -1, dtype=torch.long)
    lps = torch.zeros((B, L, K), dtype=torch.float32)
    batch["topk_ids"], batch["topk_logprobs"] = ids, lps
    for b, rows in enumerate(rows_all):
        for t, r in enumerate(rows):
            if r and batch["labels"][b, t] != IGNORE:
                _write_row(batch, b, t, r)


class StepScorer:
    """teacher.url scoring of a step's sequences. One process: the PricedScorer itself. Under
    torchrun rank 0 alone holds the PricedScorer (one budget ledger, cache and rate limiter per
    output dir): every rank sends it its sequences, rank 0 scores them in the step's global
    micro-batch order (as one process would) and sends each rank its rows, the step's $ and the
    total spent; an error on rank 0 (budget, teacher) is raised on every rank, so none waits."""

    def __init__(self, scorer, rank: int = 0, world: int = 1):
        self.scorer, self.rank, self.world = scorer, rank, world  # scorer None on ranks > 0
        self._spent = scorer.spent if scorer is not None else 0.0
        self.tokens = 0  # tokens the teacher scored for this rank's sequences at the last score_step

    @property
    def spent(self) -> float:
        return self._spent

    def _score(self, sets: list[tuple[int, list[list[int]]]]) -> tuple[dict, float, int, dict]:
        """{global micro-batch index: rows per sequence}, $ charged, cache hits, {index: tokens the
        teacher scored} (its own tokens: a teacher with another tokenizer re-tokenises the text) (rank 0)."""
        from kdforge.train.cross_scoring import scored_tokens

        out, usd, cached, tokens = {}, 0.0, 0, {}
        for m, seqs in sorted(sets, key=lambda x: x[0]):
            out[m], tokens[m] = [], 0
            for s in seqs:
                rows, u, hit = self.scorer.score(s)
                out[m].append(rows)
                usd, cached, tokens[m] = usd + u, cached + int(hit), tokens[m] + scored_tokens(self.scorer, s)
        return out, usd, cached, tokens

    def score_step(self, sets: list[tuple[int, list[list[int]]]]) -> tuple[list, float, int]:
        """`sets`: this rank's (global micro-batch index, sequences). Rows per set, in order; the
        step's $ (every rank's sequences) and cache hits. `tokens`: what the teacher scored of this
        rank's sequences."""
        if self.world == 1:
            got, usd, cached, tokens = self._score(sets)
            self._spent, self.tokens = self.scorer.spent, sum(tokens[m] for m, _ in sets)
            return [got[m] for m, _ in sets], usd, cached
        import torch.distributed as dist

        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(sets, gathered, dst=0)
        replies = None
        if self.rank == 0:
            error = None
            try:
                got, usd, cached, tokens = self._score([x for part in gathered for x in part])
            except Exception as e:  # every rank must hear of it, or they would wait forever
                error, got, usd, cached, tokens = e, {}, 0.0, 0, {}
            spent = self.scorer.spent
            replies = [(None if error else [got[m] for m, _ in part], usd, cached, spent,
                        None if error is None else (type(error).__name__, str(error)),
                        sum(tokens.get(m, 0) for m, _ in part)) for part in gathered]
        mine = [None]
        dist.scatter_object_list(mine, replies, src=0)
        rows, usd, cached, self._spent, err, self.tokens = mine[0]
        if err is not None:
            if self.rank == 0:
                raise error
            raise _rank0_error(*err)
        return rows, usd, cached

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def _rank0_error(kind: str, message: str) -> Exception:
    """Rank 0's scoring error, raised on another rank with the same exit code."""
    from kdforge import errors

    cls = getattr(errors, kind, None)
    if cls in (errors.BudgetExceededError, errors.TeacherRefusedError, errors.UsageError, errors.KdforgeError):
        return cls(message)
    return errors.KdforgeError(f"teacher scoring failed on rank 0: {kind}: {message}")


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt tokens of every example of a padded or packed dataset micro-batch: the tokens
    before its first label (empty for a {"text"} record, which is all response; packed, its first
    label is erased, and `first_target` says it was one)."""
    out = []
    ids, labels, starts = batch["input_ids"], batch["labels"], batch.get("first_target")
    for b, span in example_spans(batch):
        x, y = ids[b][span].tolist(), labels[b][span].tolist()
        if starts is not None and bool(starts[b][span][0]):
            out.append([])
            continue
        first = next((i for i, v in enumerate(y) if v != IGNORE), len(y))
        out.append(x[:first])
    return out


def without_answers(ds, asked: Sequence[int]) -> int:
    """Give the prompt-only examples `asked` of `ds` (indices; a daemon batch's records, in order) no
    target at all (the dataset gave them a lone EOS to learn): such an example trains on on-policy
    steps only, where its prompt is answered by the student (an off-policy step gets nothing from it,
    as an on-policy step gets nothing from a {"text"} record). Returns how many there are."""
    for i in asked:
        ds.clear_response(i)
    lines = {ds.line_of(i)[1] for i in asked}  # one file: a line number names one record
    ds.ce_only_lines = [(p, ln) for p, ln in ds.ce_only_lines if ln not in lines]  # not "CE only": on-policy
    return len(asked)


class PromptPool:
    """On-policy prompts as token ids, compactly: one flat int32 array of every prompt's ids back to
    back and int64 offsets (prompt i is ids[offsets[i]:offsets[i + 1]]), ~4 bytes per token where a
    list of Python ints takes ~36. `pool[i]` is prompt i as a list of ints."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]]) -> "PromptPool":
        ids, offsets = array("i"), array("q", [0])
        for p in prompts:
            ids.extend(p)
            offsets.append(len(ids))
        return cls(np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32),
                   np.frombuffer(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} of a pool of {len(self)}")
        i %= len(self)
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def nbytes(self) -> int:
        return self.ids.nbytes + self.offsets.nbytes


_POOL_BATCH = 512  # prompts tokenised per tokenizer call while a pool is read


def read_prompt_pool(files: list[str], tokenizer) -> PromptPool:
    """Prompt-only files (generate's --prompts formats) as token ids, rendered like dataset prompts,
    in file order, into a compact `PromptPool` (a batch of prompts is tokenised at a time and appended:
    the pool grows by ~4 bytes per token; only one batch is ever Python lists)."""
    from kdforge.data.dataset import prompt_text  # the dataset's own rendering
    from kdforge.teacher.prompts import read_prompt_file

    def tokenised():
        for f in files:
            prompts = read_prompt_file(f)
            for b in range(0, len(prompts), _POOL_BATCH):
                texts = [prompt_text(tokenizer, [{"role": r, "content": c} for r, c in p.messages])
                         for p in prompts[b:b + _POOL_BATCH]]
                yield from tokenizer(texts, add_special_tokens=False)["input_ids"]

    return PromptPool.of(tokenised())


def student_vocab(model) -> int:
    """Rows of the student's output layer: the ids a teacher's scores may name."""
    from kdforge.train.objective import base_lm

    return int(base_lm(model).get_output_embeddings().weight.shape[0])


def _step_scorer(cfg, world: int, log, state_dir: str | Path | None = None, vocab_size: int | None = None) -> StepScorer:
    """The StepScorer of this rank: rank 0 (or the one process) opens the priced scorer; under
    torchrun the others learn whether that worked, and fail with rank 0's error if not."""
    if world == 1:
        return StepScorer(_priced_scorer(cfg, log, state_dir, vocab_size))
    import torch.distributed as dist

    rank, scorer, err = dist.get_rank(), None, None
    if rank == 0:
        try:
            scorer = _priced_scorer(cfg, log, state_dir, vocab_size)
        except Exception as e:
            err = e
    said = [None if err is None else (type(err).__name__, str(err))]
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:
        raise err if rank == 0 else _rank0_error(*said[0])
    return StepScorer(scorer, rank, world)


def _priced_scorer(cfg, log, state_dir: str | Path | None = None, vocab_size: int | None = None):
    """teacher.url's PricedScorer, priced from the generate section or the shipped table. An
    unknown price is exit 2, budget or not: spend is never recorded as $0 for a teacher whose price
    nobody gave (prices 0 say a teacher is free, e.g. a local kdforge serve)."""
    from kdforge.errors import UsageError
    from kdforge.teacher.pricing import resolve_prices
    from kdforge.teacher.scoring import PricedScorer, Retries, TokenScorer

    g, t = cfg.generate, cfg.teacher
    model = t.model or g.model
    if model is None:  # the server's only model names the price
        probe = TokenScorer(t.url, None, t.top_logprobs, t.api_key_env)
        try:
            model = probe.resolved_model()
        finally:
            probe.close()
    prices = resolve_prices(model, g.price_input, g.price_output)
    if prices is None:
        why = "generate.budget_limit needs one" if g.budget_limit is not None else \
            "spend would be recorded as $0 for a teacher nobody priced"
        raise UsageError(f"teacher.url {t.url}: no price known for the model {model!r} ({why}): set "
                         "generate.price_input and generate.price_output (USD per million tokens; 0 and 0 for a "
                         "free local teacher such as kdforge serve)")
    retries = Retries(g.max_retries, g.retry_base, g.retry_max, g.timeout)
    return PricedScorer(t.url, model, t.top_logprobs, t.api_key_env, state_dir or Path(cfg.io.output_dir) / "on_policy",
                        prices, g.budget_limit, g.rpm, g.tpm, g.delay, log=log, vocab_size=vocab_size,
                        retries=retries, seed=cfg.train.seed)

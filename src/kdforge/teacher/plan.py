"""From prompts to requests: the exact body sent for each sample, its stable id and cache key,
and the dry-run projection of what the plan may cost."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kdforge.config import GenerateSection
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache, canonical, request_key
from kdforge.teacher.journal import Journal
from kdforge.teacher.pricing import NANO, Prices, unknown_price_fix
from kdforge.teacher.prompts import BUILTIN_SOURCES, Prompt, prompt_key, read_prompt_file
from kdforge.teacher.tokens import PromptCounts, TokenEstimator, count_prompt_tokens


@dataclass
class SampleRequest:
    """One sample to produce."""

    prompt: Prompt
    messages: list[dict]  # as sent, system prompt included
    body: dict  # the full request body (model, messages, every sampling parameter)
    id: str  # stable: sha256 of the body (no base URL, no key)
    key: str  # prompt key, for de-duplication against the file
    cache_key: str  # sha256 of base URL + body


def request_body(cfg: GenerateSection, messages: list[dict]) -> dict:
    body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if cfg.top_p is not None:
        body["top_p"] = cfg.top_p
    if cfg.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = cfg.top_logprobs
    return body


def build_jobs(cfg: GenerateSection, prompts: list[Prompt]) -> list[SampleRequest]:
    jobs = []
    for p in prompts:
        msgs = p.chat(cfg.system_prompt)
        body = request_body(cfg, msgs)
        sid = hashlib.sha256(canonical(body).encode()).hexdigest()[:20]
        jobs.append(SampleRequest(p, msgs, body, sid, prompt_key(p.messages), request_key(cfg.teacher, body)))
    return jobs


# ----------------------------------------------------------------------------- the teacher's context

CONTEXT_TIMEOUT_S = 5.0  # GET /models: a metadata call, never worth a long wait


def teacher_context(cfg: GenerateSection, api_key: str | None = None) -> int | None:
    """The context (prompt + completion tokens) the teacher advertises for `cfg.model` as
    `max_model_len` at GET {teacher}/models (vLLM and kdforge serve do; OpenAI does not). None when
    it says nothing, cannot be reached or refuses us: the requests themselves will tell then.
    The key is `api_key`, else the variable `cfg.api_key_env` names."""
    import httpx

    key = api_key or os.environ.get(cfg.api_key_env) or ""
    try:
        r = httpx.get(f"{cfg.teacher.rstrip('/')}/models", timeout=CONTEXT_TIMEOUT_S,
                      headers={"Authorization": f"Bearer {key}"} if key else {})
        models = r.json().get("data") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(models, list):
        return None
    rows = [m for m in models if isinstance(m, dict) and m.get("id") == cfg.model] or \
        [m for m in models if isinstance(m, dict)][:1] * (len(models) == 1)
    n = rows[0].get("max_model_len") if rows else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


@dataclass
class Offender:
    """A planned prompt too long for the context with max_tokens: its place in the plan, its
    tokens (exact: counted by the teacher, else estimated) and, where found, its file:line."""

    index: int
    tokens: int
    exact: bool
    where: str | None = None

    def name(self) -> str:
        return (f"{self.where or f'prompt #{self.index + 1} of the plan'} "
                f"({'' if self.exact else '~'}{self.tokens} tokens)")


SHOWN_OFFENDERS = 5  # named in a verdict; the rest are counted


@dataclass
class ContextFit:
    """How the planned requests fit the teacher's context. Prompt lengths are the teacher's exact
    counts where its /tokenize answered (`how` says), else estimates (~3 bytes a token)."""

    context: int
    max_tokens: int
    longest_prompt: int  # tokens of the longest prompt, chat template included
    over: int  # requests whose prompt + max_tokens exceed the context
    requests: int
    how: str = "estimated at ~3 bytes a token"
    exact: bool = False  # the longest prompt's length is the teacher's count
    offenders: list[Offender] = field(default_factory=list)
    source: str = "max_model_len at GET /models"

    @property
    def room(self) -> int:
        """The largest max_tokens that the longest prompt leaves room for."""
        return self.context - self.longest_prompt

    def _longest(self) -> str:
        return f"{'' if self.exact else '~'}{self.longest_prompt}"

    def named(self) -> str:
        """The prompts that do not fit, by file:line (or place in the plan), longest first."""
        worst = sorted(self.offenders, key=lambda o: (-o.tokens, o.index))[:SHOWN_OFFENDERS]
        more = len(self.offenders) - len(worst)
        return ", ".join(o.name() for o in worst) + (f" and {more} more" if more > 0 else "")

    def fix(self) -> str:
        if self.room < 1:
            return (f"the longest prompt alone ({self._longest()} tokens) fills the {self.context}-token context: "
                    "shorten or drop the prompts named, or use a teacher with a longer context")
        return (f"lower max_tokens to at most {self.room} (--max-tokens {self.room} or generate.max_tokens="
                f"{self.room}), or shorten or drop the prompts named")

    def problem(self) -> str | None:
        """What is wrong, in words (the prompts that do not fit named), or None when every request fits."""
        if not self.over:
            return None
        return (f"max_tokens {self.max_tokens} plus the prompt (up to {self._longest()} tokens) would exceed the "
                f"teacher's context: its context is {self.context} tokens ({self.source}), so "
                f"{self.over} of {self.requests} requests would be refused (400 context_length_exceeded): "
                f"{self.named()}; prompt tokens {self.how}")

    def line(self) -> str:
        """The dry run's `context:` line."""
        if self.over:
            return f"{self.problem()}: {self.fix()}"
        return (f"{self.context} tokens ({self.source}): every request fits (longest prompt "
                f"{self._longest()} + max_tokens {self.max_tokens}; prompt tokens {self.how})")


def teacher_counts(cfg: GenerateSection, jobs: list[SampleRequest], api_key: str | None = None) -> PromptCounts:
    """The planned prompts' tokens from the teacher's free /tokenize, as many as a few seconds allow
    (`tokens.count_prompt_tokens`). The key is `api_key`, else the variable `cfg.api_key_env` names."""
    key = api_key or os.environ.get(cfg.api_key_env) or None
    return count_prompt_tokens(cfg.teacher, cfg.model, [j.messages for j in jobs], key)


def context_fit(cfg: GenerateSection, jobs: list[SampleRequest], context: int, counts: PromptCounts | None = None,
                source: str = "max_model_len at GET /models") -> ContextFit:
    """Check every planned request against the teacher's context: exact lengths where `counts` has
    them (index i: jobs[i]), else estimates; each prompt that does not fit named by file:line."""
    est, counts = TokenEstimator(), counts or PromptCounts()
    lengths = [counts.length(i, j.messages, est) for i, j in enumerate(jobs)] or [(0, False)]
    offenders = [Offender(i, n, exact) for i, (n, exact) in enumerate(lengths[:len(jobs)])
                 if n + cfg.max_tokens > context]
    if offenders:
        where = prompt_lines(cfg)
        for o in offenders:
            o.where = where.get(jobs[o.index].key)
    longest = max(lengths, key=lambda pair: pair[0])
    return ContextFit(context, cfg.max_tokens, longest[0], len(offenders), len(jobs), counts.how(len(jobs)),
                      longest[1], offenders, source)


def plan_context_fit(cfg: GenerateSection, jobs: list[SampleRequest],
                     api_key: str | None = None) -> tuple[ContextFit | None, PromptCounts]:
    """`jobs` against the teacher's context (GET /models' max_model_len, else the one /tokenize reports),
    their prompts counted by the teacher where it can (`teacher_counts`). The fit is None when the
    teacher advertises no context: the requests themselves will tell then."""
    context, source = teacher_context(cfg, api_key), "max_model_len at GET /models"
    counts = teacher_counts(cfg, jobs, api_key)
    if context is None and counts.max_model_len:
        context, source = counts.max_model_len, "max_model_len at POST /tokenize"
    return (context_fit(cfg, jobs, context, counts, source) if context else None), counts


def prompt_lines(cfg: GenerateSection) -> dict[str, str]:
    """`file:line` of each prompt of `cfg.prompts` and the built-in files, by prompt key: the first
    occurrence, the one `plan_prompts` keeps. Each non-empty line of a prompts file is one prompt."""
    folder = resources.files("kdforge.teacher").joinpath("prompts")
    where: dict[str, str] = {}
    for path in [Path(f) for f in cfg.prompts] + [Path(str(folder.joinpath(f"{n}.jsonl"))) for n in BUILTIN_SOURCES]:
        lines = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        for line, p in zip(lines, read_prompt_file(path)):
            where.setdefault(prompt_key(p.messages), f"{path}:{line}")
    return where


def projection(jobs: list[SampleRequest], cfg: GenerateSection, prices: Prices | None, tokens: TokenEstimator,
               mean_completion: float | None) -> dict:
    """Worst-case and expected tokens and USD for these jobs (cost None without prices).

    Worst case: the prompt bound plus max_tokens for every request. Expected: ~3 bytes a prompt
    token, and completions as long as those already in the file, else half of max_tokens.
    """
    completion = mean_completion if mean_completion else cfg.max_tokens / 2
    worst_in = sum(tokens.prompt_bound(j.messages) for j in jobs)
    worst_out = cfg.max_tokens * len(jobs)
    exp_in = sum(tokens.prompt_estimate(j.messages) for j in jobs)
    exp_out = min(cfg.max_tokens, completion) * len(jobs)
    out = {"worst_tokens": (worst_in, worst_out), "expected_tokens": (exp_in, int(exp_out)),
           "expected_completion": min(cfg.max_tokens, completion), "from_file": bool(mean_completion)}
    if prices:  # whole nano-dollars, exactly as the ledger will count them
        out["worst_nano"] = prices.cost_nano(worst_in, worst_out)
        out["expected_nano"] = prices.cost_nano(exp_in, math.ceil(exp_out))
    return out


def dry_run_report(cfg: GenerateSection, jobs: list[SampleRequest], prices: Prices | None, out: Path, ckpt: Path,
                   cache_dir: Path) -> str:
    """What `--dry-run` prints: the plan, cache hits, worst-case and expected cost, the budget.
    Reads the output file, the ledger and the cache without changing them."""
    journal = Journal(out, readonly=True)
    ledger = BudgetLedger(ckpt / "budget.jsonl" if (ckpt / "budget.jsonl").exists() else None, prices,
                          cfg.budget_limit, readonly=True)
    need = max(0, cfg.total - journal.count)
    todo = [j for j in jobs if not journal.done(j.id, j.key)][:need]
    cached = 0
    db = cache_dir / "responses.sqlite"
    if db.exists() and todo:
        cache = ResponseCache(db)
        cached = sum(1 for j in todo if cache.get(j.cache_key) is not None)
        cache.close()
    mean = journal.completion_tokens / journal.count if journal.count else None
    p = projection(todo[cached:] if cached else todo, cfg, prices, TokenEstimator(), mean)
    sources = {}
    for j in todo:
        sources[j.prompt.source] = sources.get(j.prompt.source, 0) + 1
    (wi, wo), (ei, eo) = p["worst_tokens"], p["expected_tokens"]
    lines = [
        "dry run: nothing sent to the model.",
        f"  plan:       {need} more samples for {out} ({journal.count} already there, --total {cfg.total}); "
        f"{len(jobs)} unique prompts, seed {cfg.seed}",
        f"  sources:    " + (", ".join(f"{s} {n}" for s, n in sorted(sources.items())) or "-"),
        f"  requests:   {len(todo) - cached} to send ({cached} answered by the cache), model {cfg.model} at "
        f"{cfg.teacher}, max_tokens {cfg.max_tokens}, temperature {cfg.temperature}",
        f"  worst case: {wi:,} prompt + {wo:,} completion tokens"
        + (f" = ${p['worst_nano'] / NANO:.4f}" if prices else ""),
        f"  expected:   {ei:,} prompt + {eo:,} completion tokens"
        + (f" = ${p['expected_nano'] / NANO:.4f}" if prices else "")
        + f" (completions of ~{p['expected_completion']:.0f} tokens, "
        + ("the mean of the file's samples)" if p["from_file"] else "half of max_tokens)"),
    ]
    if prices:
        lines.append(f"  prices:     ${prices.input:g} / ${prices.output:g} per million input/output tokens "
                     f"({prices.source})")
    else:
        lines.append(f"  prices:     unknown for {cfg.model!r}: cost cannot be projected ({unknown_price_fix()})")
    if cfg.budget_limit is not None:
        left = ledger.limit_nano - ledger.spent_nano
        verdict = "the worst case fits" if p["worst_nano"] <= left else "the run may stop at the budget (exit 3)"
        lines.append(f"  budget:     ${ledger.spent:.4f} spent of ${cfg.budget_limit:.2f}, ${left / NANO:.4f} left: "
                     f"{verdict}")
    if todo:  # GET /models and POST /tokenize: free, and say nothing is generated
        fit = plan_context_fit(cfg, todo)[0]
        lines.append("  context:    " + ("not checked: the teacher advertises no max_model_len (GET /models, POST "
                                         "/tokenize)" if fit is None else f"{'warning: ' if fit.over else ''}{fit.line()}"))
    if len(todo) < need:
        lines.append(f"  warning:    only {len(todo)} unused prompts for {need} samples; add --prompts or lower --total")
    return "\n".join(lines)

"""From prompts to requests: the exact body sent for each sample, its stable id and cache key,
and the dry-run projection of what the plan may cost."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from kdforge.config import GenerateSection
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache, canonical, request_key
from kdforge.teacher.journal import Journal
from kdforge.teacher.pricing import NANO, Prices
from kdforge.teacher.prompts import Prompt, prompt_key
from kdforge.teacher.tokens import TokenEstimator


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
        "dry run: nothing sent.",
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
        lines.append(f"  prices:     unknown for {cfg.model!r}: cost cannot be projected "
                     "(pass --price-input/--price-output)")
    if cfg.budget_limit is not None:
        left = ledger.limit_nano - ledger.spent_nano
        verdict = "the worst case fits" if p["worst_nano"] <= left else "the run may stop at the budget (exit 3)"
        lines.append(f"  budget:     ${ledger.spent:.4f} spent of ${cfg.budget_limit:.2f}, ${left / NANO:.4f} left: "
                     f"{verdict}")
    if len(todo) < need:
        lines.append(f"  warning:    only {len(todo)} unused prompts for {need} samples; add --prompts or lower --total")
    return "\n".join(lines)

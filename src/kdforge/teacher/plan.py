"""From prompts to requests: the exact body sent for each sample, its stable id and cache key,
and the dry-run projection of what the plan may cost."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdforge.config import GenerateSection
from kdforge.teacher.cache import canonical, request_key
from kdforge.teacher.pricing import Prices
from kdforge.teacher.prompts import Prompt, prompt_key
from kdforge.teacher.tokens import TokenEstimator


@dataclass
class Job:
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


def build_jobs(cfg: GenerateSection, prompts: list[Prompt]) -> list[Job]:
    jobs = []
    for p in prompts:
        msgs = p.chat(cfg.system_prompt)
        body = request_body(cfg, msgs)
        sid = hashlib.sha256(canonical(body).encode()).hexdigest()[:20]
        jobs.append(Job(p, msgs, body, sid, prompt_key(p.messages), request_key(cfg.teacher, body)))
    return jobs


def projection(jobs: list[Job], cfg: GenerateSection, prices: Prices | None, tokens: TokenEstimator,
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
    if prices:
        out["worst_usd"] = prices.cost(worst_in, worst_out)
        out["expected_usd"] = prices.cost(exp_in, exp_out)
    return out

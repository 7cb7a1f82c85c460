"""The parts that pay the teacher: `api`, `generation`, `budget`.

Each runs the real `kdforge generate` code (`run_generate`, in-process) on the user's generate
section (teacher, model, key variable, prices, rate limits, sampling: exactly what `kdforge
generate --config` reads), with only the paths moved into the scratch dir, the sample count set
and the budget cut to what the preflight has left. Every run gets its own checkpoint dir, so its
ledger persists spend like a real run's and `Purse` can add them up.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdforge.config import GenerateSection
from kdforge.errors import BudgetExceededError, KdforgeError, TeacherRefusedError
from kdforge.preflight.report import Item, failed, passed, warned
from kdforge.teacher.plan import build_jobs
from kdforge.teacher.pricing import Prices, resolve_prices
from kdforge.teacher.prompts import plan_prompts
from kdforge.teacher.tokens import TokenEstimator

PROBE_PROMPT = "Reply with the single word: ready"
PROBE_MAX_TOKENS = 8  # the probe proves the endpoint answers; its text is not a sample
PROBE_RETRIES = 2  # a down teacher is named in seconds, not after generate's minutes of backoff
TIER_RE = re.compile(r"teacher rate limits detected \(x-ratelimit-\* headers\): (.*?); pacing")


@dataclass
class Purse:
    """The preflight's budget across every generate run it makes (each with its own ledger)."""

    limit: float
    prices: Prices | None
    runs: list[Path] = field(default_factory=list)  # checkpoint dirs, one per run

    @property
    def spent(self) -> float:
        total = 0.0
        for ckpt in self.runs:
            state = ckpt / "state.json"
            if state.is_file():
                total += json.loads(state.read_text()).get("spent_usd") or 0.0
        return total

    @property
    def left(self) -> float:
        return max(0.0, self.limit - self.spent)


@dataclass
class GenRun:
    """What one in-process `kdforge generate` did."""

    out: Path
    ckpt: Path
    error: KdforgeError | None
    stats: object | None  # teacher.progress.Stats when it finished
    log: str
    state: dict

    @property
    def requests(self) -> int:
        return self.state.get("requests_this_run", 0)

    @property
    def samples(self) -> int:
        return self.state.get("samples", 0)


def scratch_section(cfg: GenerateSection, where: Path, total: int, budget: float, **over) -> GenerateSection:
    """The user's generate section with paths in `where`, `total` samples and `budget` USD."""
    return cfg.model_copy(update={"out": str(where / "kd.jsonl"), "checkpoint_dir": str(where / "checkpoints"),
                                  "cache_dir": str(where / "cache"), "total": total, "budget_limit": budget, **over})


def generate(cfg: GenerateSection, purse: Purse, api_key: str | None) -> GenRun:
    """Run the real generate on `cfg` (a scratch section); never raises a KdforgeError."""
    from kdforge.teacher.generate import run_generate

    ckpt = Path(cfg.checkpoint_dir)
    if ckpt not in purse.runs:
        purse.runs.append(ckpt)
    buf = io.StringIO()
    err, stats = None, None
    try:
        stats = run_generate(cfg, api_key, out_stream=buf, err_stream=buf)
    except KdforgeError as e:
        err = e
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "generate.log").write_text(buf.getvalue())
    return GenRun(Path(cfg.out), ckpt, err, stats, buf.getvalue(), state)


def worst_case_usd(cfg: GenerateSection, prices: Prices | None, n: int = 20) -> tuple[float, int]:
    """(USD, tokens) that the dearest of the first `n` planned requests may cost: the reservation
    generate makes before sending it (prompt bound + max_tokens)."""
    jobs = build_jobs(cfg, plan_prompts(cfg.prompts, cfg.mix, cfg.seed, warn=lambda m: None))[:n]
    est = TokenEstimator()
    bound = max((est.prompt_bound(j.messages) for j in jobs), default=0)
    nano = prices.cost_nano(bound, cfg.max_tokens) if prices else 0
    return nano / 1e9, bound + cfg.max_tokens


def refused_item(key: str, e: TeacherRefusedError) -> Item:
    it = failed(key, f"the teacher refused us: {e}",
                "fix what the message names (the key in the api_key_env variable, --model, --teacher), "
                "then re-run kdforge preflight; nothing was retried or written")
    it.refused = True
    return it


# ----------------------------------------------------------------------------- api

def check_api(cfg: GenerateSection, work: Path, purse: Purse, api_key: str | None) -> Item:
    """One tiny request through generate's own client, limiter and ledger: the endpoint answers,
    the key is accepted, the model exists; the rate-limit tier comes from its headers."""
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "probe.txt"
    prompts.write_text(PROBE_PROMPT + "\n")
    probe = scratch_section(cfg, work, 1, purse.left, prompts=[str(prompts)], mix={},
                            max_tokens=min(cfg.max_tokens, PROBE_MAX_TOKENS), top_logprobs=0,
                            max_retries=min(cfg.max_retries, PROBE_RETRIES))
    run = generate(probe, purse, api_key)
    e = run.error
    if isinstance(e, TeacherRefusedError):
        return refused_item("api", e)
    if isinstance(e, BudgetExceededError):
        return failed("api", f"could not send even the probe: its worst case passes the ${purse.left:.6f} of budget "
                      "left", "raise --budget-limit", requests=run.requests)
    if e is not None or run.samples < 1:
        return failed("api", f"the teacher at {cfg.teacher} did not answer: {e or run.log.strip()[-300:]}",
                      "check that --teacher is the server's OpenAI base URL (ending in /v1), that it is up and "
                      "reachable from here, then re-run", requests=run.requests)
    row = json.loads(Path(run.out).read_text().splitlines()[0])
    tier = TIER_RE.search(run.log)
    retried = dict(run.stats.retries) if run.stats else {}
    tier_text = (f"rate-limit tier from x-ratelimit-* headers: {tier.group(1)}" if tier else
                 "no x-ratelimit-* headers (a local server, or limits unpublished): pacing by generate.rpm/tpm "
                 f"({cfg.rpm or '-'} req/min, {cfg.tpm or '-'} tok/min) and concurrency {cfg.concurrency}")
    return passed("api", f"{cfg.teacher} answered model {row['metadata']['model']!r} with the key from "
                  f"{cfg.api_key_env} ({'set' if api_key else 'unset: the server needs none'}) in {run.requests} "
                  f"request(s){_retries_text(retried)}; {tier_text}",
                  requests=run.requests, tier=tier.group(1) if tier else None, retries=retried)


def _retries_text(retries: dict) -> str:
    if not retries:
        return ""
    parts = ", ".join(f"{n} x {k}" for k, n in sorted(retries.items()))
    return f" (retried with backoff: {parts})"


# ----------------------------------------------------------------------------- generation

@dataclass
class Samples:
    """The generation part's output for the later parts."""

    path: Path | None
    count: int


def check_generation(cfg: GenerateSection, work: Path, purse: Purse, api_key: str | None,
                     samples: int) -> tuple[Item, Samples]:
    """N samples with the budget; format; a re-run sends 0 requests; the cache answers a new file."""
    prices = purse.prices
    worst, worst_tokens = worst_case_usd(cfg, prices)
    if prices is not None and worst > purse.left:
        return failed("generation", f"cannot run: one request may cost up to ${worst:.6f} ({worst_tokens} tokens "
                      f"worst case: prompt bound + max_tokens {cfg.max_tokens}) and ${purse.left:.6f} of the "
                      f"${purse.limit:.2f} budget is left",
                      f"raise --budget-limit to at least ${worst * samples:.4f} ({samples} samples at worst case) or "
                      "lower generate.max_tokens", worst_usd=worst), Samples(None, 0)
    first = generate(scratch_section(cfg, work, samples, purse.left), purse, api_key)
    if isinstance(first.error, TeacherRefusedError):
        return refused_item("generation", first.error), Samples(None, 0)
    n = _count_lines(first.out)
    if first.error is not None:
        fix = ("raise --budget-limit" if isinstance(first.error, BudgetExceededError) else
               f"see {first.ckpt / 'failures.jsonl'} and {first.ckpt / 'generate.log'}")
        return failed("generation", f"{n} of {samples} samples, then: {first.error}", fix,
                      samples=n), Samples(first.out if n else None, n)
    problems = _format_problems(first.out)
    st = first.stats
    money = f"${st.cost:.4f}" if prices else "cost unknown"
    evidence = (f"{n}/{samples} samples in {st.elapsed:.1f}s, {st.requests} requests, "
                f"{st.prompt_tokens:,} prompt + {st.completion_tokens:,} completion tokens, {money}"
                f"{_retries_text(dict(st.retries))}")
    # Re-running the same command: the file is complete, so nothing may be sent or written.
    again = generate(scratch_section(cfg, work, samples, purse.left), purse, api_key)
    # A new file from the same cache: every answer must come from the cache, for $0.
    cached = generate(scratch_section(cfg, work / "from_cache", n, purse.left,
                                      cache_dir=str(work / "cache")), purse, api_key)
    n_again, hits = _count_lines(first.out), (cached.stats.cached if cached.stats else 0)
    evidence += (f"; re-run: {again.requests} requests, {n_again} lines (no duplicates); "
                 f"from the cache: {hits}/{n} answers, {cached.requests} requests")
    nums = dict(samples=n, requests=st.requests, prompt_tokens=st.prompt_tokens,
                completion_tokens=st.completion_tokens, cost_usd=st.cost if prices else None,
                retries=dict(st.retries), rerun_requests=again.requests, cache_hits=hits)
    if problems:
        return failed("generation", evidence + "; format: " + "; ".join(problems[:3]),
                      "the teacher's answers do not make valid samples: check generate.model and max_tokens",
                      **nums), Samples(first.out, n)
    if again.requests or n_again != n or hits != n or cached.requests:
        return failed("generation", evidence, "re-running or reusing the cache paid the teacher again: report this "
                      "as a kdforge bug with the scratch dir", **nums), Samples(first.out, n)
    room, fix = thinking_room(first.out, cfg.max_tokens)
    if fix:
        return warned("generation", evidence + "; " + room, fix, **nums), Samples(first.out, n)
    evidence += f"; {room}" if room else ""
    return passed("generation", evidence + "; every line has prompt, teacher_text, metadata", **nums), \
        Samples(first.out, n)


ROOM_SHARE = 0.8  # a thinking teacher's longest completion above this share of max_tokens leaves too little room


def thinking_room(path: Path, max_tokens: int) -> tuple[str, str | None]:
    """A thinking teacher (samples with `teacher_reasoning`) and whether max_tokens leaves room for
    thinking + answer: (evidence, fix or None). ("", None) for a teacher that does not think."""
    from kdforge.teacher.generate import fit_max_tokens

    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    thinking = [r for r in rows if r.get("teacher_reasoning")]
    if not thinking:
        return "", None
    toks = [r.get("metadata", {}).get("tokens", {}) for r in thinking]
    used = [t.get("completion") for t in toks if type(t.get("completion")) is int]
    thought = [t.get("reasoning") for t in toks if type(t.get("reasoning")) is int]
    cut = sum(r.get("metadata", {}).get("finish_reason") == "length" for r in thinking)
    longest = max(used, default=0)
    text = (f"a thinking teacher ({len(thinking)}/{len(rows)} samples carry teacher_reasoning"
            + (f", thinking up to {max(thought)} tokens" if thought else "")
            + f"; thinking + answer up to {longest} of max_tokens {max_tokens}; {cut} cut by max_tokens)")
    if cut or longest > ROOM_SHARE * max_tokens:
        return text, (f"max_tokens {max_tokens} leaves too little room for thinking + answer (its thinking is billed "
                      f"inside it, and a longer one leaves an empty answer): set --max-tokens "
                      f"{fit_max_tokens(max(longest, max_tokens))} (generate.max_tokens)")
    return text, None


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


def _format_problems(path: Path) -> list[str]:
    """Lines that lack the seed's fields (prompt, teacher_text, metadata with tokens)."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(f"{path}:{i}: invalid JSON ({e.msg})")
            continue
        missing = [k for k in ("prompt", "teacher_text", "metadata") if not rec.get(k)]
        if not missing and not isinstance(rec["metadata"].get("tokens"), dict):
            missing = ["metadata.tokens"]
        if missing:
            out.append(f"{path}:{i}: missing {', '.join(missing)}")
    return out


# ----------------------------------------------------------------------------- budget

def check_budget(cfg: GenerateSection, work: Path, purse: Purse, api_key: str | None) -> Item:
    """The seed's budget test: a limit below what the run needs stops it with exit 3, nothing sent
    past the limit, spend persisted; the same command again sends nothing."""
    prices = purse.prices
    if prices is None:
        return failed("budget", f"no prices for model {cfg.model!r}: a budget cannot be enforced",
                      "set generate.price_input and generate.price_output (USD per million tokens)")
    worst, _ = worst_case_usd(cfg, prices)
    if worst == 0:
        return warned("budget", f"the teacher is free at the configured prices (${prices.input:g} / "
                      f"${prices.output:g} per million tokens): there is nothing a budget could stop",
                      "set the provider's real prices in generate.price_input/price_output to check the stop")
    # Room for one request but not two (or less than one if that is all that is left).
    limit = min(purse.left, 1.5 * worst)
    run = generate(scratch_section(cfg, work, 1000, limit), purse, api_key)
    if isinstance(run.error, TeacherRefusedError):
        return refused_item("budget", run.error)
    spent = run.state.get("spent_usd")
    if run.error is not None and not isinstance(run.error, BudgetExceededError):
        # It stopped before the budget could: what the teacher answered is the cause, not the budget.
        return failed("budget", f"the run stopped before reaching the limit, so the stop was not tested: {run.error}",
                      "fix what the message names (often max_tokens: prompt + max_tokens must fit the teacher's "
                      f"context; --max-tokens N), see {run.ckpt / 'failures.jsonl'}, then re-run",
                      limit_usd=limit, worst_request_usd=worst, spent_usd=spent, requests=run.requests)
    again = generate(scratch_section(cfg, work, 1000, limit), purse, api_key)
    spent_again = again.state.get("spent_usd")
    nums = dict(limit_usd=limit, worst_request_usd=worst, spent_usd=spent, samples=run.samples,
                requests=run.requests, rerun_requests=again.requests)
    evidence = (f"limit ${limit:.6f} (one request's worst case ${worst:.6f}): stopped with exit "
                f"{getattr(run.error, 'exit_code', 0)} after {run.requests} request(s), {run.samples} sample(s), "
                f"spent ${spent or 0:.6f}; state.json says {run.state.get('status')!r}; the same command again: "
                f"exit {getattr(again.error, 'exit_code', 0)}, {again.requests} request(s), "
                f"spent ${spent_again or 0:.6f}")
    ok = (isinstance(run.error, BudgetExceededError) and isinstance(again.error, BudgetExceededError)
          and spent is not None and spent <= limit and spent_again == spent and again.requests == 0
          and run.state.get("status") == "budget_exhausted" and (run.ckpt / "budget.jsonl").is_file())
    if not ok:
        return failed("budget", evidence, "the budget did not stop the run as it must: report this as a kdforge "
                      f"bug with {run.ckpt}", **nums)
    return passed("budget", evidence, **nums)


def section_prices(cfg: GenerateSection) -> Prices | None:
    return resolve_prices(cfg.model, cfg.price_input, cfg.price_output)

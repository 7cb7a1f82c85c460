"""Prompt lengths counted by the teacher (vLLM's free POST /tokenize, which `kdforge serve` has too)
instead of estimated at ~3 bytes a token, in preflight's context check and `generate --dry-run`.

The shipped teacher (`kdforge serve`, 64-token context) has a tokenizer of few merges: a line of
accented letters costs ~1 token a byte, 3x the estimate. The estimate let such prompts through and
the server then refused their requests; counted exactly, each is named by file:line. A teacher
without /tokenize (OpenAI; here a real proxy in front of `kdforge serve` that answers 404 there)
keeps the estimate, and the verdict says so."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import cli_env, run_cli
from test_preflight_context import config as user_config
from test_preflight_context import preflight

from kdforge.config import GenerateSection
from kdforge.demo import TEACHER_DIR
from kdforge.preflight.report import render_text
from kdforge.teacher.plan import build_jobs, context_fit, plan_context_fit
from kdforge.teacher.prompts import plan_prompts
from kdforge.teacher.tokens import TokenEstimator, count_prompt_tokens

# 80 bytes: ~33 tokens by the estimate (+16 fits 64), 82 by the teacher's count (does not)
LONG = "Sortiere bitte diese Buchstaben: ü ö ä é ß ç ñ å ø æ œ ğ ş ı ł ž"


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """kdforge serve on the shipped teacher: a 64-token context, POST /tokenize at its root."""
    from kdforge.serve import launch

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with launch(TEACHER_DIR, env=cli_env(), log_path=log) as server:
        yield server


class NoTokenize:
    """A real HTTP proxy on 127.0.0.1 in front of a teacher that answers 404 at every /tokenize, as an
    API teacher (OpenAI) or a gateway without the route does (or `status` and `body`: a broken one);
    everything else is forwarded."""

    def __init__(self, upstream: str, status: int = 404, body: bytes = b'{"detail": "Not Found"}'):
        root = upstream[:-3]
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self, method: str) -> None:
                if self.path.rstrip("/").endswith("/tokenize"):
                    proxy.refused += 1
                    return self._send(status, body)
                sent = self.rfile.read(int(self.headers.get("content-length") or 0))
                r = httpx.request(method, root + self.path, content=sent or None,
                                  headers={"content-type": "application/json"}, timeout=60)
                self._send(r.status_code, r.content)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self.refused = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> "NoTokenize":
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def prompts_file(tmp_path, n: int = 12, long_at: int | None = None):
    """The shipped teacher's own task (non-ASCII letters in half the prompts), LONG as line `long_at`."""
    from kdforge.demo.task import make_prompts

    rows = [r["prompt"] for r in make_prompts(n, 0, "train")]
    rows = [p.replace("a", "é") if i % 2 else p for i, p in enumerate(rows)]
    if long_at is not None:
        rows.insert(long_at - 1, LONG)
    path = tmp_path / "prompts_ü.txt"
    path.write_text("".join(p + "\n" for p in rows), encoding="utf-8")
    return path


def section(teacher: str, model: str, prompts, **more) -> GenerateSection:
    return GenerateSection(teacher=teacher, model=model, prompts=[str(prompts)], max_tokens=16, **more)


def config(tmp_path, teacher: str, model: str, prompts, **generate):
    """test_preflight_context's user config, free, greedy, max_tokens 16 (the sort task's answers fit)."""
    return user_config(tmp_path, teacher, model, prompts, **{"price_input": 0.0, "price_output": 0.0,
                                                             "max_tokens": 16, "temperature": 0, **generate})


def test_the_count_is_what_the_teacher_bills_and_the_estimate_is_not(small_teacher):
    """/tokenize counts a chat body as the chat route renders it: the prompt_tokens a chat
    completion reports. The estimate is a third of it for LONG."""
    prompts = [[{"role": "user", "content": LONG}],
               [{"role": "system", "content": "Réponds en une ligne."}, {"role": "user", "content": "Sort: q é m"}]]
    counts = count_prompt_tokens(small_teacher.base_url, small_teacher.model, prompts)
    assert counts.url and counts.url.endswith("/tokenize") and "/v1/" not in counts.url
    assert counts.max_model_len == 64
    chat = [httpx.post(small_teacher.base_url + "/chat/completions", timeout=60,
                       json={"model": small_teacher.model, "messages": messages, "max_tokens": 1})
            for messages in prompts]
    # the server refuses LONG, naming the length it counted; it answers the other, billing as counted
    assert chat[0].status_code == 400 and f"the prompt has {counts.exact[0]} " in chat[0].text, chat[0].text
    assert counts.exact[1] == chat[1].json()["usage"]["prompt_tokens"], chat[1].text
    assert counts.exact[0] + 16 > 64 >= TokenEstimator().prompt_estimate(prompts[0]) + 16
    assert "counted exactly" in counts.how(2)
    # out of time after the first: the rest keep the estimate, and the words say so
    few = count_prompt_tokens(small_teacher.base_url, small_teacher.model, prompts * 50, budget_s=0.0)
    assert list(few.exact) == [0]
    assert "for 1 of 100 prompts" in few.how(100) and "the rest estimated" in few.how(100)


def test_a_prompt_the_estimate_lets_through_is_named_by_file_and_line(tmp_path, small_teacher):
    path = prompts_file(tmp_path, long_at=5)
    cfg = section(small_teacher.base_url, small_teacher.model, path)
    jobs = build_jobs(cfg, plan_prompts(cfg.prompts, cfg.mix, cfg.seed))
    assert not context_fit(cfg, jobs, 64).over  # the estimate alone: everything "fits"
    fit, _ = plan_context_fit(cfg, jobs)
    assert fit.over == 1 and fit.exact and fit.longest_prompt == 82, fit.problem()
    assert f"{path}:5 (82 tokens)" in fit.problem() and "counted exactly" in fit.problem()
    assert "--max-tokens" not in fit.fix() and "fills the 64-token context" in fit.fix()  # no room: shorten it
    # preflight: named before anything is sent (the teacher would refuse that request)
    report = preflight(config(tmp_path, small_teacher.base_url, small_teacher.model, path), tmp_path, "budget")
    item, text = report.items["budget"], render_text(report)
    assert item.status == "fail" and report.spent_usd == 0, text
    assert f"{path}:5 (82 tokens)" in item.evidence and "context is 64 tokens" in item.evidence, text


def test_dry_run_counts_at_the_teacher_and_says_when_it_cannot(tmp_path, small_teacher):
    path = prompts_file(tmp_path, long_at=3)
    args = ["generate", "--model", small_teacher.model, "--prompts", path, "--total", "13",
            "--out", tmp_path / "kd.jsonl", "--price-input", "0", "--price-output", "0", "--max-tokens", "16",
            "--dry-run"]
    p = run_cli(*args, "--teacher", small_teacher.base_url, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ctx = next(line for line in p.stdout.splitlines() if "context:" in line)
    assert "warning" in ctx and "1 of 13 requests" in ctx and f"{path}:3 (82 tokens)" in ctx, ctx
    assert "counted exactly" in ctx, ctx
    with NoTokenize(small_teacher.base_url) as proxy:
        p = run_cli(*args, "--teacher", proxy.url, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ctx = next(line for line in p.stdout.splitlines() if "context:" in line)
    assert "64 tokens" in ctx and "fits" in ctx, ctx  # GET /models still advertises the context
    assert "estimated at ~3 bytes a token" in ctx and "no /tokenize" in ctx and "404" in ctx, ctx
    assert proxy.refused >= 1


def _plan_index(cfg: GenerateSection) -> int:
    return next(i for i, p in enumerate(plan_prompts(cfg.prompts, cfg.mix, cfg.seed)) if p.text == LONG)


def test_a_long_prompt_past_the_preflight_sample_warns_about_the_real_run(tmp_path, small_teacher):
    """The preflight's own requests fit, so generation runs; the real run's plan (every prompt here,
    generate.total unset) holds one that does not: the generation item warns and names it."""
    path = prompts_file(tmp_path, n=40, long_at=41)
    cfg = section(small_teacher.base_url, small_teacher.model, path)
    seed = next(s for s in range(100) if _plan_index(cfg.model_copy(update={"seed": s})) >= 20)
    report = preflight(config(tmp_path, small_teacher.base_url, small_teacher.model, path, seed=seed),
                       tmp_path, "generation")
    item, text = report.items["generation"], render_text(report)
    assert item.status == "warn", text
    assert "the real run" in item.evidence and f"{path}:41 (82 tokens)" in item.evidence, text
    assert "1 of 41 requests" in item.evidence and item.numbers["prompts_over_context"] == 1, text
    assert item.numbers["samples"] == 4 and report.exit_code == 0, text


def test_a_teacher_without_tokenize_is_checked_by_the_estimate_and_says_so(tmp_path, small_teacher):
    path = prompts_file(tmp_path)
    with NoTokenize(small_teacher.base_url) as proxy:
        report = preflight(config(tmp_path, proxy.url, small_teacher.model, path), tmp_path, "generation")
    item, text = report.items["generation"], render_text(report)
    assert item.status == "pass", text
    assert "context: 64 tokens" in item.evidence and "estimated at ~3 bytes a token" in item.evidence, text
    assert item.numbers["prompt_tokens_exact"] is False, text


@pytest.mark.parametrize("status, body, said", [
    (200, '{"count": "beaucoup", "tokens": "ça"}'.encode(), "answered 200 without a token count"),
    (200, b"<html>\xc3\xa9</html>", "answered 200 without a token count"),
    (500, b'{"error": "boom"}', "answered 500 to a chat body"),
    (405, b"", "no /tokenize"),
])
def test_a_broken_tokenize_falls_back_to_the_estimate_naming_why(small_teacher, status, body, said):
    prompts = [[{"role": "user", "content": LONG}]] * 3
    with NoTokenize(small_teacher.base_url, status, body) as proxy:
        counts = count_prompt_tokens(proxy.url, small_teacher.model, prompts)
    assert counts.exact == {} and counts.url is None
    assert said in counts.how(3) and "estimated at ~3 bytes a token" in counts.how(3), counts.how(3)
    assert proxy.refused == (1 if status != 405 else 2)  # the root, then beside /v1 where it is absent

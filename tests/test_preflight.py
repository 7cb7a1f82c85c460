"""`kdforge preflight` on real teachers over HTTP on 127.0.0.1: the fault-injecting teacher (with
prices, 429s, a wrong key, an unknown model), `kdforge serve` on the shipped teacher and
`transformers serve` on a tiny local model. Real tokenizer, real tiny students, real SIGKILL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, run_cli
from fault_server import FaultConfig, FaultServer

from kdforge.preflight import CHECKLIST, SETUP_ITEMS, PreflightOptions, run_preflight
from kdforge.preflight.report import render_text

KEY = "sk-preflight-test"
PRICES = {"price_input": 1.0, "price_output": 2.0}  # USD per million tokens
# a copy of ../shared/seeds/000_091b5a4f71550d72.txt ships with the tests: a clean clone has no ../shared
SEED = REPO / "tests" / "data" / "seed_000_091b5a4f71550d72.txt"


def user_config(tmp_path: Path, tokenizer: Path | str, teacher: str | None, model: str = "fault-teacher",
                **generate) -> Path:
    """A user's config whose own outputs, data and cache live under tmp_path/user (must stay absent)."""
    user = tmp_path / "user"
    cfg = {
        "model": {"preset": "toy"},
        "io": {"tokenizer_path": str(tokenizer), "train_shards": [str(user / "data/kd_mix.jsonl")],
               "output_dir": str(user / "runs")},
        "loss": {"kind": "ce"},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [64], "max_steps": 100, "lr": 3e-3,
                  "warmup_steps": 10, "save_steps": 50},
        "generate": {"teacher": teacher, "model": model, "out": str(user / "data/kd_mix.jsonl"),
                     "checkpoint_dir": str(user / "data/checkpoints"), "cache_dir": str(user / "data/cache"),
                     "max_tokens": 24, "concurrency": 4, "budget_limit": 50.0, **PRICES, **generate},
    }
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def preflight(cfg: Path, tmp_path: Path, only: str = "pipeline", **kw):
    return run_preflight(PreflightOptions([str(cfg)], only=only, workdir=str(tmp_path / "scratch"),
                                          log=lambda m: None, **kw))


def statuses(report) -> dict[str, str]:
    return {i.key: i.status for i in report.ordered()}


def seed_checklist() -> list[str]:
    """The seed's Summary Checklist items, as written there (marks stripped)."""
    text = SEED.read_text(encoding="utf-8").split("## Summary Checklist", 1)[1].split("**Estimated", 1)[0]
    marks = re.compile(r"^- \[ \] (✅|⚠️)\s*")
    return [marks.sub("", line).strip() for line in text.splitlines() if line.startswith("- [ ]")]


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ----------------------------------------------------------------------------- the report

def test_report_lists_the_seeds_checklist_in_its_order():
    seed = seed_checklist()
    assert len(seed) == 8
    # SPEC's table: `make smoke_training` is `kdforge smoke`; every other word is the seed's.
    assert [t for _, t in CHECKLIST] == [s.replace("make smoke_training", "kdforge smoke") for s in seed]


def test_pipeline_on_a_priced_teacher_with_429s_passes_under_a_dollar(tmp_path, tokenizer_dir, keyed):
    """30% injected 429s: every item still passes, the backoff shows, spend < $1 and == the bill."""
    with FaultServer(FaultConfig(api_key=KEY, p429=0.3, rpm=6000, tpm=2_000_000)) as srv:
        cfg = user_config(tmp_path, tokenizer_dir, srv.url)
        report = preflight(cfg, tmp_path)
        billed = srv.billed_usd(PRICES["price_input"], PRICES["price_output"])
        injected = srv.count(kind="inj429")
    text = render_text(report)
    assert report.exit_code == 0, text
    assert set(statuses(report).values()) == {"pass"}, text
    assert 0 < report.spent_usd < 1.0 and report.spent_usd >= billed - 1e-9, (report.spent_usd, billed)
    gen = report.items["generation"]
    assert injected > 0 and gen.numbers["retries"].get("429", 0) > 0 and "retried with backoff" in gen.evidence
    assert "6000 requests/min" in report.items["api"].evidence  # the tier, from x-ratelimit-* headers
    assert report.items["generation"].numbers["rerun_requests"] == 0
    assert report.items["resume"].numbers["final_step"] == 5
    assert not (tmp_path / "user").exists(), "preflight wrote into the user's outputs"
    # preflight_report.md and .json: every item, setup first, then the seed's checklist in order
    md = (tmp_path / "scratch" / "preflight_report.md").read_text()
    titles = [t for _, t in SETUP_ITEMS + CHECKLIST]
    assert [md.index(t) for t in titles] == sorted(md.index(t) for t in titles)
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    js = json.loads((tmp_path / "scratch" / "preflight_report.json").read_text())
    assert [i["title"] for i in js["items"]] == titles and js["exit_code"] == 0


def test_a_bad_key_fails_api_exits_4_and_nothing_else_spends(tmp_path, tokenizer_dir):
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        cfg = user_config(tmp_path, tokenizer_dir, srv.url)
        p = run_cli("preflight", "--config", cfg, "--workdir", tmp_path / "scratch", "--json",
                    env=cli_env(OPENAI_API_KEY="sk-wrong-key"), timeout=300)
        received = srv.received
    assert p.returncode == 4, p.stdout + p.stderr
    rep = json.loads(p.stdout)
    items = {i["key"]: i for i in rep["items"]}
    assert items["api"]["status"] == "fail" and "401" in items["api"]["evidence"]
    assert "sk-wrong-key" not in p.stdout + p.stderr  # the key is masked everywhere
    assert received == 1, "only the probe may reach the teacher"
    assert rep["spent_usd"] == 0
    for key in ("generation", "budget", "training", "resume"):
        assert items[key]["status"] == "skip" and "refused" in items[key]["evidence"]


def test_an_unknown_model_exits_4_naming_it(tmp_path, tokenizer_dir, keyed):
    with FaultServer(FaultConfig(api_key=KEY, models=("fault-teacher",))) as srv:
        cfg = user_config(tmp_path, tokenizer_dir, srv.url)
        report = preflight(cfg, tmp_path, only="api", model="no-such-model-7b")
    assert report.exit_code == 4
    assert report.items["api"].status == "fail" and "no-such-model-7b" in report.items["api"].evidence


def test_a_missing_tokenizer_fails_config_naming_the_field(tmp_path):
    cfg = user_config(tmp_path, tmp_path / "nowhere" / "tokenizer", None)
    p = run_cli("preflight", "--config", cfg, "--only", "config", "--workdir", tmp_path / "scratch", timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    line = next(ln for ln in p.stdout.splitlines() if "[FAIL]" in ln)
    assert "Config" in line
    assert "io.tokenizer_path" in p.stdout and "nowhere" in p.stdout
    assert (tmp_path / "scratch" / "preflight_report.md").is_file()


def test_a_budget_below_one_request_stops_and_generation_cannot_run(tmp_path, tokenizer_dir, keyed):
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        cfg = user_config(tmp_path, tokenizer_dir, srv.url, max_tokens=64)
        report = preflight(cfg, tmp_path, budget_limit=0.0002)
        billed = srv.billed_usd(PRICES["price_input"], PRICES["price_output"])
    st = statuses(report)
    text = render_text(report)
    assert st["budget"] == "pass", text  # it is meant to stop
    assert report.items["budget"].numbers["requests"] == 0
    assert st["generation"] == "fail" and "cannot run" in report.items["generation"].evidence, text
    assert "--budget-limit" in report.items["generation"].fix
    assert report.exit_code == 2
    assert report.spent_usd <= 0.0002 and billed <= 0.0002


def test_a_model_that_does_not_fit_warns_and_trains_shrunk(tmp_path, tokenizer_dir, keyed):
    """The seed's 9B worker config on this machine: memory warns with numbers, training runs the
    same architecture shrunk (said so), checkpoint, SIGKILL, resume."""
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        user_config(tmp_path, tokenizer_dir, srv.url)
        mine = yaml.safe_load((tmp_path / "my.yaml").read_text())
        over = tmp_path / "here.yaml"
        over.write_text(yaml.safe_dump({"io": mine["io"], "generate": mine["generate"],
                                        "train": {"micro_batch_size": 64}}))
        report = run_preflight(PreflightOptions([str(REPO / "configs/worker_9b.yaml"), str(over)], only="training",
                                                workdir=str(tmp_path / "scratch"), samples=8, log=lambda m: None))
    text = render_text(report)
    mem, tr = report.items["memory"], report.items["training"]
    assert mem.status == "warn" and "does not fit" in mem.evidence and "GB" in mem.evidence, text
    assert mem.numbers["estimate_bytes"] > mem.numbers["free_bytes"]
    assert tr.status in ("pass", "warn") and "cannot fit this machine" in tr.evidence and "shrunk" in tr.evidence, text
    assert tr.numbers["shrunk"] and report.items["resume"].status == "pass", text
    assert statuses(report)["api"] == "skip" and report.exit_code == 0


def test_pipeline_against_kdforge_serve_on_the_shipped_teacher(tmp_path, keyed):
    from kdforge.demo import TEACHER_DIR
    from kdforge.serve import launch

    from kdforge.demo.task import make_prompts

    prompts = tmp_path / "sort_prompts.txt"  # the shipped teacher's task (its context is 64 tokens)
    prompts.write_text("".join(r["prompt"] + "\n" for r in make_prompts(40, 0, "train")))
    with launch(TEACHER_DIR, env=cli_env(), log_path=tmp_path / "serve.log") as server:
        cfg = user_config(tmp_path, TEACHER_DIR, server.base_url, model=server.model, max_tokens=16,
                          concurrency=2, prompts=[str(prompts)])
        report = preflight(cfg, tmp_path, samples=8)
    text = render_text(report)
    assert report.exit_code == 0, text
    assert "fail" not in statuses(report).values() and "skip" not in statuses(report).values(), text
    assert report.spent_usd < 1.0


@pytest.mark.slow
def test_pipeline_against_transformers_serve(tmp_path, tokenizer_dir, tiny_model_dir, transformers_serve,
                                             monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    cfg = user_config(tmp_path, tokenizer_dir, transformers_serve, model=str(tiny_model_dir), max_tokens=8,
                      concurrency=2, temperature=0.0)
    report = preflight(cfg, tmp_path, samples=8)
    text = render_text(report)
    assert report.exit_code == 0, text
    assert "fail" not in statuses(report).values() and "skip" not in statuses(report).values(), text


from test_generate_serve import transformers_serve  # noqa: E402,F401  (the fixture, shared)


def test_the_seeds_scripts_wrap_preflight(tmp_path, tokenizer_dir):
    """scripts/test_budget_enforcement.sh is `kdforge preflight --only budget "$@"`; the others parse."""
    for name in ("dataset_generation", "training_execution", "budget_enforcement", "full_pipeline"):
        script = REPO / "scripts" / f"test_{name}.sh"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0 and "kdforge" in script.read_text()
    assert "demo" in (REPO / "scripts" / "test_full_pipeline.sh").read_text()
    env = cli_env(OPENAI_API_KEY=KEY, KDFORGE=f"{sys.executable} -m kdforge")
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        cfg = user_config(tmp_path, tokenizer_dir, srv.url)
        p = subprocess.run(["bash", str(REPO / "scripts" / "test_budget_enforcement.sh"), "--config", str(cfg),
                            "--workdir", str(tmp_path / "scratch")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"\[PASS\] Budget enforcement stops at limit", p.stdout), p.stdout


def test_an_unreachable_teacher_fails_api_in_seconds(tmp_path, tokenizer_dir):
    from conftest import free_port

    cfg = user_config(tmp_path, tokenizer_dir, f"http://127.0.0.1:{free_port()}/v1", retry_base=0.05)
    report = preflight(cfg, tmp_path, only="api")
    assert report.exit_code == 2 and report.seconds < 30
    api = report.items["api"]
    assert api.status == "fail" and "did not answer" in api.evidence and "--teacher" in api.fix

"""Every Python snippet of seed 000 (the pre-training test plan) runs as written, with SPEC's
import mapping, on files made by the seed's own generate commands mapped to `kdforge generate`
(SPEC's table) against the fault-injecting teacher on 127.0.0.1."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, cli_here, run_cli
from fault_server import FaultConfig, FaultServer

# a copy of ../shared/seeds/000_091b5a4f71550d72.txt ships with the tests: a clean clone has no ../shared
SEED = REPO / "tests" / "data" / "seed_000_091b5a4f71550d72.txt"
IMPORTS = {  # SPEC's seed -> kdforge table
    "from training.dataset import KDDataset": "from kdforge.data import KDDataset",
    "from models.student.architectures.gqa_transformer import StudentLM, ModelCfg":
        "from kdforge.model import StudentLM, ModelCfg",
    "from training.distill_kd import merge_configs": "from kdforge.config import merge_configs",
}


def seed_text() -> str:
    if not SEED.is_file():
        pytest.skip(f"seed not found at {SEED}")
    return SEED.read_text(encoding="utf-8")


def python_snippets(text: str) -> list[str]:
    """The heredocs (`python3 << EOF ... EOF`) and one-liners (`python3 -c "..."`), mapped."""
    out = re.findall(r"python3 << EOF\n(.*?)\nEOF", text, re.S)
    out += [m.replace('\\"', '"') for m in re.findall(r'python3 -c "(.*?)"\n', text)]
    mapped = []
    for code in out:
        for old, new in IMPORTS.items():
            code = code.replace(old, new)
        assert "training." not in code and "models.student" not in code, code
        mapped.append(code)
    return mapped


def generate_commands(text: str) -> list[list[str]]:
    """The seed's `make_kd_mix_hardened` commands, continuation lines joined, as argv lists."""
    joined = text.replace("\\\n", " ")
    return [shlex.split(line.split("python -m scripts.make_kd_mix_hardened", 1)[1])
            for line in joined.splitlines() if "python -m scripts.make_kd_mix_hardened" in line]


def as_kdforge(argv: list[str], teacher: str) -> list[str]:
    """SPEC: `kdforge generate` with the same flags; the teacher is ours, with a model and prices
    (a budget needs them), and `--delay 20` (Moonshot's free tier) is 0 here."""
    out, it = [], iter(argv)
    for a in it:
        v = next(it)
        out += [a, teacher if a == "--teacher" else ("0" if a == "--delay" else v)]
    return ["generate", *out, "--model", "fault-teacher", "--price-input", "1", "--price-output", "2",
            "--max-tokens", "48"]


def test_the_seed_has_the_snippets_this_test_runs():
    text = seed_text()
    assert len(python_snippets(text)) == 5
    outs = [c[c.index("--out") + 1] for c in generate_commands(text)]
    assert "data/kd_mix_test.jsonl" in outs and "data/kd_mix_quality_test.jsonl" in outs


def test_every_python_snippet_of_the_seed_runs_as_written(tmp_path):
    text = seed_text()
    env = cli_env(OPENAI_API_KEY="sk-seed")
    with FaultServer(FaultConfig(api_key="sk-seed")) as srv:
        done = set()
        for argv in generate_commands(text):
            out = argv[argv.index("--out") + 1]
            if out not in ("data/kd_mix_test.jsonl", "data/kd_mix_quality_test.jsonl") or out in done:
                continue  # the budget and the full-size runs are preflight's and generate's own tests
            done.add(out)
            p = run_cli(*as_kdforge(argv, srv.url), cwd=tmp_path, env=env, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
    # the tokenizer the snippets load, made by kdforge from the generated data
    p = cli_here("tokenizer", "train", "--data", "data/kd_mix_test.jsonl", "--vocab-size", 400,
                 "--out", "models/student/tokenizer", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "worker_9b.yaml", tmp_path / "configs" / "worker_9b.yaml")
    outputs = []
    for code in python_snippets(text):
        r = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{code}\n---\n{r.stdout}\n{r.stderr}"
        outputs.append(r.stdout)
    every = "\n".join(outputs)
    assert "✅ Dataset: 20 samples" in every and "✅ 20 samples" in every
    assert "Output shape: torch.Size([1, 128, 32000])" in every and "Output size: 15.62 MB" in every
    assert "Sample 3:" in every and "Tokens: {'prompt'" in every
    assert "✅ Tokenizer path OK" in every and "Batch: 1 * 16 = 16" in every

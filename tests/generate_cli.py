"""Helpers for the generate tests: run `kdforge generate` against a FaultServer, as a real
subprocess (`run_gen`) or in this process (`gen_in_process`, same code path minus the CLI)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from conftest import cli_env, run_cli

from kdforge.config import GenerateSection

KEY = "sk-test-key"


def gen_args(tmp: Path, url: str, *extra, total: int = 20, model: str = "teacher-model") -> list[str]:
    return ["generate", "--out", tmp / "kd.jsonl", "--teacher", url, "--model", model, "--total", total,
            "--checkpoint-dir", tmp / "ckpt", "--cache-dir", tmp / "cache", *extra]


def run_gen(tmp: Path, url: str, *extra, total: int = 20, key: str = KEY, model: str = "teacher-model", timeout=120):
    return run_cli(*gen_args(tmp, url, *extra, total=total, model=model), env=cli_env(OPENAI_API_KEY=key),
                   timeout=timeout)


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def gen_in_process(tmp: Path, url: str, key: str = KEY, **fields):
    """run_generate on a GenerateSection; returns (stats or exception, stdout text, stderr text)."""
    from kdforge.teacher.generate import run_generate

    base = dict(teacher=url, model="teacher-model", out=str(tmp / "kd.jsonl"), checkpoint_dir=str(tmp / "ckpt"),
                cache_dir=str(tmp / "cache"), total=10, max_tokens=16, concurrency=4)
    base.update(fields)
    out, err = io.StringIO(), io.StringIO()
    try:
        result = run_generate(GenerateSection(**base), api_key=key, out_stream=out, err_stream=err)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        result = e
    return result, out.getvalue(), err.getvalue()

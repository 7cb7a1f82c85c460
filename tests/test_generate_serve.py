"""generate against a teacher server we did not write: `transformers serve` on a tiny local
model (offline), 10 samples end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, free_port, run_cli
from generate_cli import lines

from kdforge.data.records import parse_record


@pytest.fixture
def transformers_serve(tiny_model_dir, tmp_path):
    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        pytest.skip(f"no `transformers` command beside {sys.executable}")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(exe), "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env(HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, HF_HOME=str(tmp_path / "hf")),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            proc.kill()
            pytest.fail(f"transformers serve did not come up:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield url + "/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.slow
def test_ten_samples_from_transformers_serve(tmp_path, tiny_model_dir, transformers_serve):
    env = cli_env()
    env.pop("OPENAI_API_KEY", None)  # a local server needs no key
    p = run_cli("generate", "--out", tmp_path / "kd.jsonl", "--teacher", transformers_serve,
                "--model", tiny_model_dir, "--total", "10", "--max-tokens", "8", "--concurrency", "2",
                "--temperature", "0", env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = lines(tmp_path / "kd.jsonl")
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    for r in rows:
        parse_record(r)
        tokens = r["metadata"]["tokens"]
        assert 0 < tokens["completion"] <= 8 and tokens["prompt"] > 0  # the server's own usage counts
        assert r["metadata"]["finish_reason"] in ("stop", "length")

"""A daemon that cannot start (issue 24 §9, issue 22): it checks before it creates anything, says
why once, on stderr, in one message, and exits with the SPEC's code. Real `kdforge daemon` processes."""

from __future__ import annotations

import subprocess
import sys

from conftest import cli_env
from daemon_helpers import daemon_config


def run_daemon(base, cfg, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdforge", "daemon", "--base-dir", str(base), "--config", str(cfg),
                           "--once"], env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_a_missing_base_model_is_refused_before_the_base_dir_exists(tmp_path):
    cfg = daemon_config(tmp_path / "d.yaml", tmp_path / "no_such_model_ü")
    base = tmp_path / "training"
    p = run_daemon(base, cfg)
    assert p.returncode == 2, p.stdout + p.stderr
    assert not base.exists(), sorted(str(x) for x in base.rglob("*"))  # nothing created for a refused start
    text = p.stdout + p.stderr
    assert text.count("no Hugging Face model folder") == 1, text  # once, not log echo + CLI error
    assert "daemon.base_model" in p.stderr and "Traceback" not in text


def test_an_error_at_setup_is_printed_once_and_logged(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, eval_file=str(tmp_path / "held_out_ß.jsonl"))
    base = tmp_path / "training"
    p = run_daemon(base, cfg)
    assert p.returncode == 2, p.stdout + p.stderr
    text = p.stdout + p.stderr
    assert text.count("held_out_ß.jsonl") == 1, text
    assert "held_out_ß.jsonl" in p.stderr and "Traceback" not in text
    log = "".join(f.read_text() for f in (base / "logs").glob("daemon_*.log"))
    assert "daemon failed" in log and "held_out_ß.jsonl" in log  # the log still records why it stopped

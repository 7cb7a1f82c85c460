"""`benchmarks/gpu_check.py --cpu --tiny` runs every section end to end on CPU, so the GPU check
cannot rot before a GPU runs it. Numbers are the benchmark's business: the test checks that each
section produced its row, that the DDP resume matched and that plain and chunked KD agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env


@pytest.mark.benchmark
def test_gpu_check_cpu_tiny_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--tiny",
                        "--out", str(out), "--work", str(tmp_path / "work")],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "MFU = tokens/s x (6 N + 12 L d_attn T) / peak" in p.stdout
    report = json.loads(out.read_text())
    rows = {r["section"]: [] for r in report["rows"]}
    for r in report["rows"]:
        rows[r["section"]].append(r)
    assert set(rows) == {"train", "kd memory", "parallel", "serve"}
    (train,) = rows["train"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1 and train["estimate_gb"] > 0
    assert [r["ok"] for r in rows["parallel"]] == [True] and rows["parallel"][0]["resume_loss_rel_diff"] <= 1e-5
    assert rows["kd memory"][-1]["ok"] is True
    assert all(r["ok"] and r["tokens_per_s"] > 0 for r in rows["serve"])
    assert report["peak_flops"] > 0

"""The benchmark scripts run end to end and print their tables.

The speed-only ones are marked `benchmark` (deselected by default: `python -m pytest -m benchmark`).

Speed is measured by the benchmark, never asserted here: the test only checks that every trainer
trained (a positive token rate) and that the KD memory table is there.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env


def _rows(out: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.benchmark
@pytest.mark.slow
def test_train_throughput_tiny_prints_both_tables():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--tiny", "--threads", "1"],
                       env=cli_env(), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = _rows(p.stdout)
    trainers = ["HF Trainer (padded)", "kdforge (padded)", "kdforge (packed)"]
    if "not installed" not in rows["TRL SFTTrainer (packed)"][1]:
        trainers.append("TRL SFTTrainer (packed)")
    for name in trainers:
        useful, labels = (float(x.replace(",", "")) for x in rows[name][1:3])
        assert useful > labels > 0, (name, rows[name])
    assert float(rows["baseline (imports + model)"][-2]) > 0
    assert "plain" in rows and any(k.startswith("chunked") for k in rows)
    assert "load average" in p.stdout


@pytest.mark.benchmark
def test_serve_throughput_quick_prints_its_table_and_the_load():
    """`serve_throughput.py --quick`: kdforge serve on the demo teacher, one short cell per level."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_throughput.py"), "--quick"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "load average at start" in p.stdout and "load average at end" in p.stdout
    cells = [line for line in p.stdout.splitlines() if line.startswith("| teacher | kdforge serve |")]
    assert len(cells) == 4, p.stdout  # completion and scoring, c=1 and c=16
    assert all(float(c.split("|")[6]) > 0 for c in cells), cells


def test_data_scale_quick_builds_and_reopens_a_store():
    """`data_scale.py --quick`: 5k tokens of generate-format top-20 data, built and reopened."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_scale.py"), "--quick"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    cells = [line.split("|") for line in p.stdout.splitlines() if re.match(r"\| [\d,]+ \| \d+ \|", line)]
    assert len(cells) == 1, p.stdout
    per_alt, tok_s = float(cells[0][6]), float(cells[0][8].replace(",", ""))
    assert 0 < per_alt <= 8 and tok_s > 0  # fixed-width ids and fp16 logprobs: ~6.4 B per alternative

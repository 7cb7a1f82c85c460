"""`kdforge demo --fast --student-tokenizer own`: the real pipeline end to end (serve -> generate ->
validate -> train CE-only and on-policy students, one of them on a tokenizer of its own -> evaluate),
offline, with progress while students train and a report that says what it measured."""

from __future__ import annotations

import re

from conftest import run_cli


def test_fast_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    r = run_cli("demo", "--fast", "--student-tokenizer", "own", "--workdir", work, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # every stage ran for real
    assert re.search(r"http://127\.0\.0\.1:\d+/v1", out)
    assert "250/250 samples" in out and "server stopped" in out
    assert "valid 250" in out and "unusable 0" in out
    rows = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^\| (teacher|student-ce|student-op|student-kd|student-own) \| ([\d,]+) \| ([\d.]+)% \|",
                                 out, re.M)}
    assert set(rows) == {"teacher", "student-ce", "student-op", "student-own"}, out
    t_params, t_acc = rows["teacher"]
    for name in ("student-ce", "student-op", "student-own"):
        params, acc = rows[name]
        assert params * 4 <= t_params, "students have at most a quarter of the teacher's parameters"
        assert acc >= 50.0, f"{name} learned the task ({acc}%)"
    # the own-tokenizer student learned from the teacher's carried rows, and the verdict says how well
    assert "teacher.path has its own tokenizer" in out
    assert re.search(r"^student-own \(its own tokenizer, .*\): [\d.]+%, \d+% of the same-tokenizer", out, re.M), out
    # step 4 shows progress, and each student's line names real losses (never "final loss 0.0000")
    assert re.search(r"^    student-op: step 100/300 loss ", out, re.M), out
    assert re.search(r"^    student-own: step 300/300 ", out, re.M), out
    assert "final loss" not in out and "Loading weights" not in r.stdout + r.stderr
    assert re.search(r"^  student-op: .*final CE [\d.]+ nats/token, last on-policy JSD [\d.]+; exact match", out, re.M)
    assert t_acc >= 90.0
    # the on-policy student really sampled and had its tokens scored, and its spend is said
    op = re.search(r"  student-op: 300 steps, (\d+) on-policy steps scoring ([\d,]+) teacher tokens", out)
    assert op and 60 <= int(op.group(1)) <= 180 and int(op.group(2).replace(",", "")) > 1000, out
    # the verdict: the gap closed when the difference is past CE's seed-to-seed spread, else says so
    ce, on = rows["student-ce"][1], rows["student-op"][1]
    verdict = re.search(r"^with 250 teacher answers, on-policy distillation reaches .*$", out, re.M).group(0)
    if abs(on - ce) <= 12.0:
        assert "within the run-to-run spread" in verdict, verdict
    else:
        assert "of the CE-to-teacher gap" in verdict, verdict
    # the data carries the teacher's top-k logprobs (generate stored them)
    line = (work / "data" / "kd.jsonl").read_text().splitlines()[0]
    assert '"teacher_logprobs"' in line and '"top"' in line
    report = (work / "report.md").read_text()
    assert "| student-op |" in report and verdict in report
    assert (work / "loss.png").stat().st_size > 1000
    # no server left behind: the port it used is closed
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", out).group(1))
    import socket
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0

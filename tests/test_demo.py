"""`kdforge demo --fast`: the real pipeline end to end (serve -> generate -> validate -> train x2
-> evaluate), offline, with a report."""

from __future__ import annotations

import re

from conftest import run_cli


def test_fast_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    r = run_cli("demo", "--fast", "--workdir", work, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # every stage ran for real
    assert re.search(r"http://127\.0\.0\.1:\d+/v1", out)
    assert "500/500 samples" in out and "server stopped" in out
    assert "valid 500" in out and "unusable 0" in out
    rows = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^\| (teacher|student-ce|student-kd) \| ([\d,]+) \| ([\d.]+)% \|", out, re.M)}
    assert set(rows) == {"teacher", "student-ce", "student-kd"}, out
    t_params, t_acc = rows["teacher"]
    for name in ("student-ce", "student-kd"):
        params, acc = rows[name]
        assert params * 4 <= t_params, "students have at most a quarter of the teacher's parameters"
        assert acc >= 50.0, f"{name} learned the task ({acc}%)"
    assert t_acc >= 90.0
    # the data carries the teacher's top-k logprobs, which the KD student trained on
    line = (work / "data" / "kd.jsonl").read_text().splitlines()[0]
    assert '"teacher_logprobs"' in line and '"top"' in line
    report = (work / "report.md").read_text()
    assert "| student-kd |" in report and "CE-only student" in report
    assert (work / "loss.png").stat().st_size > 1000
    # no server left behind: the port it used is closed
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", out).group(1))
    import socket
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0

"""`kdforge status` on whatever the status file holds (issue 22): empty, truncated, not UTF-8, not
an object, fields of the wrong type, NaN. Either a readable render (exit 0) or one line naming the
file (exit 2); never a traceback. The `--watch` view renders the same inputs. Generated JSON and
bytes through the real entry point (kdforge.cli.main, in this process for speed), plus a real
`kdforge status` process for the hand-picked files."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli

STATUS = Path("status") / "training_status.json"


def good_status(**extra) -> dict:
    return {"status": "training", "current_step": 57, "total_steps": 100, "batch_number": 2, "batch_step": 7,
            "batch_steps": 50, "batch_queue_size": 3, "current_file": "wöche_二.jsonl", "loss": 1.25,
            "learning_rate": 1e-4, "tokens_per_s": 900.0, "last_checkpoint": "checkpoint-55",
            "pid": os.getpid(), "last_error": None, **extra}


def run_status(base: Path, *args: str) -> tuple[int, str, str]:
    """`kdforge status --base-dir BASE ARGS` through the real entry point, in this process."""
    from kdforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["status", "--base-dir", str(base), *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def write(base: Path, data: bytes) -> Path:
    p = base / STATUS
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def render_watch(status) -> str:
    """One frame of `kdforge status --watch` for `status`, rendered to text."""
    from rich.console import Console

    from kdforge.daemon.watch import _Rate, view

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(view(status, ["10:00 INFO step 3 loss nan lr 1e-4"], _Rate(), Path("s.json")))
    return console.file.getvalue()


BROKEN = {
    "empty": b"", "truncated": json.dumps(good_status()).encode()[:40], "not UTF-8": b'{"status": "\xff\xfe"}',
    "a list": b"[1, 2]", "null": b"null", "a string": b'"idle"', "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_an_unreadable_status_file_is_exit_2_naming_it(tmp_path, what):
    path = write(tmp_path, BROKEN[what])
    for args in ((), ("--json",)):
        code, out, err = run_status(tmp_path, *args)
        assert code == 2, (what, args, out, err)
        assert str(path) in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err  # one line, no chain


def test_a_truncated_status_file_in_a_real_process(tmp_path):
    path = write(tmp_path, BROKEN["truncated"])
    p = run_cli("status", "--base-dir", tmp_path)
    assert p.returncode == 2 and str(path) in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "not a complete JSON" in p.stderr  # says what it found, not the parser's exception


def test_a_status_file_that_is_a_directory(tmp_path):
    (tmp_path / STATUS).mkdir(parents=True)
    code, out, err = run_status(tmp_path)
    assert code == 2 and str(tmp_path / STATUS) in err, err


ODD = {
    "loss NaN string": {"loss": "NaN", "learning_rate": "fast", "tokens_per_s": [1]},
    "loss NaN": {"loss": float("nan"), "tokens_per_s": float("inf")},
    "steps as text": {"current_step": "57", "total_steps": "lots", "batch_step": None, "batch_steps": {}},
    "pid odd": {"pid": "abc"}, "pid negative": {"pid": -1}, "pid huge": {"pid": 10 ** 30}, "pid float": {"pid": 1.5},
    "eval odd": {"eval": {"ce": "x", "change_since_first": "y"}, "eval_history": [1, {"ce": None}, "z"]},
    "eval a list": {"eval": [1], "eval_history": {"ce": 1}},
    "control characters": {"current_file": "a\x1b[2J\nb.jsonl", "last_error": "\x07boom\r"},
    "no fields": {},
}


@pytest.mark.parametrize("what", list(ODD))
def test_odd_fields_render_readably(tmp_path, what):
    data = {**good_status(), **ODD[what]} if what != "no fields" else {}
    write(tmp_path, json.dumps(data).encode())
    code, out, err = run_status(tmp_path)
    assert code == 0, (out, err)
    assert "status:" in out and "Traceback" not in out + err
    assert "\x1b" not in out and "\x07" not in out  # a status file cannot drive the terminal
    code, out, err = run_status(tmp_path, "--json")
    assert code == 0 and "daemon_running" in json.loads(out), err
    assert "status" in render_watch(data)


def test_watch_view_on_loss_nan_string():
    text = render_watch(good_status(loss="NaN"))
    assert "nan" in text.lower() and "57 / 100" in text


def test_a_pid_of_minus_one_is_not_every_process():
    from kdforge.daemon.status import pid_alive

    assert not pid_alive(-1) and not pid_alive("abc") and not pid_alive(10 ** 30) and not pid_alive(True)
    assert pid_alive(os.getpid()) and pid_alive(str(os.getpid()))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                    max_leaves=20)
FIELDS = st.sampled_from(["status", "current_step", "total_steps", "batch_number", "batch_step", "batch_steps",
                          "batch_queue_size", "current_file", "loss", "learning_rate", "tokens_per_s",
                          "last_checkpoint", "last_snapshot", "base_model", "generation", "pid", "started_at",
                          "updated_at", "last_error", "eval", "eval_history"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(FIELDS, JSON, max_size=12) | JSON)
def test_generated_json_never_a_traceback(tmp_path, data):
    write(tmp_path, json.dumps(data).encode())
    code, out, err = run_status(tmp_path)
    assert code in (0, 2), (code, out, err)
    assert (code == 0) == isinstance(data, dict), (data, out, err)
    if code == 2:
        assert str(tmp_path / STATUS) in err
    if isinstance(data, dict):
        render_watch(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.builds(lambda d, n: json.dumps(d).encode()[:n], st.dictionaries(FIELDS, JSON), st.integers(0, 80)))
def test_generated_bytes_never_a_traceback(tmp_path, data):
    write(tmp_path, data)
    code, out, err = run_status(tmp_path)
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in err

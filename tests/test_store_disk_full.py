"""A token store that cannot be written (a full disk, a quota, a file size limit) is the machine's
fault: `kdforge data build` and `kdforge train` say so in one line naming the store's folder and what
to do (exit 1, no traceback), and leave no half-built folder. The disk fills for real: the process
runs under RLIMIT_FSIZE (a write past the limit fails with EFBIG as a full disk fails with ENOSPC;
Python ignores SIGXFSZ); nothing is mocked."""

from __future__ import annotations

import resource
import subprocess
import sys

from conftest import cli_env, synthetic_records, write_jsonl


def limited(max_file_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))
    return preexec


def kdforge(args: list, max_file_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdforge", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=limited(max_file_bytes))


def test_a_store_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "données_東京.jsonl", synthetic_records(400))
    out = tmp_path / "stores"
    r = kdforge(["data", "build", data, "--tokenizer", tokenizer_dir, "--out", out], max_file_bytes=20_000)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"building the token store in {out}" in r.stderr and "File too large" in r.stderr, r.stderr
    assert "free disk space" in r.stderr and "KDFORGE_STORE_DIR" in r.stderr, r.stderr
    assert not [p.name for p in out.iterdir() if p.is_dir()]  # nothing half-built left, nothing published
    ok = kdforge(["data", "build", data, "--tokenizer", tokenizer_dir, "--out", out], max_file_bytes=1 << 30)
    assert ok.returncode == 0 and ok.stdout.startswith("built token store"), ok.stderr


def test_any_command_that_meets_a_full_disk_says_so_in_one_line(tmp_path):
    """The CLI's last resort: a write the machine refuses outside any command's own handling
    (here `kdforge tokenizer train` writing its tokenizer) is one line and exit 1, not a traceback."""
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"café 東京 🎉 line {i} " * 20} for i in range(200)])
    r = kdforge(["tokenizer", "train", "--data", data, "--vocab-size", 400, "--out", tmp_path / "tok"],
                max_file_bytes=2_000)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert r.stderr.startswith("error: File too large") and "free disk space" in r.stderr, r.stderr

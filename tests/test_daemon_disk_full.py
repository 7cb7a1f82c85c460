"""A full disk is not the data's fault (issue 22): the daemon never rejects a good batch for it,
never names a checkpoint that is not on disk, waits with a clear status and goes on from the newest
checkpoint once it can write again; a daemon or a training run that cannot write at start says so
in one line. The disk fills for real: each process runs under RLIMIT_FSIZE (a write past the limit
fails with EFBIG, as a full disk fails with ENOSPC; Python ignores SIGXFSZ), set in the child
before exec: nothing of kdforge is mocked."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli_env
from daemon_helpers import (batch, claimed_files, daemon_config, daemon_log, drop, losses, newest_state, output,
                            status, wait_until)
from kdforge.train import checkpoint as ckpt

# Bigger than any log, status or tokenizer file a test run writes; smaller than the tiny model's
# optimizer.pt (~360 KB with LoRA r=16 everywhere): every checkpoint save fails part-way.
CHECKPOINT_WONT_FIT = 330_000
RECORDS, STEPS = 20, 5  # a batch: 20 records at micro-batch 4, saved at its end (save_steps 5)


def limited(max_file_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))  # soft: it can be lifted
    return preexec


def kdforge(args: list, out_file, max_file_bytes: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdforge", *map(str, args)], env=cli_env(), stdout=out_file,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limited(max_file_bytes) if max_file_bytes is not None else None)


def test_a_full_disk_mid_batch_waits_and_rejects_nothing(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "lundi.jsonl", batch(RECORDS, seed=1))
    second = drop(base, "mardi_火曜.jsonl", batch(RECORDS, seed=2))
    os.utime(second, (second.stat().st_mtime + 1, second.stat().st_mtime + 1))  # taken second
    with open(tmp_path / "training.daemon.out", "w") as out:  # daemon_helpers.output() reads it
        p = kdforge(["daemon", "--base-dir", base, "--config", cfg], out, CHECKPOINT_WONT_FIT)
        try:
            wait_until(lambda: status(base).get("status") == "waiting", p, base, "status waiting")
            s = status(base)
            # torch.save's zip writer tells no errno ("unexpected pos N vs M"): the reason says what failed.
            assert "could not be written" in s["last_error"] and "not the data" in s["last_error"], s
            assert s["last_checkpoint"] is None and ckpt.latest_checkpoint(base / "current_model") is None, s
            assert (s["current_step"], s["batch_number"]) == (0, 0), s  # what the next try starts from
            assert not list((base / "rejected").glob("*")), [x.name for x in (base / "rejected").iterdir()]
            assert claimed_files(base, "lundi.jsonl") and (base / "inbox" / "mardi_火曜.jsonl").exists()

            # Space again (the same process: its file size limit lifted): the batches train whole.
            resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            wait_until(lambda: status(base).get("status") == "idle" and status(base).get("batch_number") == 2,
                       p, base, "both batches trained")
            (base / ".stop").touch()
            assert p.wait(timeout=120) == 0, output(base)
        finally:
            if p.poll() is None:
                p.kill()
    state = newest_state(base)
    assert state["global_step"] == 2 * STEPS and state["samples_seen"] == 2 * RECORDS
    assert sorted(losses(state)) == list(range(1, 2 * STEPS + 1))  # from the first example, nothing twice
    assert not list((base / "rejected").glob("*")) and not list((base / "inbox").glob("*.jsonl"))
    assert status(base)["last_checkpoint"] == f"checkpoint-{2 * STEPS}" and status(base)["status"] == "stopped"
    log = daemon_log(base)
    assert "rejected" not in log and "retrying lundi.jsonl from the fresh base" in log, log
    assert "Traceback" not in output(base)


@pytest.mark.parametrize("command, limit, why", [
    ("daemon", 64, "File too large"),  # the lock's pid fits, the first log line does not
    # not one byte: importing torch fails (tempfile) where its files exist; in a fresh venv (CI) the first
    # write that fails is another one (EFBIG): either way one line naming the full disk
    ("train", 0, ("no temporary directory", "File too large"))])
def test_no_space_at_start_is_one_line_and_exit_1(tmp_path, tiny_model_dir, command, limit, why):
    if command == "daemon":
        args = ["daemon", "--base-dir", tmp_path / "training", "--config",
                daemon_config(tmp_path / "d.yaml", tiny_model_dir), "--once"]
    else:
        from train_helpers import train_config
        from conftest import synthetic_records, write_jsonl

        data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(16))
        args = ["train", "--config", train_config(tmp_path, tiny_model_dir, data)]
    p = kdforge(args, subprocess.PIPE, max_file_bytes=limit)  # output to a pipe: no file limit there
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 1, text
    assert "Traceback" not in text and "During handling" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    causes = why if isinstance(why, tuple) else (why,)
    assert len(errors) == 1 and any(c in errors[0] for c in causes) and "free disk space" in errors[0], text


# ---------------------------------------------------------------------------- which errors are the machine's

INFRA = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM]


def chain(inner: BaseException, wrappers: list[tuple[type, str, bool]]) -> BaseException:
    """`inner` raised under each wrapper in turn (as cause or as context)."""
    e = inner
    for kind, text, as_cause in wrappers:
        outer = kind(text)
        if as_cause:
            outer.__cause__ = e
        else:
            outer.__context__ = e
        e = outer
    return e


WRAPPERS = st.lists(st.tuples(st.sampled_from([RuntimeError, ValueError, OSError]), st.text(max_size=30), st.booleans()),
                    max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(INFRA), st.text(max_size=20), WRAPPERS)
def test_an_os_error_of_the_machine_is_found_under_any_wrapping(code, filename, wrappers):
    from kdforge.daemon.infra import infrastructure_fault

    inner = OSError(code, "msg", filename or None)
    reason = infrastructure_fault(chain(inner, wrappers))
    assert reason is not None and __import__("os").strerror(code) in reason


@pytest.mark.parametrize("message, found", [
    ("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0", True),  # torch.save, disk full
    ("PytorchStreamWriter failed writing file data/3: file write failed", True),
    ("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })", True),
    ("loss is nan at step 3: lower train.lr", False), ("unexpected keyword 'pos'", False),
])
def test_torch_and_safetensors_write_failures_are_the_machines(message, found):
    from kdforge.daemon.infra import infrastructure_fault

    assert (infrastructure_fault(RuntimeError(message)) is not None) == found


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([FloatingPointError, ValueError, KeyError, UnicodeDecodeError, FileNotFoundError,
                        PermissionError, IsADirectoryError]), WRAPPERS)
def test_data_faults_are_not_the_machines(kind, wrappers):
    from kdforge.daemon.infra import infrastructure_fault

    inner = (kind("utf-8", b"\xff", 0, 1, "bad") if kind is UnicodeDecodeError else kind("bad data"))
    wrappers = [(k, t, c) for k, t, c in wrappers if k is not OSError]  # a bare OSError has no errno to read
    e = chain(inner, [(k, t.replace("pos", "p"), c) for k, t, c in wrappers])
    assert infrastructure_fault(e) is None


def test_no_file_descriptors_is_not_the_files_fault(tmp_path):
    """EMFILE for real (RLIMIT_NOFILE in a child, every descriptor taken): opening a claimed batch
    raises the OSError the daemon waits out, not the DataError that would reject the file."""
    batch_file = tmp_path / "claimed_ü.jsonl"
    batch_file.write_text('{"prompt": "a", "teacher_text": "b"}\n')
    probe = (
        "import os, resource, sys\n"
        "from pathlib import Path\n"
        "from kdforge.daemon.inbox import open_regular\n"
        "from kdforge.daemon.infra import infrastructure_fault\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "try:\n"
        "    open_regular(Path(sys.argv[1]))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, '|', infrastructure_fault(e))\n")
    p = subprocess.run([sys.executable, "-c", probe, str(batch_file)], env=cli_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.strip() == f"OSError | {os.strerror(errno.EMFILE)}: {batch_file}", p.stdout + p.stderr


def test_a_rolled_back_batch_leaves_the_status_naming_the_checkpoint_restored(tmp_path, tiny_model_dir):
    """A data fault after the batch saved its own checkpoints (its file changed under it): they are
    rolled back, and the status names the checkpoint restored, not one that is gone."""
    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, save_steps=1)
    base = tmp_path / "training"
    drop(base, "a_first.jsonl", batch(8, seed=1))  # steps 1-2
    later = drop(base, "b_changes.jsonl", batch(8, seed=2))  # steps 3-4, then rolled back
    os.utime(later, (later.stat().st_mtime + 1, later.stat().st_mtime + 1))

    def writer_goes_on(line: str) -> None:
        if "Saved checkpoint: checkpoint-4" in line:
            (claimed,) = (base / "inbox" / ".claimed").iterdir()
            with open(claimed, "a") as f:
                f.write('{"prompt": "noch eine Zeile", "teacher_text": "ja"}\n')

    Daemon(base, load_config([cfg]), echo=writer_goes_on, handle_signals=False).run(once=True)
    assert (base / "rejected" / "b_changes.jsonl").exists()
    assert [c.name for c in ckpt.list_checkpoints(base / "current_model")] == ["checkpoint-2"]  # 3, 4 rolled back
    s = status(base)
    assert (s["last_checkpoint"], s["current_step"]) == ("checkpoint-2", 2), s  # was checkpoint-4: rolled back


def test_train_whose_save_fails_stops_in_one_line_with_no_torn_checkpoint(tmp_path, tokenizer_dir):
    from conftest import synthetic_records, write_jsonl
    from train_helpers import train_config

    data = write_jsonl(tmp_path / "train.jsonl", synthetic_records(32))
    cfg = train_config(tmp_path, tokenizer_dir, data, max_steps=4, save_steps=2)
    p = kdforge(["train", "--config", cfg], subprocess.PIPE, max_file_bytes=CHECKPOINT_WONT_FIT)
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kdforge train" in errors[0] and "free disk space" in errors[0], text
    assert "Traceback" not in text, text
    out = tmp_path / "out"
    assert ckpt.list_checkpoints(out) == [] and not list(out.glob(".tmp-*")), list(out.iterdir())


def test_once_with_a_full_disk_stops_keeping_the_batch(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "données.jsonl", batch(RECORDS, seed=1))
    p = kdforge(["daemon", "--base-dir", base, "--config", cfg, "--once"], subprocess.PIPE, CHECKPOINT_WONT_FIT)
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "données.jsonl" in errors[0] and "not the data" in errors[0], text
    assert "Traceback" not in text, text
    assert claimed_files(base, "données.jsonl") and not list((base / "rejected").glob("*"))
    s = status(base)
    assert s["status"] == "error" and s["last_checkpoint"] is None, s

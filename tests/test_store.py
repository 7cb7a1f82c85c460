"""The token store (data/store.py): built once, streamed in chunks by workers, memory-mapped,
never stale, atomically published; fp16 logprobs keep the loss and its gradient."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, synthetic_records, write_jsonl
from kdforge.data import store
from kdforge.data.dataset import KDDataset, load_tokenizer
from kdforge.data.records import read_records
from kdforge.data.tokenizer import token_bytes
from kdforge.errors import DataError

TEXTS = ["alpha echo", "café naïve déjà", "東京 中文 数据", "emoji 🎉 ok 🙂", "delta\tbravo", "2 plus 3 is 5."]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def kd_record(tok, text: str, k: int = 4, seed: int = 0, prompt: str = "Say it") -> dict:
    """generate's format with bytes on every token: each row is k distinct ids, the chosen one first."""
    tb = token_bytes(tok)
    rng = random.Random(seed)
    usable = [i for i, b in enumerate(tb) if b]
    rows = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        alts = [i] + rng.sample([j for j in usable if j != i], k - 1)
        lps = sorted((-rng.random() * 25 for _ in alts), reverse=True)
        top = [{"token": tb[a].decode("utf-8", "replace"), "logprob": lp, "bytes": list(tb[a])} for a, lp in zip(alts, lps)]
        rows.append({**top[0], "top": top})
    return {"prompt": prompt, "teacher_text": text, "teacher_logprobs": rows}


def same_items(a: KDDataset, b: KDDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


# ---------------------------------------------------------------- chunks and workers == one pass in memory

LINE = st.one_of(
    st.tuples(st.just("kd"), st.sampled_from(TEXTS), st.integers(0, 99)),
    st.tuples(st.just("text"), st.sampled_from(TEXTS), st.just(0)),
    st.tuples(st.just("bad"), st.sampled_from(["{not json", '{"prompt": "hi"}', "[1]", '{"text": ""}']), st.just(0)),
    st.tuples(st.just("blank"), st.just(""), st.just(0)),
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(LINE, min_size=1, max_size=14), crlf=st.booleans(), chunk=st.integers(60, 900))
def test_chunked_parallel_build_equals_reading_the_records(tok, tmp_path_factory, lines, crlf, chunk):
    """Any cut into chunks, built by 2 forked workers: the same examples, rows and bad-line numbers
    (file:line, after blank lines and \\r\\n endings) as reading every record in this process."""
    tmp = tmp_path_factory.mktemp("chunks")
    out = []
    for kind, text, seed in lines:
        out.append(json.dumps(kd_record(tok, text, seed=seed, prompt=f"Q{seed} é")) if kind == "kd"
                   else json.dumps({"text": text}) if kind == "text" else text)
    path = tmp / "d.jsonl"
    path.write_bytes(("\r\n" if crlf else "\n").join(out).encode() + b"\n")
    if not any(k in ("kd", "text") for k, *_ in lines):
        return
    info = store.ensure_store([path], tok, with_topk=True, root=tmp / "st", workers=2, chunk_bytes=chunk)
    assert info.built
    records, problems = read_records(path, strict=False)
    try:
        ds = KDDataset(path, tokenizer=tok, with_topk=True, strict=False, store_dir=tmp / "st")
    except DataError as e:
        assert "no teacher_logprobs" in str(e) and not any(k == "kd" for k, *_ in lines)
        return
    ref = KDDataset(path, tokenizer=tok, with_topk=True, strict=False, records=records)
    assert [(p.path, p.line, str(p)) for p in ds.problems] == [(p.path, p.line, str(p)) for p in problems]
    assert ds.ce_only_lines == ref.ce_only_lines and not ds.misaligned
    same_items(ds, ref)
    if problems:  # strict: the first bad line, named as read_records names it
        with pytest.raises(DataError) as e:
            KDDataset(path, tokenizer=tok, with_topk=True, store_dir=tmp / "st")
        assert str(e.value) == str(problems[0])


# ---------------------------------------------------------------- reuse, staleness, publication

def test_built_once_reused_and_never_stale(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS)])
    original = path.read_bytes()
    before = store.BUILD_COUNT["n"]
    a = KDDataset(path, tokenizer=tok, with_topk=True)
    assert a.store_info.built and a.store_info.path.parent == tmp_path / ".kdforge-store"
    b = KDDataset(path, tokenizer=tok, with_topk=True)
    assert not b.store_info.built and store.BUILD_COUNT["n"] == before + 1
    same_items(a, b)
    with open(path, "a") as f:  # an edit: a new key, a new store with the new line
        f.write(json.dumps(kd_record(tok, "juliet 🎉", seed=9)) + "\n")
    c = KDDataset(path, tokenizer=tok, with_topk=True)
    assert c.store_info.built and len(c) == len(a) + 1 and c.store_info.path != a.store_info.path
    assert not a.store_info.path.exists()  # the superseded version's store is removed (disk)
    same_items(a, b)  # ... while a process that mapped it reads on
    path.write_bytes(original)  # the old bytes again: built again, the same store
    d = KDDataset(path, tokenizer=tok, with_topk=True)
    assert d.store_info.built and d.store_info.path == a.store_info.path and not c.store_info.path.exists()
    same_items(a, d)
    # a new alignment/reasoning setting, or CE-only reading, is another store
    e = KDDataset(path, tokenizer=tok, with_topk=True, settings={"reasoning": "drop"})
    f = KDDataset(path, tokenizer=tok, with_topk=False)
    assert len({a.store_info.path, e.store_info.path, f.store_info.path}) == 3
    assert store.BUILD_COUNT["n"] == before + 5 and d.store_info.path.exists()  # other settings: kept
    # mapped, not loaded: the arrays are memmaps of the published files
    assert isinstance(d._store.alt_lp, np.memmap) and d._store.alt_lp.dtype == np.float16
    assert isinstance(d._store.alt_ids, np.memmap) and d._store.alt_ids.dtype == np.int32


@pytest.mark.parametrize("how", ["append", "overwrite"])
def test_a_file_changing_during_the_build_is_detected_and_never_half_used(tok, tmp_path, monkeypatch, how):
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS)])
    real = store.encode_chunk
    calls = {"n": 0}

    def writer_meanwhile(chunk, *, always=False):
        calls["n"] += 1
        if calls["n"] == 1 or always:
            if how == "append":
                with open(path, "a") as f:
                    f.write(json.dumps({"text": f"late line {calls['n']}"}) + "\n")
            else:  # same size, other bytes: only the chunk checksum sees it
                raw = bytearray(path.read_bytes())
                i = raw.index(b"Say it")
                raw[i:i + 6] = b"Say IT" if raw[i + 4:i + 6] == b"it" else b"Say it"
                path.write_bytes(bytes(raw))
        return real(chunk)

    monkeypatch.setattr(store, "encode_chunk", writer_meanwhile)
    ds = KDDataset(path, tokenizer=tok, with_topk=True, store_dir=tmp_path / "st")  # retried once, then whole
    assert ds.store_info.built
    want = KDDataset(path, tokenizer=tok, with_topk=True, records=read_records(path)[0])
    same_items(ds, want)

    monkeypatch.setattr(store, "encode_chunk", lambda c: writer_meanwhile(c, always=True))
    with pytest.raises(DataError, match="changed while the token store was built") as e:
        KDDataset(path, tokenizer=tok, with_topk=True, store_dir=tmp_path / "st2")
    assert str(path) in str(e.value)
    assert not [p for p in (tmp_path / "st2").iterdir() if p.is_dir()]  # nothing published, no build left


def _build_in_child(args):
    path, tok_dir, root = args
    info = store.ensure_store([path], load_tokenizer(tok_dir), with_topk=True, root=root)
    return info.built, str(info.path)


def test_concurrent_builders_build_once(tok, tokenizer_dir, tmp_path):
    """Ranks (or two runs) asking for the same store at once: one builds, the others open it."""
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS * 20)])
    with multiprocessing.get_context("fork").Pool(3) as pool:
        got = pool.map(_build_in_child, [(str(path), str(tokenizer_dir), str(tmp_path / "st"))] * 3)
    assert sorted(b for b, _ in got) == [False, False, True] and len({p for _, p in got}) == 1


_REAL_ENCODE = store.encode_chunk


def _slow_encode(chunk):
    time.sleep(0.05)
    return _REAL_ENCODE(chunk)


def _build_with_workers(path, tok_dir, root, out, first):
    if first:  # the builder that hashes is slow: the others arrive while it builds
        store.encode_chunk = _slow_encode
    else:
        time.sleep(0.5)
    info = store.ensure_store([path], load_tokenizer(tok_dir), with_topk=True, root=root, workers=2, chunk_bytes=4096)
    out.put((info.built, str(info.path), store.BUILD_COUNT["n"], first))


def test_concurrent_builders_with_workers_build_once(tok, tokenizer_dir, tmp_path):
    """Three processes, each with 2 workers, at once on a file no memo knows: one builds while it
    hashes, the others wait for it (the build lock of these paths) and open its store: one build in all."""
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS * 30)])
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_with_workers,
                         args=(str(path), str(tokenizer_dir), str(tmp_path / "st"), out, i == 0)) for i in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(b for b, *_ in got) == [False, False, True] and len({p for _, p, *_ in got}) == 1
    assert [first for built, *_, first in got if built] == [True]  # the first built it; no other built too
    assert sum(n for _, _, n, _ in got) == store.BUILD_COUNT["n"] * 3 + 1  # one build counted, in one process
    assert not list((tmp_path / "st").glob(".tmp-*"))


def test_a_store_found_once_hashed_is_opened_and_the_build_dropped(tok, tmp_path):
    """A file whose stat changed (the memo does not know it) but whose bytes did not: the build that
    runs while it is hashed stops once the key names the store already there; nothing is left."""
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS * 30)])
    first = store.ensure_store([path], tok, with_topk=True, root=tmp_path / "st", workers=2, chunk_bytes=4096)
    before = store.BUILD_COUNT["n"]
    os.utime(path, (1e9, 1e9))  # touched: the stat differs, the bytes are the same
    again = store.ensure_store([path], tok, with_topk=True, root=tmp_path / "st", workers=2, chunk_bytes=4096)
    assert first.built and not again.built and again.path == first.path and store.BUILD_COUNT["n"] == before
    assert not list((tmp_path / "st").glob(".tmp-*"))


@pytest.mark.parametrize("always", [False, True])
def test_a_file_changing_under_a_build_during_hashing_is_detected(tok, tmp_path, monkeypatch, always):
    """The first chunk's bytes change after the hashing pass took its checksum and before a worker
    reads it: the worker sees it, the build is dropped and done again the usual way (whole, from the
    new bytes), or refused if the file keeps changing; nothing half-built is published."""
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS * 30)])
    real = store.scan_chunks
    flips = {"n": 0}

    def flip_after_checksum(*args, **kw):
        for i, c in enumerate(real(*args, **kw)):
            if i == 0 and (always or not flips["n"]):
                flips["n"] += 1
                raw = bytearray(path.read_bytes())
                at = raw.index(b"Say it")
                raw[at:at + 6] = b"Say IT" if raw[at + 4:at + 6] == b"it" else b"Say it"
                path.write_bytes(bytes(raw))
            yield c

    monkeypatch.setattr(store, "scan_chunks", flip_after_checksum)
    root = tmp_path / "st"
    if always:
        with pytest.raises(DataError, match="changed while the token store was built"):
            store.ensure_store([path], tok, with_topk=True, root=root, workers=2, chunk_bytes=4096)
        assert not [p for p in root.iterdir() if p.is_dir()] and flips["n"] >= 3
        return
    info = store.ensure_store([path], tok, with_topk=True, root=root, workers=2, chunk_bytes=4096)
    assert info.built and flips["n"] == 1
    ds = KDDataset(path, tokenizer=tok, with_topk=True, store_dir=root)
    assert not ds.store_info.built and ds.store_info.path == info.path
    same_items(ds, KDDataset(path, tokenizer=tok, with_topk=True, records=read_records(path)[0]))
    assert not list(root.glob(".tmp-*"))


SLOW_MOD = """
import time
from kdforge.data.store import encode_chunk as real


def slow(chunk):
    time.sleep(0.2)
    return real(chunk)
"""

KILLED_BUILD = """
import sys
sys.path.insert(0, sys.argv[4])
import slowmod
from kdforge.data import store
from kdforge.data.dataset import load_tokenizer
store.encode_chunk = slowmod.slow
store.ensure_store([sys.argv[1]], load_tokenizer(sys.argv[2]), with_topk=True, root=sys.argv[3], workers=2,
                   chunk_bytes=4096)
"""


def test_a_build_killed_midway_leaves_nothing_the_next_build_keeps(tok, tokenizer_dir, tmp_path):
    """SIGKILL on a builder (and its workers) halfway: its hidden folder stays, and the next build of
    these paths removes it (its process is gone) while it keeps another host's and a live process's."""
    import signal
    import socket
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS * 30)])
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "slowmod.py").write_text(SLOW_MOD)
    root = tmp_path / "st"
    p = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(path), str(tokenizer_dir), str(root),
                          str(tmp_path / "mods")], start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(f.stat().st_size for f in root.glob(".tmp-*/tokens.bin")):  # some runs written
        assert p.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    left = list(root.glob(".tmp-*"))
    assert len(left) == 1 and not [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    other_host = root / ".tmp-x-some-other-host-1"
    live = root / f".tmp-x-{socket.gethostname()}-{os.getppid()}"
    other_host.mkdir()
    live.mkdir()
    info = store.ensure_store([path], tok, with_topk=True, root=root, workers=2, chunk_bytes=4096)
    assert info.built and not left[0].exists() and other_host.exists() and live.exists()
    same_items(KDDataset(path, tokenizer=tok, with_topk=True, store_dir=root),
               KDDataset(path, tokenizer=tok, with_topk=True, records=read_records(path)[0]))


def test_read_only_data_folder_falls_back_to_the_cache_and_says_so(tok, tmp_path, monkeypatch):
    data = tmp_path / "ro"
    path = write_jsonl(data / "d.jsonl", synthetic_records(4))
    (data / ".kdforge-store").write_text("not a folder")  # cannot be made a store folder (as root, too)
    monkeypatch.delenv(store.STORE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ds = KDDataset(path, tokenizer=tok)
    assert ds.store_info.path.parent == tmp_path / "cache" / "kdforge" / "store"
    assert "not writable" in ds.store_info.note and store.STORE_ENV in ds.store_info.note
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "chosen"))
    assert KDDataset(path, tokenizer=tok).store_info.path.parent == tmp_path / "chosen"


# ---------------------------------------------------------------- fp16 logprobs: loss and gradient

@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_fp16_stored_logprobs_give_the_fp32_loss_and_gradient(tok, tmp_path, kind):
    """Stored fp16 rows vs the record's fp32 logprobs on hard rows (k=8 logprobs spread over [-25, 0],
    a random student): each logprob is off by <= |logprob| * 2**-11, so the summed loss moves by at
    most 2**-11 * sum over tokens of the row's largest |logprob|; measured: <= 1.3e-3 relative, the
    gradient <= 2.1e-3 of its largest entry. Asserted: the bound, 2e-3 and 5e-3."""
    from kdforge.train.losses import loss_sums

    torch.manual_seed(0)
    recs = [kd_record(tok, t, k=8, seed=n) for n, t in enumerate(TEXTS)]
    ds = KDDataset(write_jsonl(tmp_path / "d.jsonl", recs), tokenizer=tok, with_topk=True)
    for n, rec in enumerate(recs):
        x = ds[n]
        pos = (x["labels"] != -100).nonzero().flatten()[:-1]  # rows with teacher data (EOS has none)
        ids = x["topk_ids"][pos]
        lp32 = torch.tensor([[a["logprob"] for a in e["top"]] for e in rec["teacher_logprobs"]])
        assert torch.equal(ids, torch.tensor([_ids(tok, e) for e in rec["teacher_logprobs"]]))
        assert (x["topk_logprobs"][pos] - lp32).abs().max() <= lp32.abs().max() * 2**-11
        logits = (torch.randn(len(pos), len(tok)) * 3).requires_grad_()
        out = []
        for lps in (x["topk_logprobs"][pos], lp32):
            logits.grad = None
            s = loss_sums(logits, x["labels"][pos], kind=kind, topk_ids=ids, topk_logprobs=lps)
            s.kd.backward()
            out.append((s.kd.detach().clone(), logits.grad.clone()))
        (l16, g16), (l32, g32) = out
        assert abs(l16 - l32) <= 2**-11 * lp32.abs().max(1).values.sum()
        assert abs(l16 - l32) <= 2e-3 * abs(l32)
        assert (g16 - g32).abs().max() <= 5e-3 * g32.abs().max()


def _ids(tok, entry):
    tb = token_bytes(tok)
    return [tb.index(bytes(a["bytes"])) for a in entry["top"]]


# ---------------------------------------------------------------- the CLI: data build, then train reuses it

def test_data_build_then_train_and_its_resume_never_retokenise(tmp_path, tokenizer_dir):
    from train_helpers import train_config

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(60))
    r = run_cli("data", "build", data, "--tokenizer", tokenizer_dir, "--max-seq-length", 16, check=True)
    assert r.stdout.startswith("built token store") and "truncated when read" in r.stdout
    cfg = train_config(tmp_path, tokenizer_dir, data, max_steps=3, save_steps=3, packing=True)
    first = run_cli("train", "--config", cfg, check=True)
    log = first.stdout + first.stderr
    assert re.search(r"data: token store \S+ reused", log), log
    # issue 24: with packing, steps per epoch count packed micro-batches (4 rows of 64 tokens here)
    ds = KDDataset(data, tokenizer_dir, 64)
    from kdforge.train.data_stream import DataStream

    per_epoch = DataStream(ds, 4, 0, packing=True).micro_batches_per_epoch(64)
    assert per_epoch < -(-len(ds) // 4)  # fewer than padded micro-batches of 4
    assert f"3 steps ({per_epoch}/epoch)" in log, log
    cfg = train_config(tmp_path, tokenizer_dir, data, max_steps=5, save_steps=3, packing=True)
    resumed = run_cli("train", "--config", cfg, "--resume", "auto", check=True)
    assert re.search(r"data: token store \S+ reused", resumed.stdout + resumed.stderr)
    assert "built in" not in resumed.stdout + resumed.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(synthetic_records(1)[0]) + "\n\n" + "{nope\n")
    r = run_cli("data", "build", bad, "--tokenizer", tokenizer_dir)
    assert r.returncode == 2 and f"{bad}:3: invalid JSON" in r.stderr


def test_train_on_new_data_reads_it_once_for_the_store_and_the_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    """`kdforge train` on data no store or memo knows: one pass hashes it (the store's key, cut into
    runs for the build, and the checkpoint's fingerprint), not one to fingerprint and one to build;
    the checkpoint keeps that fingerprint, and a resume on edited data is still refused."""
    from conftest import cli_here
    from train_helpers import train_config

    from kdforge.train import checkpoint as ckpt

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(60))
    passes = []
    real = store.scan_chunks

    def counted(path, *a, **kw):
        passes.append(str(path))
        yield from real(path, *a, **kw)

    monkeypatch.setattr(store, "scan_chunks", counted)
    cfg = train_config(tmp_path, tokenizer_dir, data, max_steps=3, save_steps=3)
    cli_here("train", "--config", cfg, check=True)
    assert passes == [str(data)]
    saved = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "out")).data_fingerprint
    assert [(f["size"], f["sha256"]) for f in saved] == [(f["size"], f["sha256"]) for f in store.file_fingerprints([data])]
    with open(data, "a") as f:
        f.write(json.dumps(synthetic_records(1)[0]) + "\n")
    r = cli_here("train", "--config", train_config(tmp_path, tokenizer_dir, data, max_steps=5, save_steps=3),
                 "--resume", "auto")
    assert r.returncode == 2 and "the data changed since the checkpoint" in r.stderr, r.stderr


def test_records_of_a_daemon_batch_are_kept_by_their_bytes_and_mapped_again(tok, tmp_path):
    """A daemon restarted mid-batch maps the batch's store instead of tokenising it again; the next
    batch's store replaces it. Same examples as encoding in memory."""
    path = write_jsonl(tmp_path / "b.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS)])
    records = read_records(path)[0]
    fp = store.file_fingerprints([path])
    before = store.BUILD_COUNT["n"]
    first = KDDataset(path, tokenizer=tok, with_topk=True, records=records, store_dir=tmp_path / "s", fingerprints=fp)
    again = KDDataset(path, tokenizer=tok, with_topk=True, records=records, store_dir=tmp_path / "s", fingerprints=fp)
    assert first.store_info.built and not again.store_info.built and store.BUILD_COUNT["n"] == before + 1
    same_items(again, KDDataset(path, tokenizer=tok, with_topk=True, records=records))
    nxt = write_jsonl(tmp_path / "c.jsonl", [kd_record(tok, "echo 🎉", seed=5)])
    KDDataset(nxt, tokenizer=tok, with_topk=True, records=read_records(nxt)[0], store_dir=tmp_path / "s",
              fingerprints=store.file_fingerprints([nxt]))
    assert [p.name for p in (tmp_path / "s").iterdir() if p.is_dir()] == [
        KDDataset(nxt, tokenizer=tok, with_topk=True, records=read_records(nxt)[0], store_dir=tmp_path / "s",
                  fingerprints=store.file_fingerprints([nxt])).store_info.path.name]


def test_data_validate_counts_lengths_from_the_store_training_then_maps(tok, tokenizer_dir, tmp_path):
    from kdforge.data.quality import validate_files

    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS)])
    rep = validate_files([path], tokenizer_dir)[0]
    ds = KDDataset(path, tokenizer_dir, 512, with_topk=True)
    assert not ds.store_info.built  # data validate built it
    assert rep.lengths["response"]["max"] == max(len(ds.example(i).response_ids) - 1 for i in range(len(ds)))
    assert rep.lengths["prompt"]["min"] == min(len(ds.example(i).prompt_ids) for i in range(len(ds))) > 0


def test_preflight_dataset_counts_from_the_store_what_items_hold(tokenizer_dir, tmp_path):
    from kdforge.preflight.dataset import check_dataset

    long = {"prompt": " ".join(["What is 12 plus 34?"] * 30), "teacher_text": "12 plus 34 is 46. Ça va 🎉"}
    path = write_jsonl(tmp_path / "s.jsonl", [*synthetic_records(6), long, {"text": "alpha 東京"}])
    item = check_dataset(path, str(tokenizer_dir), 32)
    ds = KDDataset(path, tokenizer_dir, 32)
    assert item.status == "pass", item
    assert item.numbers["input_lens"] == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert item.numbers["label_tokens"] == [int((ds[i]["labels"] != -100).sum()) for i in range(len(ds))]
    assert max(item.numbers["input_lens"]) == 32


def test_a_quiet_file_is_not_hashed_again_and_any_write_is_seen(tok, tmp_path, monkeypatch):
    """Reopening maps the store without reading the JSONL again when its stat is unchanged (the
    sha256 memo); a same-size write in place moves mtime/ctime: hashed again, a new store."""
    monkeypatch.setattr(store, "QUIET_S", 0.0)  # the file was written just now (the rule: quiet 2 s)
    path = write_jsonl(tmp_path / "d.jsonl", [kd_record(tok, t, seed=n) for n, t in enumerate(TEXTS)])
    a = KDDataset(path, tokenizer=tok, with_topk=True)
    reads = []
    real = store.scan_file
    monkeypatch.setattr(store, "scan_file", lambda *args, **kw: reads.append(args) or real(*args, **kw))
    b = KDDataset(path, tokenizer=tok, with_topk=True)
    assert not reads and not b.store_info.built and b.store_info.path == a.store_info.path
    assert store.file_fingerprints([path]) == [real(path)[0]]
    raw = bytearray(path.read_bytes())
    i = raw.index(b"Say it")
    with open(path, "r+b") as f:  # same inode, same size, other bytes
        f.seek(i)
        f.write(b"Say IT")
    c = KDDataset(path, tokenizer=tok, with_topk=True)
    assert reads and c.store_info.built and c.store_info.path != a.store_info.path

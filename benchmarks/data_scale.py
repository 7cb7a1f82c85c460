"""KD data at scale (issue 21): the token store against today's JSONL path, at top-20.

Synthetic data in `kdforge generate`'s exact format (id, prompt, teacher_text, messages,
teacher_logprobs with token/logprob/bytes and 20 `top` alternatives, metadata), answers of ~200
tokens, made by this script on a byte-level BPE tokenizer it trains (vocabulary 2,000, words with
accents, CJK and emoji). Every cell runs in a fresh process:

- build: `kdforge data build` (one worker per core); its own time and tokens/s as it reports them;
- store: bytes of the arrays, per token and per stored alternative (JSONL alongside);
- reopen: mapping the built store (`Store.open`), and a whole `KDDataset` open, which hashes the
  JSONL (sha256: the store's key and the checkpoint's fingerprint);
- train: peak RSS (ru_maxrss) of a 3-step `kdforge train` on the toy model with sparse KD (fkl)
  from the stored top-k, the store already built;
- today's path (0.2M tokens only; it holds everything in Python lists): `KDDataset` as of commit
  56d707d (before the store), load time and peak RSS of the load alone.

    python benchmarks/data_scale.py                  # 0.2M, 1M and 5M tokens (5M: ~7.5 GB of JSONL)
    python benchmarks/data_scale.py --sizes 0.2 1    # some sizes (millions of tokens)
    python benchmarks/data_scale.py --quick          # smoke: 5k tokens, build and reopen only
    python benchmarks/data_scale.py --sizes 0.2 --arrow   # the store against HF datasets (Arrow)
    python benchmarks/data_scale.py --sizes 0.2 --cross --no-old   # also: a student on another tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE_STORE = "56d707d"  # the last commit whose KDDataset read JSONL into Python lists
TOP_K = 20
ANSWER_TOKENS = 200
POOL = 300  # distinct answers; records cycle through them with their own id and prompt
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu café naïve déjà façade über "
         "東京 数据 中文 模型 🙂 🎉 the of and to in is for on with as").split()


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("KDFORGE_STORE_DIR", None)  # stores go beside the data, in the work folder
    return e


# ----------------------------------------------------------------------------- synthetic data

def make_tokenizer(out: Path):
    from kdforge.data.tokenizer import token_bytes, train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(2000)]
    tok = train_tokenizer(texts, 2000, out, min_frequency=1)
    return tok, token_bytes(tok)


def _entry(tb: list, i: int, lp: float) -> str:
    """A token entry's fields, in generate's order (client._token: token, logprob, bytes)."""
    return f'"token": {json.dumps(tb[i].decode("utf-8", "replace"))}, "logprob": {lp!r}, "bytes": {json.dumps(list(tb[i]))}'


def _answer(rng: random.Random, tb: list, whole: list[int]) -> tuple[str, str]:
    """(teacher_text, teacher_logprobs JSON) of one ~200-token answer with top-20 rows."""
    ids = [rng.choice(whole) for _ in range(ANSWER_TOKENS)]
    rows = []
    for i in ids:
        alts = rng.sample(range(len(tb)), TOP_K)
        alts = [a for a in alts if tb[a]][:TOP_K]
        if i not in alts:
            alts[rng.randrange(len(alts))] = i
        lps = sorted((round(-rng.expovariate(0.4), 8) for _ in alts), reverse=True)
        chosen = lps[alts.index(i)]
        top = ", ".join(f"{{{_entry(tb, a, lp)}}}" for a, lp in zip(alts, lps))
        rows.append(f'{{{_entry(tb, i, chosen)}, "top": [{top}]}}')
    text = b"".join(tb[i] for i in ids).decode("utf-8")
    return text, "[" + ", ".join(rows) + "]"


def write_data(path: Path, tokens: int, tb: list) -> int:
    """generate-format JSONL of about `tokens` answer tokens; returns the records written."""
    rng = random.Random(1)
    whole = [i for i, b in enumerate(tb) if b and _decodes(b)]
    pool = [_answer(rng, tb, whole) for _ in range(min(POOL, max(1, tokens // ANSWER_TOKENS)))]
    n = max(1, round(tokens / ANSWER_TOKENS))
    with open(path, "w", encoding="utf-8") as f:
        for r in range(n):
            text, lp = pool[r % len(pool)]
            prompt = f"Question {r}: {' '.join(rng.choice(WORDS) for _ in range(12))}"
            meta = {"model": "synthetic-teacher", "source": "bench", "finish_reason": "stop",
                    "tokens": {"prompt": 20, "completion": ANSWER_TOKENS, "total": 20 + ANSWER_TOKENS},
                    "cost_usd": 0.00012, "cached": False, "created": "2026-12-05T00:00:00Z"}
            f.write(f'{{"id": "s{r}", "prompt": {json.dumps(prompt)}, "teacher_text": {json.dumps(text)}, '
                    f'"messages": {json.dumps([{"role": "user", "content": prompt}])}, '
                    f'"teacher_logprobs": {lp}, "metadata": {json.dumps(meta)}}}\n')
    return n


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------- cells

def run(cmd: list[str], timeout: float = 3600) -> tuple[str, float, int]:
    """(output, wall seconds, peak RSS in KiB) of a command in a fresh process (GNU time)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], env=env(), capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS (\d+)", p.stderr)[-1])
    return p.stdout, wall, rss


REOPEN = """
import json, sys, time
t0 = time.perf_counter()
from kdforge.data.store import Store
from kdforge.data.dataset import KDDataset, load_tokenizer
tok = load_tokenizer(sys.argv[2])
t1 = time.perf_counter()
ds = KDDataset(sys.argv[1], tokenizer=tok, max_seq_length=1024, with_topk=True)
t2 = time.perf_counter()
s = Store.open(ds.store_info.path)
t3 = time.perf_counter()
x = ds[len(ds) - 1]
print(json.dumps({"open_all": t2 - t1, "map": t3 - t2, "built": ds.store_info.built, "bytes": s.nbytes(),
                  "alts": int(len(s.alt_ids)), "tokens": int(len(s.tokens)), "path": str(ds.store_info.path)}))
"""

OLD = """
import importlib.util, json, resource, sys, time
spec = importlib.util.spec_from_file_location("old_dataset", sys.argv[3])
mod = importlib.util.module_from_spec(spec)
sys.modules["old_dataset"] = mod  # dataclasses look their module up there
spec.loader.exec_module(mod)
tok = mod.load_tokenizer(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ds = mod.KDDataset(sys.argv[1], tokenizer=tok, max_seq_length=1024, with_topk=True)
print(json.dumps({"load": time.perf_counter() - t0, "examples": len(ds), "base_kib": base}))
"""


ARROW = """
import json, random, sys, time
t0 = time.perf_counter()
import datasets
import numpy as np
t_import = time.perf_counter() - t0
from kdforge.data.dataset import KDDataset
from kdforge.data.store import Store
st = Store.open(sys.argv[1])


def rows():
    for s, n_p, n_r, r0, a0, *_ in np.asarray(st.examples):
        lens = np.asarray(st.row_len[r0:r0 + n_r])
        n = int(lens.sum())
        yield {"input_ids": np.asarray(st.tokens[s:s + n_p + n_r]), "n_prompt": int(n_p), "row_len": lens,
               "alt_ids": np.asarray(st.alt_ids[a0:a0 + n]), "alt_lp": np.asarray(st.alt_lp[a0:a0 + n])}


seq = datasets.Sequence
feats = datasets.Features({"input_ids": seq(datasets.Value("int32")), "n_prompt": datasets.Value("int32"),
                           "row_len": seq(datasets.Value("uint16")), "alt_ids": seq(datasets.Value("int32")),
                           "alt_lp": seq(datasets.Value("float16"))})
out = sys.argv[2]
datasets.Dataset.from_generator(rows, features=feats, cache_dir=out + "/cache").save_to_disk(out + "/ds")
size = sum(p.stat().st_size for p in __import__("pathlib").Path(out + "/ds").rglob("*") if p.is_file())
t = time.perf_counter()
d = datasets.load_from_disk(out + "/ds").with_format("numpy")
t_open = time.perf_counter() - t
t = time.perf_counter()
m = Store.open(sys.argv[1])
t_map = time.perf_counter() - t
idx = [random.Random(0).randrange(len(d)) for _ in range(200)]
t = time.perf_counter()
for i in idx:
    d[i]
t_row = (time.perf_counter() - t) / len(idx)
ds = KDDataset(sys.argv[3], tokenizer=sys.argv[4], max_seq_length=1024, with_topk=True)
t = time.perf_counter()
for i in idx:
    ds[i]
t_item = (time.perf_counter() - t) / len(idx)
print(json.dumps({"arrow_bytes": size, "store_bytes": m.nbytes(), "alts": int(len(m.alt_ids)), "import": t_import,
                  "arrow_open": t_open, "store_map": t_map, "arrow_row": t_row, "store_item": t_item}))
"""


def arrow(work: Path, tok_dir: Path) -> None:
    """The same arrays as an HF `datasets` (Arrow) dataset: size, reopen, a row, the import."""
    data = work / "kd.jsonl"
    from kdforge.data.dataset import KDDataset

    folder = KDDataset(data, tokenizer=str(tok_dir), max_seq_length=1024, with_topk=True).store_info.path
    out, _, _ = run([sys.executable, "-c", ARROW, str(folder), str(work / "arrow"), str(data), str(tok_dir)])
    a = json.loads(out.strip().splitlines()[-1])
    print(f"\nArrow (HF datasets) with the same arrays: {a['arrow_bytes'] / 1e6:.1f} MB "
          f"({a['arrow_bytes'] / a['alts']:.2f} B per alternative) vs the store's {a['store_bytes'] / 1e6:.1f} MB; "
          f"reopen {a['arrow_open'] * 1e3:.1f} ms vs {a['store_map'] * 1e3:.2f} ms; a row {a['arrow_row'] * 1e3:.2f} ms "
          f"vs KDDataset.item (padded tensors) {a['store_item'] * 1e3:.2f} ms; `import datasets` {a['import']:.1f} s")


def train_config(work: Path, tok_dir: Path, data: Path) -> Path:
    import yaml

    cfg = {"model": {"preset": "toy", "max_seq_len": 256},
           "io": {"tokenizer_path": str(tok_dir), "train_shards": [str(data)], "output_dir": str(work / "out")},
           "loss": {"kind": "fkl"},
           "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [256], "max_steps": 3, "lr": 1e-3,
                     "warmup_steps": 1, "save_steps": 1000, "seed": 0}}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def reopen(data: Path, tok) -> dict:
    """REOPEN's numbers, in this process."""
    from kdforge.data.dataset import KDDataset
    from kdforge.data.store import Store

    t1 = time.perf_counter()
    ds = KDDataset(data, tokenizer=tok, max_seq_length=1024, with_topk=True)
    t2 = time.perf_counter()
    s = Store.open(ds.store_info.path)
    t3 = time.perf_counter()
    return {"open_all": t2 - t1, "map": t3 - t2, "built": ds.store_info.built, "bytes": s.nbytes(),
            "alts": int(len(s.alt_ids)), "tokens": int(len(s.tokens))}


def cell(tokens: int, work: Path, tok_dir: Path, tok, tb: list, quick: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "kd.jsonl"
    t0 = time.perf_counter()
    records = write_data(data, tokens, tb)
    row = {"records": records, "jsonl_bytes": data.stat().st_size, "made_s": time.perf_counter() - t0}
    if quick:  # in this process: the smoke test spares two interpreter starts
        from kdforge.data.store import ensure_store

        b = ensure_store([data], tok, with_topk=True)
        row.update(build_s=b.seconds, build_tok_s=b.tokens / b.seconds)
        info = reopen(data, tok)
    else:
        out, wall, rss = run([sys.executable, "-m", "kdforge", "data", "build", str(data), "--tokenizer", str(tok_dir)])
        m = re.search(r"in ([\d.]+) s, ([\d,]+) tokens/s", out)
        row.update(build_s=float(m.group(1)), build_tok_s=float(m.group(2).replace(",", "")), build_rss_kib=rss)
        out, _, _ = run([sys.executable, "-c", REOPEN, str(data), str(tok_dir)])
        info = json.loads(out.strip().splitlines()[-1])
    assert not info["built"], "reopen rebuilt the store"
    row.update(map_s=info["map"], open_s=info["open_all"], store_bytes=info["bytes"], alts=info["alts"],
               tokens=info["tokens"])
    if not quick:
        out, wall, rss = run([sys.executable, "-m", "kdforge", "train", "--config", str(train_config(work, tok_dir, data))])
        assert "reused" in out, out[-2000:]
        row.update(train_rss_kib=rss, train_s=wall)
    return row


def cross_cell(work: Path) -> dict:
    """The first size's data built for a student on ANOTHER tokenizer (an API teacher's case: every
    row carried by bytes): a byte-level BPE trained here on other text with 600 tokens."""
    from kdforge.data.tokenizer import train_tokenizer

    rng = random.Random(7)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(2000)]
    stok = work / "student_tok"
    train_tokenizer(texts, 600, stok, min_frequency=1)
    out, wall, rss = run([sys.executable, "-m", "kdforge", "data", "build", str(work / "kd.jsonl"), "--tokenizer",
                          str(stok)])
    m = re.search(r"in ([\d.]+) s, ([\d,]+) tokens/s", out)
    return {"build_s": float(m.group(1)), "build_tok_s": float(m.group(2).replace(",", "")), "rss_kib": rss,
            "carried": re.search(r"carried[^\n]*", out).group(0) if "carried" in out else ""}


def old_path(tokens: int, work: Path, tok_dir: Path, tb: list) -> dict | None:
    """Today's JSONL path as of BEFORE_STORE (None without git history)."""
    old = work / "old_dataset.py"
    p = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_STORE}:src/kdforge/data/dataset.py"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return None
    old.write_text(p.stdout)
    data = work / "kd.jsonl"
    if not data.exists():
        write_data(data, tokens, tb)
    out, wall, rss = run([sys.executable, "-c", OLD, str(data), str(tok_dir), str(old)])
    info = json.loads(out.strip().splitlines()[-1])
    return {"load_s": info["load"], "rss_kib": rss, "jsonl_bytes": data.stat().st_size}


# ----------------------------------------------------------------------------- report

def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(rows: dict[float, dict], old: dict | None, quick: bool) -> None:
    print("\n| tokens | records | JSONL | store | B/token | B/alternative | build | build tokens/s | "
          "reopen (map) | open incl. sha256 | train 3 steps: peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in rows.items():
        rss = f"{r['train_rss_kib'] / 1024:,.0f} MB" if "train_rss_kib" in r else "-"
        print(f"| {r['tokens']:,} | {r['records']:,} | {mb(r['jsonl_bytes'])} | {mb(r['store_bytes'])} | "
              f"{r['store_bytes'] / r['tokens']:.1f} | {r['store_bytes'] / max(r['alts'], 1):.2f} | "
              f"{r['build_s']:.1f} s | {r['build_tok_s']:,.0f} | {r['map_s'] * 1000:.1f} ms | {r['open_s']:.2f} s | "
              f"{rss} |")
    if old:
        first = next(iter(rows.values()))
        print(f"\ntoday's JSONL path ({BEFORE_STORE}, KDDataset with_topk, load alone) on the "
              f"{first['tokens']:,}-token file: {old['load_s']:.1f} s, peak RSS {old['rss_kib'] / 1024:,.0f} MB "
              f"({old['rss_kib'] * 1024 / first['tokens']:,.0f} B/token); JSONL {old['jsonl_bytes'] / first['tokens']:,.0f} "
              f"B/token ({old['jsonl_bytes'] / max(first['alts'], 1):.0f} B per stored alternative)")
    trained = [r for r in rows.values() if "train_rss_kib" in r]
    if len(trained) >= 2:
        a, b = trained[0], trained[-1]
        grow = (b["train_rss_kib"] - a["train_rss_kib"]) * 1024 / (b["tokens"] - a["tokens"])
        print(f"\ntraining peak RSS grows {grow:,.1f} B per dataset token between {a['tokens']:,} and {b['tokens']:,} "
              "tokens (goal <= 1 KB)")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (shared: wall times move with it)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.2, 1, 5], help="millions of answer tokens")
    ap.add_argument("--quick", action="store_true", help="5k tokens: build and reopen only (a smoke test)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--no-old", action="store_true", help="skip today's JSONL path")
    ap.add_argument("--cross", action="store_true", help="also: the first size built for a student on another "
                    "tokenizer (rows carried by bytes, an API teacher's case)")
    ap.add_argument("--arrow", action="store_true", help="only: the first size's store against HF datasets "
                    "(Arrow) holding the same arrays (needs `datasets`)")
    args = ap.parse_args(argv)
    sizes = [0.005] if args.quick else args.sizes
    work = args.work or Path(tempfile.mkdtemp(prefix="kdforge-data-scale-"))
    print(f"data_scale: sizes {sizes} M tokens, top-{TOP_K}, answers of {ANSWER_TOKENS} tokens; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; work {work}", flush=True)
    try:
        sys.path.insert(0, str(REPO / "src"))
        tok, tb = make_tokenizer(work / "tok")
        rows, old = {}, None
        for size in sizes:
            tokens = int(size * 1e6)
            rows[size] = cell(tokens, work / f"{size:g}M", work / "tok", tok, tb, args.quick or args.arrow)
            print(f"  {size:g}M done: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[size].items()})}",
                  flush=True)
            if args.arrow:
                arrow(work / f"{size:g}M", work / "tok")
                return
            if size == sizes[0] and not args.quick and not args.no_old:
                old = old_path(tokens, work / f"{size:g}M", work / "tok", tb)
            if size == sizes[0] and args.cross:
                c = cross_cell(work / f"{size:g}M")
                print(f"  another tokenizer (rows carried): build {c['build_s']:.1f} s, {c['build_tok_s']:,.0f} "
                      f"tokens/s, peak RSS {c['rss_kib'] / 1024:,.0f} MB; {c['carried'][:160]}", flush=True)
            shutil.rmtree(work / f"{size:g}M" / "out", ignore_errors=True)
            if size != sizes[0]:
                (work / f"{size:g}M" / "kd.jsonl").unlink(missing_ok=True)  # disk: 5M tokens is ~7.5 GB
        report(rows, old, args.quick)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

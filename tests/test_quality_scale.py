"""`kdforge data validate` at scale (issue 21 §4): token counts through the dataset's one prompt
rendering (`dataset.prompt_text`), also for a tokenizer without a chat template, and duplicate /
near-duplicate checks that keep digests and MinHash signatures, not the records (memory grows by
bytes a record, not by the text). Real tokenizer, real files, non-ASCII text."""

from __future__ import annotations

import json
import tracemalloc

from conftest import write_jsonl

from kdforge.data.dataset import KDDataset, load_tokenizer
from kdforge.data.quality import render, token_lengths, validate_file

ROOTS = ["été", "naïve", "東京", "日本語", "😀", "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]
WORDS = [f"{a}{b}{n}" for n in range(20) for a in ROOTS for b in ROOTS[:8]]  # 1,920 words


def _rows(n: int, words: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"id": f"r{i}", "prompt": f"Question {i} — {' '.join(rng.choices(WORDS, k=6))}",
             "teacher_text": " ".join(rng.choices(WORDS, k=words)), "metadata": {"source": ["a", "b"][i % 2]}}
            for i in range(n)]


def test_counts_render_prompts_as_training_does_with_and_without_a_template(tokenizer_dir, tmp_path):
    rows = _rows(6, 12) + [{"text": "texte brut 東京"}, {"messages": [
        {"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Quoi ? 😀"},
        {"role": "assistant", "content": "Rien."}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for template in (True, False):
        tok = load_tokenizer(str(tokenizer_dir))
        if not template:
            tok.chat_template = None  # a base model's tokenizer: prompt_text's documented fallback
        ds = KDDataset(path, tokenizer=tok, max_seq_length=1 << 20, store_dir=tmp_path / f"s{template}")
        p, c = token_lengths(path, tok)
        assert p == [len(ds.example(i).prompt_ids) for i in range(len(ds))], template
        assert c == [len(ds.example(i).response_ids) - 1 for i in range(len(ds))]  # without EOS
        assert p[6] == 0 and all(x > 0 for x in p[:6])
    bare = tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert p[0] > len(bare)  # "User: ...\nAssistant: " counts, not the bare prompt


def test_duplicate_checks_keep_bytes_per_record_not_the_text(tmp_path):
    rows = _rows(800, 600)
    rows += [dict(rows[3], id="again")]  # an exact duplicate
    rows += [dict(rows[5], id="near", teacher_text=rows[5]["teacher_text"] + " golf")]  # a near duplicate
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        rep = validate_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 8_000_000  # the text alone, as str, would be more than the file's bytes
    assert peak < size / 3, f"validate held {peak:,} bytes for a {size:,}-byte file"
    assert (rep.valid, rep.exact_duplicates, rep.duplicate_prompts, rep.duplicate_ids) == (802, 1, 1, 0)
    assert rep.near_duplicates == [(802, 6, rep.near_duplicates[0][2])] and rep.near_duplicates[0][2] >= 0.8


def test_line_numbers_survive_odd_line_breaks_and_candidates_read_back(tmp_path):
    """Lines are numbered as str.splitlines numbers the text (\\r, \\u2028 split a physical line);
    near duplicates found in such a file name the right lines."""
    a = {"prompt": "Décris Tokyo", "teacher_text": "Tokyo est la capitale du Japon et une très grande ville 東京"}
    b = {"prompt": "Décris Tokyo encore", "teacher_text": a["teacher_text"] + " moderne"}
    text = json.dumps(a) + "\r" + "{\"prompt\": \"x\u2028y\"}\n" + json.dumps(b) + "\r\n"
    path = tmp_path / "odd.jsonl"
    path.write_bytes(text.encode("utf-8"))
    rep = validate_file(path)
    assert rep.lines == 4 and rep.valid == 2 and [ln for ln, _ in rep.unusable] == [2, 3]
    assert [(i, j) for i, j, _ in rep.near_duplicates] == [(4, 1)]
    assert "near-duplicate response: line 4 ~ line 1" in render([rep])

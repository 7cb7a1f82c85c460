"""How many token ids a tokenizer folder gives, read without importing transformers.

Config validation needs only this number (a student's vocabulary must cover the tokenizer's), and
importing transformers costs ~1.5 s on a small machine: `kdforge config validate` should not.
"""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_vocab_size(path: str | Path) -> int:
    """`len(AutoTokenizer.from_pretrained(path))`: the base vocabulary plus added and special tokens.

    A folder with a `tokenizer.json` is read with the `tokenizers` library, the special tokens its
    tokenizer_config.json / special_tokens_map.json name added as transformers adds them; any other
    folder (SentencePiece only, a hub id) goes through transformers itself."""
    size = _fast_vocab_size(Path(path))
    if size is not None:
        return size
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))


def _fast_vocab_size(folder: Path) -> int | None:
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    specials = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            specials += _special_contents(json.loads(f.read_text(encoding="utf-8")))
    # add_special_tokens skips those already in the vocabulary, as transformers does when loading.
    tok.add_special_tokens(sorted(set(specials)))
    return tok.get_vocab_size(with_added_tokens=True)


def _special_contents(conf: dict) -> list[str]:
    """Every special token string a tokenizer config names: `*_token` fields, the extra/additional
    special token lists and the added_tokens_decoder table (strings or {"content": ...} dicts)."""
    def text(v) -> str | None:
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and v else None

    out = [text(v) for k, v in conf.items() if k.endswith("_token")]
    for k in ("extra_special_tokens", "additional_special_tokens"):
        vals = conf.get(k) or []
        out += [text(v) for v in (vals.values() if isinstance(vals, dict) else vals)]
    out += [text(v) for v in (conf.get("added_tokens_decoder") or {}).values()]
    return [t for t in out if t]

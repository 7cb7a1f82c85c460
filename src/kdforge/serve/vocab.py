"""What the API says about one token: its text and its raw bytes.

OpenAI reports, per token, `token` (the token's own text) and `bytes` (its UTF-8 bytes, so a
client can rebuild characters split across tokens). Here `token` is `tokenizer.decode([id])`
and `bytes` is the token's raw byte string: exact for byte-level BPE (GPT-2 / Llama-3 / Qwen /
kdforge tokenizers) and SentencePiece byte-fallback pieces (`<0x0A>`), the UTF-8 of the
decoded text otherwise (special tokens, unknown schemes).
"""

from __future__ import annotations

import re
from functools import lru_cache

_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet -> byte value (the inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    try:
        from tokenizers import decoders

        dec = tokenizer.backend_tokenizer.decoder
    except (AttributeError, ImportError):
        return False
    if isinstance(dec, decoders.ByteLevel):
        return True
    return isinstance(dec, decoders.Sequence) and "ByteLevel" in repr(dec)


class Vocab:
    """Token id -> (text, raw bytes), computed on first use and remembered."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def decode(self, ids: list[int]) -> str:
        """The text of a token sequence, special tokens included, nothing cleaned up, so that the
        text of a completion is exactly what its tokens spell."""
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def text(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self._text[token_id] = self.decode([token_id])
        return t

    def bytes(self, token_id: int) -> list[int]:
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = list(self._raw_bytes(token_id))
        return b

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if token_id in self._special or not isinstance(piece, str):
            return self.text(token_id).encode("utf-8")
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        m = _SP_BYTE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "▁" in piece:  # SentencePiece marks a leading space with U+2581
            return piece.replace("▁", " ").encode("utf-8")
        return self.text(token_id).encode("utf-8")

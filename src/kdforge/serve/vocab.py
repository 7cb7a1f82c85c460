"""What the API says about one token: its text and its raw bytes.

OpenAI reports, per token, `token` (the token's own text) and `bytes` (its UTF-8 bytes, so a
client can rebuild characters split across tokens). Here `token` is `tokenizer.decode([id])`
and `bytes` is the token's raw byte string: exact for byte-level BPE (GPT-2 / Llama-3 / Qwen /
kdforge tokenizers) and SentencePiece byte-fallback pieces (`<0x0A>`), the UTF-8 of the
decoded text otherwise (special tokens, unknown schemes).
"""

from __future__ import annotations

from kdforge.data.tokenizer import is_byte_level, piece_bytes, special_ids


class Vocab:
    """Token id -> (text, raw bytes), computed on first use and remembered."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._byte_level = is_byte_level(tokenizer)
        self._special = special_ids(tokenizer)
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
        b = piece_bytes(self._tok, token_id, self._tok.convert_ids_to_tokens(token_id),
                        byte_level=self._byte_level, special=self._special)
        return b if b is not None else self.text(token_id).encode("utf-8")  # the API always says some bytes

"""`kdforge tokenizer train`: a byte-level BPE tokenizer with ChatML special tokens and a chat
template, saved so that `AutoTokenizer.from_pretrained(DIR)` loads it."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from kdforge.errors import DataError, UsageError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML. The assistant turn ends with <|im_end|>, which is also the EOS token, so generation
# stops at the end of the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def texts_from_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every text a tokenizer should see: prompt and response of each JSONL record (any
    accepted format), or each line of a plain-text file."""
    from kdforge.data.records import parse_record

    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError("file not found", str(path))
        jsonl = path.suffix in (".jsonl", ".json")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not jsonl:
                    yield line.rstrip("\n")
                    continue
                try:
                    rec = parse_record(json.loads(line))
                except (ValueError, json.JSONDecodeError) as e:
                    raise DataError(f"unusable line ({e}); fix or remove it", str(path), i) from None
                for m in rec.prompt_messages or []:
                    yield m["content"]
                yield rec.response


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path, min_frequency: int = 2,
                    model_max_length: int = 4096):
    """Train, save to `out`, and return the loaded `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UsageError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)


# ----------------------------------------------------------------------------- raw bytes of tokens
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback piece


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet -> byte value (the inverse of `bytes_to_unicode`)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's pieces are GPT-2 byte-level (GPT-2, Llama-3, Qwen, kdforge's own)."""
    dec = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return dec is not None and "ByteLevel" in repr(dec)


def piece_bytes(tokenizer, token_id: int, piece, *, byte_level: bool, special: set[int]) -> bytes | None:
    """The raw bytes of one token, None where only a lossy text is known.

    Byte-level BPE: the vocabulary piece read back through GPT-2's bytes<->unicode table, so a token
    holding half of a UTF-8 character has its real bytes (its decoded text is only "\ufffd").
    SentencePiece: a byte-fallback piece `<0xNN>` is that byte; U+2581 in a piece is the space it
    stands for (decoding one token alone drops a leading one). Special and added tokens, and other
    schemes: the UTF-8 of the decoded text, unless that text is lossy.
    """
    if token_id not in special and isinstance(piece, str):
        if byte_level:
            table = _byte_alphabet()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        m = _SP_BYTE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:
            return piece.replace("\u2581", " ").encode("utf-8")
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return None if "\ufffd" in text else text.encode("utf-8")


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or {})


def token_bytes(tokenizer) -> list[bytes | None]:
    """The raw bytes of every token id (None where unknown): `piece_bytes` over the vocabulary. The
    one table both sides use: the dataset aligns teacher tokens by it, `kdforge serve` reports it."""
    byte_level, special = is_byte_level(tokenizer), special_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [piece_bytes(tokenizer, i, p, byte_level=byte_level, special=special) for i, p in enumerate(pieces)]

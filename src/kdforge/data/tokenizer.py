"""`kdforge tokenizer train`: a byte-level BPE tokenizer with ChatML special tokens and a chat
template, saved so that `AutoTokenizer.from_pretrained(DIR)` loads it."""

from __future__ import annotations

import json
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
    return AutoTokenizer.from_pretrained(str(out))

"""One table of raw token bytes (kdforge.data.tokenizer.token_bytes): the dataset aligns teacher
tokens by it and `kdforge serve` reports it. For any text, accents, CJK and emoji included, the
bytes of its tokens spell its UTF-8 exactly, for a byte-level BPE and for a SentencePiece-style
tokenizer with byte fallback (where decoding one token alone drops the space its U+2581 stands for,
and a character split into <0xNN> pieces decodes to U+FFFD)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdforge.data.tokenizer import token_bytes
from kdforge.serve.vocab import Vocab

@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-2-style tokenizer: BPE over U+2581-marked words, byte fallback for what it lacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "\u2581abcdefghijklmnopqrstuvwxyzé":
        vocab[ch] = len(vocab)
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ("c", "a"), ("ca", "f"), ("caf", "é")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(content=" ", left=1, right=0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bl_tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_token_bytes_spell_the_text_on_both_kinds_of_tokenizer(bl_tok, sp_tok, text):
    for tok, lead in ((bl_tok, b""), (sp_tok, b" ")):  # SentencePiece marks the start as a space
        table = token_bytes(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spelled = [table[i] for i in ids]
        assert None not in spelled, (text, ids)
        assert b"".join(spelled) == lead + text.encode("utf-8"), (text, spelled)


@pytest.mark.parametrize("text", ["a 日本 b", "héllo 🙂 wörld", "naïve"])
def test_serve_reports_the_same_bytes_the_dataset_aligns_by(bl_tok, sp_tok, text):
    for tok in (bl_tok, sp_tok):
        table, vocab = token_bytes(tok), Vocab(tok)
        for i in tok(text, add_special_tokens=False)["input_ids"]:
            assert bytes(vocab.bytes(i)) == table[i], (tok, i)


def test_a_byte_fallback_fragment_has_its_byte_not_its_lossy_text(sp_tok):
    ids = sp_tok("日", add_special_tokens=False)["input_ids"]
    pieces = sp_tok.convert_ids_to_tokens(ids)
    frag = [i for i, p in zip(ids, pieces) if p.startswith("<0x")]
    assert frag, pieces  # the character is not in the vocabulary: it is split into byte pieces
    assert "\ufffd" in sp_tok.decode([frag[0]])  # what the old text-based mapping saw
    assert token_bytes(sp_tok)[frag[0]] == bytes([int(pieces[ids.index(frag[0])][3:5], 16)])

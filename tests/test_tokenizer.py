"""ksdk.tokenizer against Hugging Face `tokenizers` on the real DeepSeek tokenizer.json."""

from __future__ import annotations

import random
import time
import unicodedata
from pathlib import Path

import gguf
import pytest
import regex
import tokenizers

from ksdk.chat import deepseek_r1_chat_template
from ksdk.errors import ModelFileError, UnsupportedModelError
from ksdk.testing.tokenizer_data import deepseek_tokenizer_fields, tokenizer_json_path, write_tokenizer
from ksdk.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(deepseek_tokenizer_fields())


@pytest.fixture(scope="session")
def hf() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tokenizer_json_path()))


# -- a deterministic corpus of varied strings ----------------------------------------------------------

_WORDS = (
    "the quick brown fox jumps over lazy dog Hello World don't it's we'll I'M tokenizer DeepSeek "
    "naïve café résumé Übermaß straße ÆSIR Ελληνικά русский язык العربية עברית हिन्दी ไทย"
).split()
_CODE = [
    "def f(x):\n    return x**2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "if x!=y&&z>=0:\n\tprint(f\"{x!r}\")",
    "#include <stdio.h>\nint main(){printf(\"hi\\n\");}",
    "SELECT * FROM t WHERE id=42 AND name LIKE '%ab%';",
    "<div class=\"a\">x</div>  // TODO: fix\r\n",
    "x = [1,2,3]; y = {'a': 1.5e-3}",
]
_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
             "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜fim▁hole｜>"]
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n", "\u3000", "\u00a0", " \n\n  ", "\n \t"]


def _chars(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


_UNASSIGNED = regex.compile(r"\p{Cn}")


def _unicode_version_dependent(ch: str) -> bool:
    # Assigned after Unicode 14 (Python 3.11's table): `regex` and HF's Oniguruma know different Unicode
    # versions, so such characters' categories (letter or not) differ between the two engines.
    return unicodedata.category(ch) == "Cn" and not _UNASSIGNED.match(ch)


def _random_unicode(rng: random.Random, n: int) -> str:
    out: list[str] = []
    while len(out) < n:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x2FFF), rng.randint(0x3000, 0xFFFF),
                         rng.randint(0x10000, 0x10FFFF)])
        ch = chr(cp)
        # Lone surrogates cannot cross into HF's Rust strings.
        if not 0xD800 <= cp <= 0xDFFF and not _unicode_version_dependent(ch):
            out.append(ch)
    return "".join(out)


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 8))) + rng.choice(["", ".", "!", "?", ","])
    if kind == 1:  # Chinese with punctuation
        return _chars(rng, 0x4E00, 0x9FA5, rng.randint(1, 10)) + rng.choice(["", "，", "。", "？", "、"])
    if kind == 2:  # Japanese kana + kanji
        return _chars(rng, 0x3040, 0x30FF, rng.randint(1, 6)) + _chars(rng, 0x4E00, 0x9FFF, rng.randint(0, 3))
    if kind == 3:  # Korean
        return _chars(rng, 0xAC00, 0xD7A3, rng.randint(1, 6))
    if kind == 4:
        return rng.choice(_CODE)
    if kind == 5:  # digit runs, including non-ASCII \p{N}
        digits = "0123456789" * 3 + "٠١٢３４５²³½ⅫⅣ"
        run = "".join(rng.choice(digits) for _ in range(rng.randint(1, 11)))
        return rng.choice(["", "x", "abc", "$", " "]) + run + rng.choice(["", "px", ".5", ",000", " "])
    if kind == 6:  # emoji: single, skin tone, ZWJ family, flag
        return rng.choice(["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🙈🙉🙊", "❤️", "🤖"]) * rng.randint(1, 3)
    if kind == 7:
        return rng.choice(_SPACES) * rng.randint(1, 3)
    if kind == 8:  # Latin glued to CJK
        return rng.choice(_WORDS) + _chars(rng, 0x4E00, 0x9FA5, rng.randint(1, 4)) + rng.choice(["abc", "x1", ""])
    if kind == 9:
        return rng.choice(_SPECIALS)
    if kind == 10:
        return _random_unicode(rng, rng.randint(1, 8))
    return "".join(rng.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") for _ in range(rng.randint(1, 4))) + rng.choice(
        ["abc", "", "Z", " "]
    )


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [_fragment(rng) for _ in range(rng.randint(1, 6))]
        texts.append("".join(p + rng.choice(["", "", " ", "\n", "\t"]) for p in parts))
    return texts


# -- encode / decode -------------------------------------------------------------------------------------

def test_matches_hf_on_5000_varied_strings(tok: Tokenizer, hf: tokenizers.Tokenizer) -> None:
    texts = _corpus(5000)
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    start = time.perf_counter()
    got = [tok.encode(t) for t in texts]
    elapsed = time.perf_counter() - start
    mismatches = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    assert elapsed < 10, f"encoding 5000 strings took {elapsed:.1f}s"


def test_decode_inverts_encode(tok: Tokenizer) -> None:
    for text in _corpus(2000, seed=1):
        assert tok.decode(tok.encode(text)) == text


def test_decode_matches_hf(tok: Tokenizer, hf: tokenizers.Tokenizer) -> None:
    # GGUF marks <｜User｜> and the like CONTROL although HF's file does not flag them special, so
    # skip_special_tokens drops a superset of what HF drops.
    hf_special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    assert hf_special <= tok.special_ids
    for text in _corpus(300, seed=2):
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        kept = [i for i in ids if i not in tok.special_ids]
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(kept, skip_special_tokens=True)


def test_special_tokens_by_text(tok: Tokenizer) -> None:
    user, think = tok.token_id("<｜User｜>"), tok.token_id("<think>")
    assert user is not None and think is not None
    assert user in tok.special_ids  # control token
    assert think not in tok.special_ids  # user-defined: kept by skip_special_tokens, like HF
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.token_id(tok.bos_token) == tok.bos_token_id
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.eos_token_id in tok.special_ids
    assert tok.vocab_size == 129280
    assert tok.token_id("no such token text") is None
    assert tok.token_text(tok.encode(" hello")[0]) == "Ġhello"


def test_allow_special_false_keeps_control_text_as_text(tok: Tokenizer) -> None:
    text = "a<｜User｜>b<think>c"
    ids = tok.encode(text, allow_special=False)
    assert tok.token_id("<｜User｜>") not in ids
    assert tok.token_id("<think>") in ids  # user-defined tokens are always matched (llama.cpp does the same)
    assert tok.decode(ids) == text
    assert tok.token_id("<｜User｜>") in tok.encode(text)


def test_add_bos(tok: Tokenizer) -> None:
    assert tok.encode("hi", add_bos=True) == [tok.bos_token_id, *tok.encode("hi")]
    assert tok.encode("", add_bos=True) == [tok.bos_token_id]
    assert tok.encode("") == []


def test_lone_surrogate_becomes_replacement(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_decode_rejects_bad_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([tok.vocab_size])


# -- metadata --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("key", "value"), [("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "qwen2")]
)
def test_unsupported_tokenizer_is_refused(key: str, value: str) -> None:
    metadata = {**deepseek_tokenizer_fields(), key: value}
    with pytest.raises(UnsupportedModelError, match=value):
        Tokenizer.from_gguf_metadata(metadata)


def test_missing_key_is_a_model_file_error() -> None:
    metadata = dict(deepseek_tokenizer_fields())
    del metadata["tokenizer.ggml.token_type"]
    with pytest.raises(ModelFileError, match="token_type"):
        Tokenizer.from_gguf_metadata(metadata)


def test_fields_pad_to_model_vocab() -> None:
    fields = deepseek_tokenizer_fields(vocab_size=129290)
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == 129290
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD129289]"
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    padded = Tokenizer.from_gguf_metadata(fields)
    assert 129289 in padded.special_ids and padded.encode("[PAD129289]") != [129289]
    with pytest.raises(ValueError, match="vocab_size"):
        deepseek_tokenizer_fields(vocab_size=1000)


def test_write_tokenizer_adds_every_field() -> None:
    writer = gguf.GGUFWriter(None, "deepseek2")
    write_tokenizer(writer, vocab_size=129290)
    written = {key: v.value for key, v in writer.kv_data[0].items()}
    fields = deepseek_tokenizer_fields(vocab_size=129290)
    for key, value in fields.items():
        assert written[key] == value, key
    assert written["tokenizer.chat_template"] == deepseek_r1_chat_template()


@pytest.mark.slow
def test_write_tokenizer_round_trips_through_a_file(tmp_path: Path, tok: Tokenizer) -> None:
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2")
    write_tokenizer(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)  # parses 129k strings: about 8 s
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    assert Tokenizer.from_gguf_metadata(metadata).encode("héllo 世界 123") == tok.encode("héllo 世界 123")


# -- incremental detokenizer ---------------------------------------------------------------------------

def test_incremental_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) == 2  # byte-level BPE splits this emoji mid-character
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids[1:]) == "😀"
    assert detok.flush() == ""


@pytest.mark.parametrize("text", ["😀👍🏽 中文字符 한국어 ﾃｽﾄ", "abc中文𠮷野家🇫🇷", "日本語のテキスト👨‍👩‍👧"])
def test_incremental_one_token_at_a_time_equals_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_random_byte_tokens_equal_decode(tok: Tokenizer) -> None:
    # Arbitrary byte tokens make invalid UTF-8 too; the stream must still match decode() exactly.
    rng = random.Random(3)
    byte_ids = [tok.encode(bytes([b]).decode("latin-1"))[0] for b in range(0x20, 0x7F)]
    byte_ids += [i for i in range(tok.vocab_size) if len(tok.decode_bytes([i])) == 1 and tok.decode_bytes([i])[0] >= 0x80]
    ids = [rng.choice(byte_ids) for _ in range(400)]
    detok = IncrementalDetokenizer(tok)
    out = []
    pos = 0
    while pos < len(ids):
        step = rng.randint(1, 4)
        out.append(detok.push(ids[pos : pos + step]))
        pos += step
    assert "".join(out) + detok.flush() == tok.decode(ids)


def test_incremental_skip_special(tok: Tokenizer) -> None:
    ids = tok.encode("hi<｜end▁of▁sentence｜>")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert detok.push(ids) + detok.flush() == "hi"

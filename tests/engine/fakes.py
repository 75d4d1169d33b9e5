"""A fake model and tokenizer that honor the engine's contracts exactly and really use the KV cache.

The fake model writes an integer-valued latent per token at ``meta.slot_mapping`` and computes each
sequence's logits from everything its page table points at (weighted by position), so any page-table,
slot or prefix-cache bug changes its outputs. All arithmetic is exact, so it is batch invariant.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ksdk.engine import Engine, EngineConfig
from ksdk.layers.attention_metadata import AttentionMetadata

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?-ABCDEFGH"
BOS, EOS = 0, 1
VOCAB = 2 + len(CHARS)


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    num_layers: int = 2
    vocab_size: int = VOCAB
    context_length: int = 256


class FakeModel:
    kv_cache_dim = 4
    kv_dtype = torch.float32

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.config = FakeConfig()
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randint(0, 10, (VOCAB, self.kv_cache_dim), generator=g).float().to(device)  # [V, D]
        self.head = torch.randint(0, 10, (self.kv_cache_dim, VOCAB), generator=g).double().to(device)  # [D, V]
        self.forward_calls = 0
        self.fail_on_token: int | None = None  # forward raises on a batch holding it at position 1
        self.delay_s = 0.0  # a slow forward, as a big model's

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[torch.Tensor]) -> torch.Tensor:
        self.forward_calls += 1
        time.sleep(self.delay_s)
        if self.fail_on_token is not None and bool(((input_ids == self.fail_on_token) & (positions == 1)).any()):
            raise RuntimeError("fake model failure")
        latents = self.embed[input_ids] * (positions % 5 + 1)[:, None].float()  # [T, D]
        for layer, cache in enumerate(kv_cache):
            cache.view(-1, self.kv_cache_dim)[meta.slot_mapping] = latents + layer
        ps, rows = meta.page_size, []
        for i, n in enumerate(meta.seq_lens_host):
            pages = meta.page_table[i, : -(-n // ps)].long()
            hist = torch.stack([c[pages].reshape(-1, self.kv_cache_dim)[:n] for c in kv_cache])  # [L, n, D]
            weights = torch.arange(1, n + 1, dtype=torch.float32, device=self.device)[None, :, None]
            summary = (hist * weights).sum(dim=(0, 1)).double()  # [D], exact integers
            rows.append((summary @ self.head) % 97 / 10.0)  # [V]
        logits = torch.stack(rows).float()  # [B, V]
        logits[:, BOS] = float("-inf")  # like a real model, never start a new document
        return logits


class FakeTokenizer:
    eos_token_id = EOS
    bos_token_id = BOS
    add_bos = True

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + [2 + CHARS.index(c) for c in text]

    def token_text(self, token_id: int) -> str:
        return "" if token_id < 2 else CHARS[token_id - 2]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.token_text(t) for t in ids)


class FakeDetokenizer:
    def __init__(self, tokenizer: FakeTokenizer) -> None:
        self.tokenizer = tokenizer

    def push(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def flush(self) -> str:
        return ""


class FakeChatTemplate:
    """Renders ``<role>:content|`` turns; the generation prompt ends with ``a:``."""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        text = "".join(f"{m['role'][0]}-{m['content']}." for m in messages)
        return text + ("a-" if add_generation_prompt else "")

    def prompt_opens_reasoning(self, rendered: str) -> bool:
        return False


def make_engine(model: FakeModel | None = None, *, eos_token_id: int = EOS, **config: object) -> Engine:
    tok = FakeTokenizer()
    tok.eos_token_id = eos_token_id
    return Engine(model or FakeModel(), tok, model_id="fake", config=EngineConfig(**config),  # type: ignore[arg-type]
                  chat_template=FakeChatTemplate(), make_detokenizer=lambda: FakeDetokenizer(tok),
                  available_bytes=1 << 30)

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000],
    list(range(100, 141)),
    [129000, 5, 77777, 4242, 31337, 12, 99, 100000, 64000, 3, 1, 2, 50000, 8, 9, 10, 11],
]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    """transformers' own greedy generation (with its KV cache)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    return PROMPTS

"""mla_decode against its torch reference and against MLAttention's own decode math."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.mla_decode import mla_decode, mla_decode_reference

RANK, ROPE, PAGE_SIZE = 128, 16, 16


def make_inputs(seq_lens: list[int], heads: int, dtype: torch.dtype, device: torch.device, seed: int = 0):  # noqa: ANN201
    """Random queries and a shuffled page pool holding each sequence's latents."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    max_pages = max(-(-s // PAGE_SIZE) for s in seq_lens) + 1  # a spare column, as the engine's table has
    num_pages = B * max_pages + 3
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages)
    kv = torch.randn(num_pages, PAGE_SIZE, RANK + ROPE, generator=g).to(dtype)
    q_lat = torch.randn(B, heads, RANK, generator=g)
    q_pe = torch.randn(B, heads, ROPE, generator=g)
    args = (q_lat, q_pe, kv, perm.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32))
    return tuple(t.to(device) for t in args)


SCALE = 1 / 192**0.5
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: queries rounded for the tensor cores on a GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("seq_lens", "heads", "num_splits"), [
    ([1, 17, 40], 4, 1),  # a single token, a page and a bit, several pages
    ([70, 5], 20, 3),  # more heads than one tile; three splits, the short sequence's later ones empty
    ([33], 16, None),
])
def test_matches_reference(seq_lens: list[int], heads: int, num_splits: int | None, dtype: torch.dtype,
                           device: torch.device) -> None:
    args = make_inputs(seq_lens, heads, dtype, device)
    out = mla_decode(*args, SCALE, max_seq_len=max(seq_lens), num_splits=num_splits)
    ref = mla_decode_reference(*args, SCALE)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_reference_is_mlattention_decode_math() -> None:
    """The reference reproduces MLAttention._decode's o_lat (checked through its W_vb projection)."""
    import ksdk.models  # noqa: F401  (first: ksdk.layers.mla imports ksdk.models.config, whose package imports mla)
    from ksdk.layers.attention_metadata import AttentionMetadata
    from ksdk.layers.mla import MLAttention

    q_lat, q_pe, kv, table, seq_lens = make_inputs([9, 30], 2, torch.float32, torch.device("cpu"))
    nope, v = 8, 12
    g = torch.Generator().manual_seed(1)
    w_kb = torch.randn(2, nope, RANK, generator=g)
    w_vb = torch.randn(2, v, RANK, generator=g)
    q_nope = torch.randn(2, 2, nope, generator=g)
    attn = MLAttention.__new__(MLAttention)
    torch.nn.Module.__init__(attn)
    attn.rank, attn.scale = RANK, SCALE
    attn.register_buffer("w_kb", w_kb)
    attn.register_buffer("w_vb", w_vb)
    meta = AttentionMetadata.build([1, 1], seq_lens.tolist(), [row.tolist() for row in table], PAGE_SIZE)
    expected = attn._decode(q_nope, q_pe, meta, kv, max(meta.seq_lens_host))  # [B, H, v]
    o_lat = mla_decode_reference(torch.einsum("bhn,hnr->bhr", q_nope, w_kb), q_pe, kv, table, seq_lens, SCALE)
    torch.testing.assert_close(torch.einsum("bhr,hvr->bhv", o_lat, w_vb), expected)


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    q_lat, q_pe, kv, table, seq_lens = make_inputs([5], 2, torch.float32, device)
    with pytest.raises(ValueError, match="page_table is torch.int64"):
        mla_decode(q_lat, q_pe, kv, table.long(), seq_lens, SCALE, max_seq_len=5)
    with pytest.raises(ValueError, match=r"expected \[num_pages, page_size, 144\]"):
        mla_decode(q_lat, q_pe, kv[..., :-1], table, seq_lens, SCALE, max_seq_len=5)
    with pytest.raises(ValueError, match="seq_lens is torch.int64"):
        mla_decode(q_lat, q_pe, kv, table, seq_lens.long(), SCALE, max_seq_len=5)

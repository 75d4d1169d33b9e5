"""CPUExperts against a torch reference on gguf.quants.dequantize'd weights, over types, shapes and routing.

Two references: ``exact`` quantizes the activations exactly as the kernels do (per-block int8, scale
max|x|/127, round half to even) and must match up to a few int8 rounding flips where fp32 summation order
differs (up to ~1.5e-3 of the output norm seen when 70 tokens share an expert: we allow 5e-3); ``plain`` is fp32
math on the dequantized weights, which Q8 activations (x once, the heavy-tailed intermediate once) miss by
1-2.2% on these random layers (int8 rounding of a block scaled by its max: ~0.7% of x, ~1.3% of h): we
require < 3e-2 for quantized weights, < 1e-5 for BF16/F16 (fp32 activations, no quantization).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ksdk.bench.random_blocks import RandomExpertTensor, random_expert_tensor
from ksdk.errors import InvalidRequestError, ModelFileError, UnsupportedQuantError
from ksdk.offload import CPUExperts, default_num_threads, load_native

Q = gguf.GGMLQuantizationType
KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
ISAS = ["scalar"] + [isa for isa in ("avx2", "avx512vnni") if load_native().cpu_features()[isa]]


def dequantized(view: RandomExpertTensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(view.raw, view.qtype).astype(np.float32)).reshape(view.shape)


_DEQUANTIZED: dict[int, tuple[RandomExpertTensor, torch.Tensor]] = {}


def _dequantized_cache(view: RandomExpertTensor) -> torch.Tensor:
    if id(view) not in _DEQUANTIZED or _DEQUANTIZED[id(view)][0] is not view:
        _DEQUANTIZED[id(view)] = (view, dequantized(view))
    return _DEQUANTIZED[id(view)][1]


def like_kernel_activations(x: torch.Tensor, qtype: Q) -> torch.Tensor:
    """x [N, n] rounded as the kernels quantize activations for weights of type qtype."""
    if qtype in (Q.BF16, Q.F16):
        return x
    block = 256 if qtype in KQUANTS else 32
    xb = x.reshape(x.shape[0], -1, block)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(xb * torch.where(d > 0, 127 / xb.abs().amax(dim=-1, keepdim=True), 0.0))
    return (q * d).reshape(x.shape)


def reference(x, ids, weights, gate, up, down, *, like_kernel: bool) -> torch.Tensor:
    """fp32 MoE on the dequantized weights (gate/up/down are views; dequantized once per view)."""
    g_w, u_w, d_w = (_dequantized_cache(v) for v in (gate, up, down))
    x = x.float()
    out = torch.zeros(x.shape[0], d_w.shape[1])
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]  # [n_e, H]
        xg = like_kernel_activations(xe, gate.qtype) if like_kernel else xe
        xu = like_kernel_activations(xe, up.qtype) if like_kernel else xe
        h = torch.nn.functional.silu(xg @ g_w[e].T) * (xu @ u_w[e].T)  # [n_e, I]
        if like_kernel:
            h = like_kernel_activations(h, down.qtype)
        out.index_add_(0, tok, weights[tok, slot, None] * (h @ d_w[e].T))
    return out


def make_layer(gate_qtype: Q, down_qtype: Q, n_expert: int, hidden: int, inter: int):
    gate = random_expert_tensor(gate_qtype, n_expert, inter, hidden, seed=1)
    up = random_expert_tensor(gate_qtype, n_expert, inter, hidden, seed=2)
    down = random_expert_tensor(down_qtype, n_expert, hidden, inter, seed=3)
    return gate, up, down


def routing(num_tokens: int, top_k: int, n_expert: int, *, skewed: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_expert, generator=gen)[:top_k] for _ in range(num_tokens)])
    if skewed:  # expert 0 in every token, the rest from a few experts: many experts unused
        ids = torch.stack([torch.randperm(top_k + 1, generator=gen)[:top_k] for _ in range(num_tokens)])
        ids[:, 0] = 0
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, top_k + 1, ids[:, 1:])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return ids, weights


# (gate/up type, down type, n_expert, hidden, intermediate)
LAYERS = [
    (Q.Q4_K, Q.Q6_K, 8, 512, 256),
    (Q.Q5_K, Q.Q4_K, 8, 256, 512),
    (Q.Q6_K, Q.Q5_K, 8, 512, 256),
    (Q.Q8_0, Q.Q8_0, 16, 160, 96),
    (Q.BF16, Q.F16, 8, 72, 40),  # lengths not a multiple of 8: the vector kernels' scalar tails
    (Q.F16, Q.BF16, 8, 64, 48),
]
# (T, top_k, skewed)
ROUTES = [(1, 1, False), (5, 8, False), (70, 4, True)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0].name}-{l[1].name}-H{l[3]}-I{l[4]}")
def test_matches_dequantized_reference(isa, layer) -> None:
    gate_q, down_q, n_expert, hidden, inter = layer
    gate, up, down = make_layer(gate_q, down_q, n_expert, hidden, inter)
    experts = CPUExperts(gate, up, down, num_threads=2, isa=isa)
    assert experts.isa == isa
    quantized = gate_q not in (Q.BF16, Q.F16) or down_q not in (Q.BF16, Q.F16)
    for num_tokens, top_k, skewed in ROUTES:
        x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(num_tokens))
        ids, weights = routing(num_tokens, top_k, n_expert, skewed=skewed)
        out = experts.forward(x, ids, weights)
        assert out.shape == (num_tokens, hidden) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        exact = reference(x, ids, weights, gate, up, down, like_kernel=True)
        plain = reference(x, ids, weights, gate, up, down, like_kernel=False)
        assert float((out - exact).norm() / exact.norm()) < 5e-3
        assert float((out - plain).norm() / plain.norm()) < (3e-2 if quantized else 1e-5)


def test_isas_agree() -> None:
    gate, up, down = make_layer(Q.Q4_K, Q.Q6_K, 8, 512, 256)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(9))
    ids, weights = routing(9, 8, 8, skewed=False)
    outs = [CPUExperts(gate, up, down, num_threads=1, isa=isa).forward(x, ids, weights) for isa in ISAS]
    # Integer sums are exact; only the fp32 summation order differs, which can flip a rare int8
    # rounding of the intermediate (about 1e-4 of the norm each).
    for out in outs[1:]:
        assert float((out - outs[0]).norm() / outs[0].norm()) < 2e-3


@pytest.fixture(scope="module")
def layer():
    return make_layer(Q.Q4_K, Q.Q6_K, 16, 256, 256)


def test_thread_counts_give_identical_results(layer) -> None:
    x = torch.randn(12, 256)
    ids, weights = routing(12, 6, 16, skewed=False)
    outs = [CPUExperts(*layer, num_threads=n).forward(x, ids, weights) for n in (1, 2, 3)]
    assert CPUExperts(*layer, num_threads=3).num_threads == 3
    # Each output value is computed by one thread in a fixed order, whatever the split.
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_prefill_sized_buffers_are_freed_after_the_call(layer) -> None:
    """Every layer has its own runner: a long prompt's buffers kept by each would add up over 58 layers."""
    experts = CPUExperts(*layer, num_threads=2)
    ids, weights = routing(4, 8, 16, skewed=False)
    experts.forward(torch.randn(4, 256), ids, weights)
    assert 0 < experts.call_buffer_bytes <= 16 << 20  # decode-sized: kept for the next step
    x = torch.randn(2048, 256)
    ids, weights = routing(2048, 8, 16, skewed=False)
    first = experts.forward(x, ids, weights)
    assert experts.call_buffer_bytes == 0
    assert torch.equal(experts.forward(x, ids, weights), first)


def test_prefetch_distance_changes_no_result(layer) -> None:
    native = load_native()
    x = torch.randn(12, 256)
    ids, weights = routing(12, 6, 16, skewed=False)
    experts = CPUExperts(*layer, num_threads=2)
    default = native.prefetch_distance(), native.prefetch_next_row()
    try:
        outs = []
        for next_row in (True, False):
            native.set_prefetch_next_row(next_row)
            assert native.prefetch_next_row() == next_row
            for distance in (0, 64, 1000, 1 << 16):  # none, a line, not a line multiple, past every row
                native.set_prefetch_distance(distance)
                assert native.prefetch_distance() == distance
                outs.append(experts.forward(x, ids, weights))
        with pytest.raises(ValueError, match=r"allowed: 0\.\.65536"):
            native.set_prefetch_distance(-1)
    finally:
        native.set_prefetch_distance(default[0])
        native.set_prefetch_next_row(default[1])
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_default_threads_leave_a_core_free(layer) -> None:
    assert CPUExperts(*layer).num_threads == default_num_threads()
    assert 1 <= default_num_threads() <= max(1, len(__import__("os").sched_getaffinity(0)) - 1)


def test_bf16_input_and_int32_ids_match_fp32_int64(layer) -> None:
    experts = CPUExperts(*layer, num_threads=2)
    x = torch.randn(4, 256).bfloat16()
    ids, weights = routing(4, 3, 16, skewed=False)
    expected = experts.forward(x.float(), ids.long(), weights)
    assert torch.equal(experts.forward(x, ids.int(), weights), expected)


def test_submit_then_wait(layer) -> None:
    experts = CPUExperts(*layer, num_threads=2)
    x = torch.randn(3, 256)
    ids, weights = routing(3, 4, 16, skewed=False)
    expected = experts.forward(x, ids, weights)
    out = torch.full((3, 256), float("nan"))
    experts.submit(x, ids, weights, out)
    with pytest.raises(InvalidRequestError, match="pending"):
        experts.submit(x, ids, weights, out)
    busy = torch.randn(64, 64) @ torch.randn(64, 64)  # Python/torch work while the experts run
    experts.wait()
    assert busy.shape == (64, 64)
    assert torch.equal(out, expected)
    with pytest.raises(InvalidRequestError, match="without a pending"):
        experts.wait()


def test_copy_to_ram_matches_memmap_view(layer) -> None:
    x = torch.randn(2, 256)
    ids, weights = routing(2, 2, 16, skewed=False)
    expected = CPUExperts(*layer, num_threads=1).forward(x, ids, weights)
    assert torch.equal(CPUExperts(*layer, num_threads=1, copy_to_ram=True).forward(x, ids, weights), expected)


@pytest.mark.parametrize("bad_id", [16, -2])
def test_out_of_range_expert_id(layer, bad_id) -> None:
    experts = CPUExperts(*layer, num_threads=1)
    ids = torch.tensor([[0, bad_id]])
    with pytest.raises(
        InvalidRequestError, match=rf"topk_ids\[0, 1\] = {bad_id} is out of range; allowed: 0..15, or -1 to skip"
    ):
        experts.forward(torch.randn(1, 256), ids, torch.ones(1, 2))
    # The failed submit left nothing pending.
    assert experts.forward(torch.randn(1, 256), ids.clamp(0, 15), torch.ones(1, 2)).shape == (1, 256)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_skipped_slots_contribute_nothing(layer, ids_dtype) -> None:
    """-1 in topk_ids skips that (token, slot): the result equals the sum over the kept slots only."""
    experts = CPUExperts(*layer, num_threads=2)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6))
    ids, weights = routing(6, 4, 16, skewed=False)
    skip = torch.zeros(6, 4, dtype=torch.bool)
    skip[0, 1] = skip[2, 0] = skip[2, 3] = True
    skip[4] = True  # every slot of token 4: a zero row
    out = experts.forward(x, torch.where(skip, -1, ids).to(ids_dtype), weights)
    assert torch.equal(out[4], torch.zeros(256))
    # Reference: the skipped slots routed but weighted 0. Each (token, expert) is computed on its own and
    # the sums per output row keep their order, so adding those zeros changes no bit.
    kept = experts.forward(x, ids, torch.where(skip, 0.0, weights))
    assert torch.equal(out, kept)
    assert torch.equal(experts.forward(x[:0], ids[:0], weights[:0]), torch.empty(0, 256))
    all_skipped = experts.forward(x, torch.full_like(ids, -1), weights)
    assert torch.equal(all_skipped, torch.zeros(6, 256))


def test_bad_input_shapes_and_options(layer) -> None:
    experts = CPUExperts(*layer, num_threads=1)
    ids, weights = routing(2, 2, 16, skewed=False)
    with pytest.raises(InvalidRequestError, match="x is"):
        experts.forward(torch.randn(2, 128), ids, weights)
    with pytest.raises(InvalidRequestError, match="topk_weights is"):
        experts.forward(torch.randn(2, 256), ids, weights.double())
    with pytest.raises(InvalidRequestError, match="num_threads=0"):
        CPUExperts(*layer, num_threads=0)
    with pytest.raises(InvalidRequestError, match="isa='neon'"):
        CPUExperts(*layer, isa="neon")


def test_unsupported_and_malformed_tensors(layer) -> None:
    gate, up, down = layer
    q4_0 = RandomExpertTensor(Q.Q4_0, gate.shape, np.zeros((16, 256, 144), np.uint8))
    with pytest.raises(UnsupportedQuantError, match="Q4_0"):
        CPUExperts(q4_0, up, down)
    short = RandomExpertTensor(gate.qtype, gate.shape, gate.raw[:, :, :100])
    with pytest.raises(ModelFileError, match="raw bytes"):
        CPUExperts(short, up, down)
    fewer_experts = random_expert_tensor(up.qtype, 8, 256, 256)
    with pytest.raises(ModelFileError, match=r"'up' has shape \(8, 256, 256\); expected \(16, 256, 256\)"):
        CPUExperts(gate, fewer_experts, down)


def test_layers_share_one_thread_pool(layer) -> None:
    first, second = CPUExperts(*layer, num_threads=2), CPUExperts(*layer, num_threads=2)
    x = torch.randn(2, 256)
    ids, weights = routing(2, 2, 16, skewed=False)
    expected = first.forward(x, ids, weights)
    out = torch.empty(2, 256)
    first.submit(x, ids, weights, out)
    # Same thread, same pool, first call not waited: blocking would deadlock, so it is refused.
    with pytest.raises(InvalidRequestError, match="wait"):
        second.submit(x, ids, weights, torch.empty(2, 256))
    first.wait()
    assert torch.equal(out, expected)
    assert torch.equal(second.forward(x, ids, weights), expected)


def test_layers_used_from_two_threads(layer) -> None:
    import concurrent.futures

    x = torch.randn(3, 256)
    ids, weights = routing(3, 4, 16, skewed=False)
    layers = [CPUExperts(*layer, num_threads=2) for _ in range(4)]
    expected = layers[0].forward(x, ids, weights)

    def run_layers(mine: list[CPUExperts]) -> list[torch.Tensor]:
        return [experts.forward(x, ids, weights) for experts in mine * 5]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # calls queue up on the shared pool
        outs = pool.map(run_layers, [layers[:2], layers[2:]])
    assert all(torch.equal(out, expected) for thread_outs in outs for out in thread_outs)


def test_lock_memory_locks_or_names_the_limit(layer) -> None:
    x = torch.randn(2, 256)
    ids, weights = routing(2, 2, 16, skewed=False)
    expected = CPUExperts(*layer, num_threads=1).forward(x, ids, weights)
    try:
        experts = CPUExperts(*layer, num_threads=1, copy_to_ram=True, lock_memory=True)
    except InvalidRequestError as exc:  # an unprivileged process over RLIMIT_MEMLOCK
        assert "RLIMIT_MEMLOCK" in str(exc)
    else:
        assert torch.equal(experts.forward(x, ids, weights), expected)


def test_reads_expert_tensors_from_a_gguf_file(tmp_path) -> None:
    """The real TensorView (a memmap of the file) through CPUExperts, against its own dequantize()."""
    from ksdk.weights.gguf_file import GGUFFile

    n_expert, hidden, inter = 4, 64, 96
    gen = torch.Generator().manual_seed(0)
    writer = gguf.GGUFWriter(tmp_path / "experts.gguf", "deepseek2")
    shapes = {"gate": (n_expert, inter, hidden), "up": (n_expert, inter, hidden), "down": (n_expert, hidden, inter)}
    for role, shape in shapes.items():
        values = (torch.randn(*shape, generator=gen) * 0.05).numpy()
        writer.add_tensor(f"blk.0.ffn_{role}_exps.weight", gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile.open(tmp_path / "experts.gguf") as file:
        views = [file.tensor(f"blk.0.ffn_{role}_exps.weight") for role in shapes]
        experts = CPUExperts(*views, num_threads=2)
        x = torch.randn(5, hidden, generator=gen)
        ids, weights = routing(5, 2, n_expert, skewed=False)
        out = experts.forward(x, ids, weights)
        g_w, u_w, d_w = (v.dequantize() for v in views)
        expected = torch.zeros(5, hidden)
        for t in range(5):
            for j in range(2):
                e = int(ids[t, j])
                h = torch.nn.functional.silu(g_w[e] @ x[t]) * (u_w[e] @ x[t])
                expected[t] += weights[t, j] * (d_w[e] @ h)
        del experts  # before the file mapping closes
    assert float((out - expected).norm() / expected.norm()) < 3e-2

"""The tile path (experts with many tokens on int8 tiles) against the row kernels and torch references.

Runs with the AVX512-VNNI emulation wherever the CPU has AVX512-VNNI, and with real AMX tiles where the
CPU and OS offer AMX-INT8 (skipped otherwise). Tolerances: the tile path computes each super-block's
integer sum exactly, as the row kernels do; only the fp32 epilogue differs (per super-block per (row,
token) instead of 16 unreduced lanes per row, Q4_K/Q5_K mins per 32 values instead of per 16), about 3e-7
of the output norm. That can flip the int8 rounding of an intermediate value sitting on a rounding
boundary, about 1e-4 of the norm per flip, so tiles vs rows allow 2e-3 (as isas do in
test_cpu_experts.py); against the references the bounds of test_cpu_experts.py apply unchanged. The
emulation and AMX share the epilogue and compute the same integers: they must agree bit for bit.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from ksdk.errors import InvalidRequestError
from ksdk.offload import CPUExperts, load_native

from .test_cpu_experts import make_layer, reference, routing

Q = gguf.GGMLQuantizationType
FEATURES = load_native().cpu_features()
TILE_ISAS = [
    pytest.param("amx-emulated", marks=pytest.mark.skipif(not FEATURES["avx512vnni"], reason="no AVX512-VNNI")),
    pytest.param("amx", marks=pytest.mark.skipif(not FEATURES["amx_int8"], reason="no AMX-INT8 on this CPU/OS")),
]

# (gate/up type, down type, n_expert, hidden, intermediate): every k-quant as gate/up and as down; one
# projection without a tile decode (Q8_0, BF16) while the other has one; I=72: a last row tile of 8 rows.
LAYERS = [
    (Q.Q4_K, Q.Q6_K, 8, 512, 256),
    (Q.Q5_K, Q.Q4_K, 8, 256, 512),
    (Q.Q6_K, Q.Q5_K, 8, 512, 256),
    (Q.Q8_0, Q.Q6_K, 8, 256, 256),
    (Q.Q4_K, Q.BF16, 8, 256, 72),
]
# (T, top_k, skewed): experts with 1 token; uneven counts, T not a multiple of 16; 70 tokens on expert 0
# (5 token tiles: pairs and a single tile) while the others get few.
ROUTES = [(1, 1, False), (5, 8, False), (37, 4, False), (70, 4, True)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=LAYERS, ids=lambda l: f"{l[0].name}-{l[1].name}-H{l[3]}-I{l[4]}")
def layer(request):
    gate_q, down_q, n_expert, hidden, inter = request.param
    return make_layer(gate_q, down_q, n_expert, hidden, inter), n_expert, hidden


@pytest.mark.parametrize("tile_isa", TILE_ISAS)
def test_tiles_match_rows_and_references(layer, tile_isa) -> None:
    (gate, up, down), n_expert, hidden = layer
    rows = CPUExperts(gate, up, down, num_threads=2, tile_isa="off")
    tiles = CPUExperts(gate, up, down, num_threads=2, tile_isa=tile_isa, tile_min_tokens=1)
    assert (tiles.tile_isa, tiles.tile_min_tokens, rows.tile_isa) == (tile_isa, 1, "off")
    for num_tokens, top_k, skewed in ROUTES:
        x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(num_tokens))
        ids, weights = routing(num_tokens, top_k, n_expert, skewed=skewed)
        out = tiles.forward(x, ids, weights)
        assert torch.isfinite(out).all()
        assert relative(out, rows.forward(x, ids, weights)) < 2e-3
        assert relative(out, reference(x, ids, weights, gate, up, down, like_kernel=True)) < 5e-3
        assert relative(out, reference(x, ids, weights, gate, up, down, like_kernel=False)) < 3e-2


@pytest.mark.parametrize("tile_isa", TILE_ISAS)
def test_threshold_splits_experts_between_paths(layer, tile_isa) -> None:
    """Experts under tile_min_tokens stay on the row kernels, bit for bit; the others take the tiles."""
    (gate, up, down), n_expert, hidden = layer
    x = torch.randn(70, hidden, generator=torch.Generator().manual_seed(1))
    ids, weights = routing(70, 4, n_expert, skewed=True)  # expert 0: 70 tokens; the others far fewer
    rows = CPUExperts(gate, up, down, num_threads=2, tile_isa="off").forward(x, ids, weights)
    never = CPUExperts(gate, up, down, num_threads=2, tile_isa=tile_isa, tile_min_tokens=71)
    assert torch.equal(never.forward(x, ids, weights), rows)
    split = CPUExperts(gate, up, down, num_threads=2, tile_isa=tile_isa, tile_min_tokens=70).forward(x, ids, weights)
    assert not torch.equal(split, rows)  # expert 0 went through the tiles (fp32 order differs)
    assert relative(split, rows) < 2e-3
    # Skipped slots (-1) take no place in the experts' token tiles.
    skip = ids.clone()
    skip[::3, 1] = -1
    tiles = CPUExperts(gate, up, down, num_threads=2, tile_isa=tile_isa, tile_min_tokens=1)
    rows_skipped = CPUExperts(gate, up, down, num_threads=2, tile_isa="off").forward(x, skip, weights)
    assert relative(tiles.forward(x, skip, weights), rows_skipped) < 2e-3


@pytest.mark.parametrize("tile_isa", TILE_ISAS)
def test_thread_counts_give_identical_results(layer, tile_isa) -> None:
    (gate, up, down), n_expert, hidden = layer
    x = torch.randn(40, hidden, generator=torch.Generator().manual_seed(2))
    ids, weights = routing(40, 6, n_expert, skewed=False)
    outs = [
        CPUExperts(gate, up, down, num_threads=n, tile_isa=tile_isa, tile_min_tokens=1).forward(x, ids, weights)
        for n in (1, 3)
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not FEATURES["amx_int8"], reason="no AMX-INT8 on this CPU/OS")
def test_amx_and_emulation_agree_bit_for_bit() -> None:
    gate, up, down = make_layer(Q.Q4_K, Q.Q6_K, 8, 512, 256)
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(3))
    ids, weights = routing(70, 4, 8, skewed=True)
    outs = [
        CPUExperts(gate, up, down, num_threads=2, tile_isa=t, tile_min_tokens=1).forward(x, ids, weights)
        for t in ("amx", "amx-emulated")
    ]
    assert torch.equal(outs[0], outs[1])


def test_auto_picks_amx_only_where_the_cpu_has_it() -> None:
    gate, up, down = make_layer(Q.Q4_K, Q.Q6_K, 8, 256, 256)
    experts = CPUExperts(gate, up, down, num_threads=1)
    assert experts.tile_isa == ("amx" if FEATURES["amx_int8"] else "off")


def test_bad_tile_options() -> None:
    gate, up, down = make_layer(Q.Q4_K, Q.Q6_K, 8, 256, 256)
    with pytest.raises(InvalidRequestError, match="tile_isa='tpu' is unknown"):
        CPUExperts(gate, up, down, tile_isa="tpu")
    with pytest.raises(InvalidRequestError, match="tile_min_tokens=0 is invalid"):
        CPUExperts(gate, up, down, tile_min_tokens=0)
    if not FEATURES["amx_int8"]:
        with pytest.raises(InvalidRequestError, match="tile_isa='amx': AMX"):
            CPUExperts(gate, up, down, tile_isa="amx")


def test_non_kquant_weights_stay_on_rows() -> None:
    """Q8_0 (no tile decode) with tiles asked: the row kernels run, bit-identical to tiles off."""
    if not FEATURES["avx512vnni"]:
        pytest.skip("no AVX512-VNNI")
    gate, up, down = make_layer(Q.Q8_0, Q.Q8_0, 8, 256, 96)
    x = torch.randn(30, 256, generator=torch.Generator().manual_seed(4))
    ids, weights = routing(30, 4, 8, skewed=False)
    tiles = CPUExperts(gate, up, down, num_threads=2, tile_isa="amx-emulated", tile_min_tokens=1)
    rows = CPUExperts(gate, up, down, num_threads=2, tile_isa="off")
    assert torch.equal(tiles.forward(x, ids, weights), rows.forward(x, ids, weights))


def test_bench_compares_tile_settings_on_one_layer(capsys) -> None:
    from dataclasses import replace

    from ksdk.bench.__main__ import main
    from ksdk.bench.experts import SMALL, run_experts_bench

    tiny = replace(SMALL, name="tiny layer", n_expert=16, hidden=256, intermediate=256, tokens=(1, 40),
                   seconds_per_point=0.0, min_calls=1, probe_bytes=16 << 20)
    settings = ("amx-emulated", "off") if FEATURES["avx512vnni"] else ("off",)
    results = run_experts_bench(tiny, num_threads=1, isa="auto", why="test", tile_isas=settings,
                                tile_min_tokens=2, per_expert=(2, 4))
    assert [r.num_tokens for r in results] == [1, 40] * len(settings)
    text = capsys.readouterr().out
    assert "tiles: off (row kernels for every expert)" in text
    assert "every expert given exactly n tokens (T = n * 2)" in text  # 16 experts / top-8
    assert "phases of the last call at T=40 (ms): quantize_x" in text
    if FEATURES["avx512vnni"]:
        assert "tiles: amx-emulated for experts with >= 2 tokens" in text
    with pytest.raises(SystemExit):
        main(["experts", "--tile-isa", "auto,gpu"])
    assert "'gpu' is unknown" in capsys.readouterr().err

"""Time the decode GEMV over R1's non-expert shapes: the default config and a few candidate configs (the kernel
before issue #6 is `git show 26005a0:ksdk/kernels/dequant_matmul.py`; its numbers are in README). Run on the GPU machine:
``python scripts/gemv_sweep.py [M,M,...]``. Prints GB/s of weight bytes per config (weights rotated over enough
copies to leave L2, as in a decode step that reads 10 GB)."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q
from triton.testing import do_bench

from ksdk.bench.e2e import _random_q5_0
from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.kernels.dequant_matmul import GemvConfig, dequant_matmul
from ksdk.weights.quants import dequantize

SHAPES = [  # name, N, K, qtype (R1 at the Q4_K_M-like mix of ksdk.bench.e2e)
    ("q_a", 1536, 7168, Q.Q4_K), ("q_b", 24576, 1536, Q.Q4_K), ("kv_a", 576, 7168, Q.Q8_0),
    ("o_proj", 7168, 16384, Q.Q5_0), ("ffn_gate", 18432, 7168, Q.Q4_K), ("ffn_down", 7168, 18432, Q.Q5_0),
    ("sh_gate", 2048, 7168, Q.Q4_K), ("sh_down", 7168, 2048, Q.Q6_K), ("lm_head", 129280, 7168, Q.Q6_K),
]
# Candidates besides the default: (label, config), each run only where it fits the registers (_fits).
# rows<R>w<warps>: the rows kernel with R rows of W a thread (block_n = 32·num_warps·R).
CANDIDATES = [
    ("fma16x256", GemvConfig(16, 256, 4)), ("dot32x128", GemvConfig(32, 128, 4, dot=True)),
    ("dot32x256", GemvConfig(32, 256, 4, dot=True)), ("dot64x256w8", GemvConfig(64, 256, 8, dot=True)),
    ("dot64x128p8", GemvConfig(64, 128, 4, dot=True, programs_per_sm=8)),
    ("dot128x128w8", GemvConfig(128, 128, 8, dot=True)), ("dot128x64w8", GemvConfig(128, 64, 8, dot=True)),
    ("rows1w4", GemvConfig(128, 256, 4, kind="rows")), ("rows1w2", GemvConfig(64, 256, 2, kind="rows")),
    ("rows1w4p8", GemvConfig(128, 256, 4, kind="rows", programs_per_sm=8)),
    ("rows2w4", GemvConfig(256, 256, 4, kind="rows")), ("rows2w2", GemvConfig(128, 256, 2, kind="rows")),
    ("rows4w2", GemvConfig(256, 256, 2, kind="rows")),
]
L2_BYTES = 150 << 20  # rotate weight copies until this many bytes: past the H100's 50 MB L2


def _fits(cfg: GemvConfig, M: int, qt: Q) -> bool:
    """Whether the config's per-thread work fits the registers, as ptxas for sm_90 compiles it with bf16 x."""
    if cfg.kind == "rows":  # spill-free up to 4 (rows of W a thread) x (rows of x); 4 rows of W only for Q4_K/Q5_K
        rows = cfg.block_n // (32 * cfg.num_warps)
        return rows * M <= 4 and (rows <= 2 or qt in (Q.Q4_K, Q.Q5_K))
    return cfg.dot or (1 << (M - 1).bit_length()) * cfg.block_n * cfg.block_k <= 4096 * cfg.num_warps


def _weights(N: int, K: int, qt: Q) -> torch.Tensor:
    if qt == Q.Q5_0:
        raw = _random_q5_0(N, K, np.random.default_rng(0), K ** -0.5)
    else:
        raw = random_expert_tensor(qt, 1, N, K, seed=0, scale=K ** -0.5).raw.reshape(N, -1)
    return torch.from_numpy(np.ascontiguousarray(raw)).cuda()


def graph_ms(fn, args: list) -> float:
    """Median ms of one fn(a), from a CUDA graph of fn(a) for every a in args (no launch gaps: the decode step
    is one graph too; rotating args keeps repeated weights out of L2)."""
    for a in args:  # compile and allocate before the capture
        fn(a)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in args:
            fn(a)
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") / len(args)


def main() -> None:
    Ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,4,8").split(",")]
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_ms = do_bench(lambda: src.clone(), warmup=10, rep=50, return_mode="median")
    print(f"device copy: {2 * src.numel() / copy_ms / 1e6:.0f} GB/s (read + write) on {torch.cuda.get_device_name()}")
    del src
    print("columns: default | " + " ".join(label for label, _ in CANDIDATES))
    table = []
    only = os.environ.get("GEMV_SWEEP_SHAPES")  # e.g. o_proj,q_b: a subset of SHAPES
    for name, N, K, qt in SHAPES:
        if only and name not in only.split(","):
            continue
        w = _weights(N, K, qt)
        copies = [w] + [w.clone() for _ in range(min(31, L2_BYTES // w.numel()))]
        dense = dequantize(w.cpu(), qt, (N, K)).cuda()  # [N, K] fp32: the reference
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dense.T
            scale = ref.abs().max().item()
            row = {}
            runs = [("default", lambda wi: dequant_matmul(x, wi, qt, K))]
            runs += [(label, (lambda c: lambda wi: dequant_matmul(x, wi, qt, K, gemv=c))(cfg))
                     for label, cfg in CANDIDATES if _fits(cfg, M, qt)]
            for label, fn in runs:
                err = (fn(w).float() - ref).abs().max().item() / scale
                assert err < 2e-2, (name, M, label, err)
                row[label] = w.numel() / graph_ms(fn, copies) / 1e6  # GB/s
            best = max((v, k) for k, v in row.items())
            table.append((name, M, qt.name, w.numel() / 1e6, row, best))
            cols = " ".join(f"{label}={gbs:5.0f}" for label, gbs in row.items())
            print(f"{name:8} M={M} {qt.name:5} {w.numel() / 1e6:6.1f}MB GB/s: {cols} | best {best[1]}", flush=True)
        del copies, w, dense
        torch.cuda.empty_cache()
    print("\nsummary (GB/s of weight bytes):")
    for name, M, qn, mb, row, best in table:
        print(f"{name:8} M={M} {qn:5} {mb:6.1f}MB  default {row['default']:5.0f}  best {best[0]:5.0f} ({best[1]})")


if __name__ == "__main__":
    main()

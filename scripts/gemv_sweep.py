"""Time the decode GEMV over R1's non-expert shapes for a few tile configs; run on the GPU machine:
``python scripts/gemv_sweep.py [M,M,...]``. Prints microseconds and GB/s of weight bytes per config."""

from __future__ import annotations

import sys

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q
from triton.testing import do_bench

import ksdk.kernels.dequant_matmul as dm
from ksdk.bench.e2e import _random_q5_0
from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.kernels.dequant_matmul import GemvConfig, dequant_matmul

SHAPES = [  # name, N, K, qtype (R1 at the Q4_K_M-like mix of ksdk.bench.e2e)
    ("q_a", 1536, 7168, Q.Q4_K), ("q_b", 24576, 1536, Q.Q4_K), ("kv_a", 576, 7168, Q.Q8_0),
    ("o_proj", 7168, 16384, Q.Q5_0), ("ffn_gate", 18432, 7168, Q.Q4_K), ("ffn_down", 7168, 18432, Q.Q5_0),
    ("sh_down", 7168, 2048, Q.Q6_K), ("lm_head", 129280, 7168, Q.Q6_K),
]
CONFIGS = [GemvConfig(8, 256, 4, blocked=False), GemvConfig(4, 256, 4), GemvConfig(8, 256, 4), GemvConfig(16, 256, 4),
           GemvConfig(32, 256, 4), GemvConfig(8, 256, 8), GemvConfig(16, 256, 8), GemvConfig(16, 256, 2)]
Ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,4,16").split(",")]
dm.GEMV_MAX_M = max(Ms)  # time the GEMV kernels at every M asked for

print("configs (block_n, warps, blocked):", [(c.block_n, c.num_warps, c.blocked) for c in CONFIGS])
for name, N, K, qt in SHAPES:
    if qt == Q.Q5_0:
        raw = _random_q5_0(N, K, np.random.default_rng(0), K ** -0.5)
    else:
        raw = random_expert_tensor(qt, 1, N, K, seed=0, scale=K ** -0.5).raw.reshape(N, -1)
    w = torch.from_numpy(np.ascontiguousarray(raw)).cuda()
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = dequant_matmul(x, w, qt, K, gemv=CONFIGS[0]).float()
        row = []
        for cfg in CONFIGS:
            if cfg.block_n * (1 << (M - 1).bit_length()) * 128 > 16384:  # [BM, BN, G, L] products spill
                row.append("     -")
                continue
            y = dequant_matmul(x, w, qt, K, gemv=cfg).float()
            err = (y - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-2, (name, cfg, err)
            ms = do_bench(lambda: dequant_matmul(x, w, qt, K, gemv=cfg), warmup=5, rep=20)
            row.append(f"{ms * 1e3:6.0f}")
        dm.GEMV_MAX_M = 8
        gemm = do_bench(lambda: dequant_matmul(x, w, qt, K), warmup=3, rep=10) if M > 8 else float("nan")
        dm.GEMV_MAX_M = max(Ms)
        best = min(float(r) for r in row if r.strip() != "-")
        print(f"{name:8} M={M:<2} {qt.name:5} {w.numel() / 1e6:6.1f}MB us: " + " ".join(row)
              + f" | best {w.numel() / best / 1e3:6.0f} GB/s | gemm {gemm * 1e3:6.0f}", flush=True)

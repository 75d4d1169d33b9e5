"""Time the prefill GEMM on R1's routed-expert shapes (gate/up N=2048 K=7168 Q4_K, down N=7168 K=2048 Q6_K) at
several token counts: the default tiles and a few candidates, next to cuBLAS on the same weights in bf16 (the kernel
before issue #6 is `git show 26005a0:ksdk/kernels/dequant_matmul.py`; its numbers are in README). Run on the GPU machine:
``python scripts/gemm_sweep.py [M,M,...]``. Prints TFLOP/s (2·M·N·K per call)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.kernels.dequant_matmul import GemmConfig, dequant_matmul
from ksdk.weights.quants import dequantize

sys.path.insert(0, str(Path(__file__).parent))
from gemv_sweep import graph_ms  # noqa: E402

SHAPES = [("gate_up", 2048, 7168, Q.Q4_K), ("down", 7168, 2048, Q.Q6_K)]
CANDIDATES = [
    ("16x128x128s3", GemmConfig(16, 128, 128, 4, 3)), ("32x64x128s3", GemmConfig(32, 64, 128, 4, 3)),
    ("64x64x128s3", GemmConfig(64, 64, 128, 4, 3)), ("64x128x64", GemmConfig(64, 128, 64, 4, 2)),
    ("128x128x64w8", GemmConfig(128, 128, 64, 8, 2)), ("128x64x128w4s3", GemmConfig(128, 64, 128, 4, 3)),
    ("128x128x256w8s2", GemmConfig(128, 128, 256, 8, 2)), ("256x128x128w8s3", GemmConfig(256, 128, 128, 8, 3)),
]


def main() -> None:
    Ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "16,64,256,1024").split(",")]
    print("columns: default | " + " ".join(label for label, _ in CANDIDATES) + " | cublas bf16")
    table = []
    for name, N, K, qt in SHAPES:
        w = torch.from_numpy(random_expert_tensor(qt, 1, N, K, seed=0, scale=K ** -0.5).raw.reshape(N, -1)).cuda()
        dense = dequantize(w.cpu(), qt, (N, K)).cuda().bfloat16()  # [N, K]
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ dense.float().T)
            scale = ref.abs().max().item()
            flop = 2 * M * N * K
            runs = [("default", lambda: dequant_matmul(x, w, qt, K))]
            runs += [(label, (lambda c: lambda: dequant_matmul(x, w, qt, K, gemm=c))(cfg))
                     for label, cfg in CANDIDATES if cfg.block_m <= max(32, M)]
            row = {}
            for label, fn in runs:
                err = (fn().float() - ref).abs().max().item() / scale
                assert err < 2e-2, (name, M, label, err)
                row[label] = flop / graph_ms(lambda _: fn(), [None]) / 1e9
            row["cublas"] = flop / graph_ms(lambda _: x @ dense.T, [None]) / 1e9
            best = max((v, k) for k, v in row.items() if k != "cublas")
            table.append((name, M, row, best))
            print(f"{name:8} M={M:<5} {qt.name} TFLOP/s: " + " ".join(f"{k}={v:6.1f}" for k, v in row.items())
                  + f" | best {best[1]}", flush=True)
    print("\nsummary (TFLOP/s):")
    for name, M, row, best in table:
        print(f"{name:8} M={M:<5} default {row['default']:6.1f}  best {best[0]:6.1f} ({best[1]})"
              f"  cublas-bf16 {row['cublas']:6.1f}")


if __name__ == "__main__":
    main()

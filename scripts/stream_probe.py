"""One R1 MoE layer's routed experts at long-prompt sizes, each way they can run on a GPU machine.

    python scripts/stream_probe.py [--tokens 2048,8192]

Uses the e2e benchmark's cached synthetic R1 file (3 layers, 1 dense). Per token count prints the layer's
expert time and the expert bytes moved per second for: the CPU alone, the GPU streaming from the memory-mapped
file (staged through pinned slots), the GPU streaming from process memory registered with CUDA (direct DMA),
and both at once (the split, after its rates settle), plus the R1 61-layer prefill figure that the layer time
alone allows (58 MoE layers; attention and dense layers not counted).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from ksdk.bench.e2e import r1_spec, synthetic_gguf
from ksdk.offload.cpu_experts import CPUExperts
from ksdk.offload.gpu_experts import ExpertStaging, GPUStreamedExperts, StreamCrossover
from ksdk.offload.hybrid import HybridRoutedExperts
from ksdk.offload.routed import NativeRoutedExperts
from ksdk.weights.gguf_file import GGUFFile


def seconds(experts: object, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        experts.submit(x, ids, w)  # type: ignore[attr-defined]
        experts.wait()  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  log: %(name)s: %(message)s")
    device = torch.device("cuda")
    gguf = GGUFFile.open(synthetic_gguf(r1_spec(3, 1)))
    views = [gguf.tensor(f"blk.1.ffn_{w}_exps.weight") for w in ("gate", "up", "down")]
    for v in views:  # page in the file once
        int(v.raw.reshape(-1)[::4096].sum())
    start = time.perf_counter()
    cpu_experts = CPUExperts(*views, copy_to_ram=True)
    copied = time.perf_counter() - start
    staging = ExpertStaging(device)
    mapped = GPUStreamedExperts(*views, staging=staging)
    direct = GPUStreamedExperts(*views, staging=staging)
    start = time.perf_counter()
    assert direct.use_host_memory(cpu_experts.host_memory), "registration failed"  # type: ignore[arg-type]
    print(f"layer: {direct.layout.nbytes * direct.n_expert / 1e9:.2f} GB of experts; copy to RAM {copied:.1f} s, "
          f"cudaHostRegister {time.perf_counter() - start:.2f} s; {cpu_experts.num_threads} native threads, "
          f"{torch.get_num_threads()} torch threads")
    native = NativeRoutedExperts(cpu_experts, device)
    hybrid = HybridRoutedExperts(native, direct, StreamCrossover(1))
    E, k, H = direct.n_expert, 8, direct.layout.hidden
    moe_layers = 58
    print(f"{'tokens':>7} {'path':>26} {'ms':>8} {'GB/s':>7} {'61-layer tok/s (experts only)':>30}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(tokens)
        ids = torch.rand(tokens, E, generator=gen).topk(k, dim=1).indices.to(device)
        w = torch.rand(tokens, k, generator=gen).to(device)
        x = torch.randn(tokens, H, generator=gen).to(device, torch.bfloat16)
        layer_gb = int(torch.unique(ids).numel()) * direct.layout.nbytes / 1e9
        mapped.submit(x, ids, w)  # compile the kernels for these shapes
        mapped.wait()
        rows = [("CPU native", native, 1), ("GPU, staged from mmap", mapped, args.repeats),
                ("GPU, direct (registered)", direct, args.repeats)]
        for name, experts, repeats in rows:
            s = seconds(experts, x, ids, w, repeats)
            print(f"{tokens:>7} {name:>26} {1e3 * s:>8.1f} {layer_gb / s:>7.1f} {tokens / (moe_layers * s):>30.0f}")
        for _ in range(4):  # calibrate (first long call) and let the split's rates settle
            hybrid.submit(x, ids, w)
            hybrid.wait()
        s = seconds(hybrid, x, ids, w, args.repeats)
        name = "CPU + GPU direct (split)"
        print(f"{tokens:>7} {name:>26} {1e3 * s:>8.1f} {layer_gb / s:>7.1f} {tokens / (moe_layers * s):>30.0f}")
        rates = hybrid.crossover.split.rates if hybrid.crossover.split else None
        if rates is not None:
            counts = torch.bincount(ids.flatten().cpu(), minlength=E)
            share = int(hybrid.crossover.split.plan(counts).sum())  # type: ignore[union-attr]
            print(f"        split: {share} of {int((counts > 0).sum())} experts on the CPU; rates {rates}")


if __name__ == "__main__":
    main()

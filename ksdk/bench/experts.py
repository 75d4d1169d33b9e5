"""Routed-experts benchmark: one MoE layer on the CPU at several token counts, against host bandwidth.

For each T it reports ms per layer, the effective GB/s over the distinct experts the call read (each
is read once per call however many tokens chose it), and that as a share of the host's read bandwidth
measured in the same run with the same thread count. Expert ids are random on every call.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import gguf
import torch

from ksdk.bench.random_blocks import RandomExpertTensor, random_expert_tensor
from ksdk.errors import KsdkError
from ksdk.offload.cpu_experts import CPUExperts, default_num_threads, physical_cores
from ksdk.offload.native import load_native

__all__ = ["FULL", "SMALL", "ExpertsBenchConfig", "add_parser", "run_experts_bench"]

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class ExpertsBenchConfig:
    name: str
    n_expert: int
    top_k: int
    hidden: int
    intermediate: int
    gate_qtype: Q
    down_qtype: Q
    tokens: tuple[int, ...]
    seconds_per_point: float = 1.0  # time budget per T (at least min_calls calls)
    min_calls: int = 3
    probe_bytes: int = 4 << 30  # bandwidth probe buffer (capped at 1/8 of RAM): far beyond any cache

    def expert_bytes(self) -> int:
        def tensor_bytes(qtype: Q, rows: int, cols: int) -> int:
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            return rows * cols // block_values * block_bytes

        return 2 * tensor_bytes(self.gate_qtype, self.intermediate, self.hidden) + tensor_bytes(
            self.down_qtype, self.hidden, self.intermediate
        )


# DeepSeek-R1 routed experts at Q4_K_M: 256 experts, top-8, Q4_K gate/up, Q6_K down (7.3 GB per layer).
FULL = ExpertsBenchConfig("R1 layer", 256, 8, 7168, 2048, Q.Q4_K, Q.Q6_K, (1, 4, 16, 64, 256, 1024))
# For small CI hosts: 128 experts of 2 MB (260 MB, well beyond the caches), under a minute on 2 cores.
SMALL = ExpertsBenchConfig("small layer", 128, 8, 2048, 512, Q.Q4_K, Q.Q6_K, (1, 4, 16, 64, 256), probe_bytes=1 << 30)

# Targets on the lent GPU machine's 16-core host (share of measured read bandwidth; ms for T=1024).
_TARGET_SHARE = {1: 0.85, 4: 0.80, 16: 0.80, 64: 0.80}
_TARGET_MS = {1024: 120.0}


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _pick_config(args: argparse.Namespace) -> tuple[ExpertsBenchConfig, str]:
    if args.small:
        return SMALL, "--small"
    if args.full:
        return FULL, "--full"
    layer_bytes = FULL.n_expert * FULL.expert_bytes()
    if _total_memory_bytes() < 3 * layer_bytes:
        return SMALL, f"auto: host memory {_total_memory_bytes() / 2**30:.0f} GiB < 3x the R1 layer"
    if physical_cores() < 4:
        return SMALL, f"auto: only {physical_cores()} physical cores"
    return FULL, "auto: enough memory and cores"


def _make_layer(config: ExpertsBenchConfig) -> tuple[RandomExpertTensor, RandomExpertTensor, RandomExpertTensor]:
    gate = random_expert_tensor(config.gate_qtype, config.n_expert, config.intermediate, config.hidden, seed=1)
    up = random_expert_tensor(config.gate_qtype, config.n_expert, config.intermediate, config.hidden, seed=2)
    down = random_expert_tensor(config.down_qtype, config.n_expert, config.hidden, config.intermediate, seed=3)
    return gate, up, down


@dataclass(frozen=True)
class PointResult:
    num_tokens: int
    ms_per_layer: float
    experts_per_call: float
    gbs: float


def _measure(experts: CPUExperts, config: ExpertsBenchConfig, num_tokens: int, gen: torch.Generator) -> PointResult:
    x = torch.randn(num_tokens, config.hidden, generator=gen)
    out = torch.empty(num_tokens, config.hidden)
    weights = torch.rand(num_tokens, config.top_k, generator=gen)

    def random_ids() -> torch.Tensor:  # k distinct experts per token
        return torch.rand(num_tokens, config.n_expert, generator=gen).topk(config.top_k).indices.int()

    experts.forward(x, random_ids(), weights)  # warm-up: buffers sized, threads awake
    elapsed, read_experts, calls = 0.0, 0, 0
    while calls < config.min_calls or elapsed < config.seconds_per_point:
        ids = random_ids()
        start = time.perf_counter()
        experts.submit(x, ids, weights, out)
        experts.wait()
        elapsed += time.perf_counter() - start
        read_experts += int(ids.unique().numel())
        calls += 1
    return PointResult(
        num_tokens,
        ms_per_layer=1e3 * elapsed / calls,
        experts_per_call=read_experts / calls,
        gbs=read_experts * config.expert_bytes() / elapsed / 1e9,
    )


def _is_r1_layer(config: ExpertsBenchConfig) -> bool:
    def shape(c: ExpertsBenchConfig) -> tuple:
        return c.n_expert, c.top_k, c.hidden, c.intermediate, c.gate_qtype, c.down_qtype

    return shape(config) == shape(FULL)


def _target(num_tokens: int, share: float, ms: float) -> str:
    if num_tokens in _TARGET_SHARE:
        goal = _TARGET_SHARE[num_tokens]
        return f"{'ok' if share >= goal else 'MISS'} (>= {goal:.0%})"
    if num_tokens in _TARGET_MS:
        goal_ms = _TARGET_MS[num_tokens]
        return f"{'ok' if ms <= goal_ms else 'MISS'} (<= {goal_ms:.0f} ms)"
    return ""


def run_experts_bench(config: ExpertsBenchConfig, *, num_threads: int, isa: str, why: str) -> list[PointResult]:
    native = load_native()
    print(f"ksdk experts benchmark: {config.name} ({why})")
    print(f"  cpu: {platform.processor() or platform.machine()}, {physical_cores()} physical cores, "
          f"features {native.cpu_features()}")
    layer_gb = config.n_expert * config.expert_bytes() / 1e9
    print(f"  layer: {config.n_expert} experts, top-{config.top_k}, hidden {config.hidden}, intermediate "
          f"{config.intermediate}, {config.gate_qtype.name} gate/up + {config.down_qtype.name} down: "
          f"{config.expert_bytes() / 1e6:.1f} MB per expert, {layer_gb:.2f} GB per layer")
    print("  making random valid blocks in memory ...", flush=True)
    layer = _make_layer(config)
    experts = CPUExperts(*layer, num_threads=num_threads, isa=isa)
    probe_bytes = min(config.probe_bytes, _total_memory_bytes() // 8)
    host_gbs = native.read_bandwidth(probe_bytes, experts.num_threads, 5)
    print(f"  threads: {experts.num_threads}, kernels: {experts.isa}; host read bandwidth with "
          f"{experts.num_threads} threads: {host_gbs:.1f} GB/s (best of 5 reads of {probe_bytes / 2**30:.1f} GiB)")
    print()
    header = f"{'T':>6} {'ms/layer':>10} {'experts read':>13} {'GB/s':>8} {'% of host':>10}  target (16-core GPU host)"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    results = []
    for num_tokens in config.tokens:
        r = _measure(experts, config, num_tokens, gen)
        share = r.gbs / host_gbs
        target = _target(num_tokens, share, r.ms_per_layer) if _is_r1_layer(config) else "n/a (not the R1 layer)"
        print(f"{r.num_tokens:>6} {r.ms_per_layer:>10.2f} {r.experts_per_call:>13.1f} {r.gbs:>8.1f} "
              f"{share:>10.1%}  {target}", flush=True)
        results.append(r)
    print()
    print("GB/s counts each distinct expert once per call (its bytes / the call's time); targets apply to the "
          "full R1 layer on the lent 16-core host (reference: KTransformers 3.0 ms at T=1 with 14 threads).")
    return results


def _token_list(text: str) -> tuple[int, ...]:
    try:
        tokens = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: expected comma-separated ints, e.g. 1,4,16") from exc
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: every T must be >= 1")
    return tokens


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 1")
    return int(text)


def _run(args: argparse.Namespace) -> int:
    config, why = _pick_config(args)
    if args.tokens:
        config = replace(config, tokens=args.tokens)
    if args.seconds is not None:
        config = replace(config, seconds_per_point=args.seconds)
    num_threads = args.threads if args.threads is not None else default_num_threads()
    try:
        run_experts_bench(config, num_threads=num_threads, isa=args.isa, why=why)
    except KsdkError as exc:  # e.g. the native module not built, or an isa this CPU lacks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "experts",
        help="CPU routed experts on an R1-shaped layer: ms/layer and GB/s vs host bandwidth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true",
                      help=f"{SMALL.n_expert} experts, hidden {SMALL.hidden}, intermediate {SMALL.intermediate} "
                      "(auto on hosts with < 4 cores or too little memory for the R1 layer)")
    size.add_argument("--full", action="store_true", help="the R1 layer (7.3 GB) even where auto picks --small")
    parser.add_argument("--threads", type=_positive_int, help="worker threads (default: physical cores - 1)")
    parser.add_argument("--tokens", type=_token_list, help="comma-separated T values (default 1,4,16,64,256,1024)")
    parser.add_argument("--seconds", type=float, help="time budget per T (default 1.0; at least 3 calls)")
    parser.add_argument("--isa", default="auto", choices=["auto", "scalar", "avx2", "avx512vnni"],
                        help="kernel family (default: the best this CPU runs)")
    parser.set_defaults(run=_run)

"""Routed-experts benchmark: one MoE layer on the CPU at several token counts, against host bandwidth.

For each T it reports ms per layer, the effective GB/s over the distinct experts the call read (each
is read once per call however many tokens chose it), and that as a share of the host's read bandwidth
measured in the same run with the same thread count. Expert ids are random on every call.

``--tile-isa auto,off`` prints one table per setting of the prefill tile path on the same layer (AMX, or
its emulation, for experts with at least ``--tile-min-tokens`` tokens; ``off``: the row kernels only).
``--per-expert 4,8,16`` adds a table with every expert given exactly n tokens (T = n * E / top_k),
for each setting: where the tile path starts to win is the threshold to use.
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
from ksdk.offload.cpu_experts import TILE_ISAS, CPUExperts, default_num_threads, physical_cores
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


def _measure(
    experts: CPUExperts, config: ExpertsBenchConfig, num_tokens: int, gen: torch.Generator, *, uniform: bool = False
) -> PointResult:
    x = torch.randn(num_tokens, config.hidden, generator=gen)
    out = torch.empty(num_tokens, config.hidden)
    weights = torch.rand(num_tokens, config.top_k, generator=gen)

    def random_ids() -> torch.Tensor:  # k distinct experts per token
        if uniform:  # token i takes expert group i mod (E / k): each expert gets num_tokens * k / E tokens
            groups = config.n_expert // config.top_k
            slots = (torch.arange(num_tokens) % groups)[:, None] * config.top_k + torch.arange(config.top_k)
            return torch.randperm(config.n_expert, generator=gen)[slots].int()
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


def run_experts_bench(
    config: ExpertsBenchConfig,
    *,
    num_threads: int,
    isa: str,
    why: str,
    tile_isas: tuple[str, ...] = ("auto",),
    tile_min_tokens: int | None = None,
    per_expert: tuple[int, ...] = (),
    copy_to_ram: bool = False,
) -> list[PointResult]:
    """Prints the tables; returns the T-table points of every tile setting, in order. ``copy_to_ram``: the
    experts read a copy in private memory with transparent huge pages requested (the engine's
    ``--expert-memory ram``) instead of the arrays they were made in."""
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
    runs = [
        CPUExperts(*layer, num_threads=num_threads, isa=isa, tile_isa=t, tile_min_tokens=tile_min_tokens,
                   copy_to_ram=copy_to_ram)
        for t in tile_isas
    ]
    print(f"  expert memory: {'a private copy, huge pages requested' if copy_to_ram else 'the arrays as made'}")
    probe_bytes = min(config.probe_bytes, _total_memory_bytes() // 8)
    host_gbs = native.read_bandwidth(probe_bytes, runs[0].num_threads, 5)
    print(f"  threads: {runs[0].num_threads}, kernels: {runs[0].isa}; host read bandwidth with "
          f"{runs[0].num_threads} threads: {host_gbs:.1f} GB/s (best of 5 reads of {probe_bytes / 2**30:.1f} GiB)")
    gen = torch.Generator().manual_seed(0)
    results = []
    for experts in runs:
        print()
        print(f"  tiles: {_tiles_label(experts)}")
        header = (f"{'T':>6} {'ms/layer':>10} {'experts read':>13} {'GB/s':>8} {'% of host':>10}  "
                  "target (16-core GPU host)")
        print(header)
        print("-" * len(header))
        for num_tokens in config.tokens:
            r = _measure(experts, config, num_tokens, gen)
            share = r.gbs / host_gbs
            target = _target(num_tokens, share, r.ms_per_layer) if _is_r1_layer(config) else "n/a (not the R1 layer)"
            print(f"{r.num_tokens:>6} {r.ms_per_layer:>10.2f} {r.experts_per_call:>13.1f} {r.gbs:>8.1f} "
                  f"{share:>10.1%}  {target}", flush=True)
            results.append(r)
        phases = ", ".join(f"{name} {ms:.3f}" for name, ms in experts.last_phase_ms.items())
        print(f"  phases of the last call at T={config.tokens[-1]} (ms): {phases}")
    if per_expert:
        _per_expert_table(runs, config, per_expert, host_gbs, gen)
    print()
    print("GB/s counts each distinct expert once per call (its bytes / the call's time); targets apply to the "
          "full R1 layer on the lent 16-core host (reference: KTransformers 3.0 ms at T=1 with 14 threads).")
    return results


def _tiles_label(experts: CPUExperts) -> str:
    if experts.tile_isa == "off":
        return "off (row kernels for every expert)"
    return f"{experts.tile_isa} for experts with >= {experts.tile_min_tokens} tokens, row kernels below"


def _per_expert_table(
    runs: list[CPUExperts], config: ExpertsBenchConfig, per_expert: tuple[int, ...], host_gbs: float,
    gen: torch.Generator,
) -> None:
    """Every expert active with exactly n tokens: ms per layer of each tile setting side by side."""
    if config.n_expert % config.top_k:
        raise KsdkError(f"--per-expert needs n_expert ({config.n_expert}) divisible by top_k ({config.top_k})")
    print()
    print(f"  every expert given exactly n tokens (T = n * {config.n_expert // config.top_k}); ms/layer "
          f"(% of host bandwidth) per tile setting")
    header = f"{'n':>4} {'T':>6}" + "".join(f" {e.tile_isa:>20}" for e in runs)
    print(header)
    print("-" * len(header))
    for n in per_expert:
        num_tokens = n * config.n_expert // config.top_k
        cells = []
        for experts in runs:
            r = _measure(experts, config, num_tokens, gen, uniform=True)
            cells.append(f"{r.ms_per_layer:>10.2f} ({r.gbs / host_gbs:>6.1%})")
        print(f"{n:>4} {num_tokens:>6}" + "".join(f" {c:>20}" for c in cells), flush=True)


def _tile_isa_list(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    unknown = [v for v in values if v not in TILE_ISAS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--tile-isa {text!r}: {unknown[0]!r} is unknown; allowed: "
                                         f"{', '.join(TILE_ISAS)} (comma-separated)")
    return values


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
        run_experts_bench(
            config,
            num_threads=num_threads,
            isa=args.isa,
            why=why,
            tile_isas=args.tile_isa,
            tile_min_tokens=args.tile_min_tokens,
            per_expert=args.per_expert or (),
            copy_to_ram=args.copy_to_ram,
        )
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
    parser.add_argument("--copy-to-ram", action="store_true",
                        help="read the experts from a private copy with transparent huge pages requested, as the "
                        "engine's --expert-memory ram does")
    parser.add_argument("--tokens", type=_token_list, help="comma-separated T values (default 1,4,16,64,256,1024)")
    parser.add_argument("--seconds", type=float, help="time budget per T (default 1.0; at least 3 calls)")
    parser.add_argument("--isa", default="auto", choices=["auto", "scalar", "avx2", "avx512vnni"],
                        help="row-kernel family (default: the best this CPU runs)")
    parser.add_argument("--tile-isa", type=_tile_isa_list, default=("auto",),
                        help="prefill tile path, comma-separated for one table each on the same layer: auto, amx, "
                        "amx-emulated, off (default auto: AMX where the CPU has it)")
    parser.add_argument("--tile-min-tokens", type=_positive_int,
                        help="tokens an expert needs for the tile path (default: the native default)")
    parser.add_argument("--per-expert", type=_token_list,
                        help="also time every expert given exactly n tokens, for these n (comma-separated)")
    parser.set_defaults(run=_run)

"""Sweeps the k-quant kernels' prefetch settings on the R1 layer (one layer built once, settings
interleaved over `rounds` so drift hits them alike): ms and share of host bandwidth per T.
Usage: python native/tools/prefetch_sweep.py [settings, e.g. 1024+l2,2048] [tokens] [threads] [rounds]"""

import sys

import torch

from ksdk.bench.experts import FULL, _make_layer, _measure
from ksdk.offload.cpu_experts import CPUExperts, default_num_threads
from ksdk.offload.native import load_native

settings = (sys.argv[1] if len(sys.argv) > 1 else "1024+l2,2048+l2,1024,2048").split(",")
tokens = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,4,16").split(",")]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else default_num_threads()
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
native = load_native()
config = FULL.__class__(**{**FULL.__dict__, "seconds_per_point": 0.3})
experts = CPUExperts(*_make_layer(config), num_threads=threads, isa="auto")
host = native.read_bandwidth(4 << 30, experts.num_threads, 5)
print(f"threads {experts.num_threads}, host read {host:.1f} GB/s")
gen = torch.Generator().manual_seed(0)
for round_ in range(rounds):
    for setting in settings:
        distance, _, l2 = setting.partition("+")
        native.set_prefetch_distance(int(distance))
        native.set_prefetch_next_row(l2 == "l2")
        cells = []
        for t in tokens:
            r = _measure(experts, config, t, gen)
            cells.append(f"T={t}: {r.ms_per_layer:7.2f} ms {r.gbs / host:6.1%}")
        print(f"round {round_} {setting:>9}  " + "  ".join(cells), flush=True)

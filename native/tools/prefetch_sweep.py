"""Sweeps the k-quant kernels' prefetch distance on the R1 layer (one layer built once): ms and share of
host bandwidth per T. Usage: python native/tools/prefetch_sweep.py [distances] [tokens] [threads]"""

import sys

import torch

from ksdk.bench.experts import FULL, _make_layer, _measure
from ksdk.offload.cpu_experts import CPUExperts, default_num_threads
from ksdk.offload.native import load_native

distances = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "0,512,1024,2048,4096").split(",")]
tokens = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,4,16").split(",")]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else default_num_threads()
native = load_native()
config = FULL.__class__(**{**FULL.__dict__, "seconds_per_point": 0.3})
experts = CPUExperts(*_make_layer(config), num_threads=threads, isa="auto")
host = native.read_bandwidth(4 << 30, experts.num_threads, 5)
print(f"threads {experts.num_threads}, host read {host:.1f} GB/s")
gen = torch.Generator().manual_seed(0)
for d in distances:
    native.set_prefetch_distance(d)
    cells = []
    for t in tokens:
        r = _measure(experts, config, t, gen)
        cells.append(f"T={t}: {r.ms_per_layer:7.2f} ms {r.gbs / host:6.1%}")
    print(f"dist {d:5d}  " + "  ".join(cells), flush=True)

"""What the host-call tests share: a small expert layer and one MoE layer's fixed call buffers."""

from __future__ import annotations

import gguf
import torch

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.offload import CPUExperts, load_native

Q = gguf.GGMLQuantizationType
N_EXPERT, HIDDEN, INTER, TOP_K = 8, 256, 512, 4


def make_experts(seed: int, up_type: gguf.GGMLQuantizationType = Q.Q4_K) -> CPUExperts:
    """Q4_K gate, ``up_type`` up and Q6_K down, random valid blocks, on 2 threads."""
    return CPUExperts(random_expert_tensor(Q.Q4_K, N_EXPERT, INTER, HIDDEN, seed=seed),
                      random_expert_tensor(up_type, N_EXPERT, INTER, HIDDEN, seed=seed + 1),
                      random_expert_tensor(Q.Q6_K, N_EXPERT, HIDDEN, INTER, seed=seed + 2), num_threads=2)


class Buffers:
    """Fixed buffers as a captured step would own them (pinned there; plain host memory here)."""

    def __init__(self, num_tokens: int, x_dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_tokens, HIDDEN, generator=gen).to(x_dtype)
        self.ids = torch.stack([torch.randperm(N_EXPERT, generator=gen)[:TOP_K] for _ in range(num_tokens)])
        self.weights = torch.rand(num_tokens, TOP_K, generator=gen)
        self.out = torch.full((num_tokens, HIDDEN), float("nan"))

    def host_call(self, experts: CPUExperts, log: object) -> object:
        return load_native().HostCall(experts._runner, log, self.x.data_ptr(), self.x.dtype == torch.bfloat16,
                                      self.ids.data_ptr(), True, self.weights.data_ptr(), self.out.data_ptr(),
                                      self.x.shape[0], TOP_K, HIDDEN)

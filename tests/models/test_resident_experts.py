"""A model on the GPU keeping some routed experts in GPU memory (ExpertOptions.gpu_bytes): the budget becomes
experts per layer, and decoding gives the same greedy tokens as with every routed expert on the CPU, from the
step graph and eagerly, with the long-prompt streaming path too. All tests need a CUDA GPU and the native
extension."""

from __future__ import annotations

import pytest
import torch

from ksdk.layers.moe import MoE
from ksdk.models import DeepseekForCausalLM, load_model
from ksdk.models.config import ModelConfig
from ksdk.offload.gpu_experts import ExpertLayout
from ksdk.offload.native import native_available
from ksdk.offload.options import ExpertOptions
from ksdk.testing import tiny_gguf
from ksdk.testing.greedy import forced_logits, greedy_generate, prefill_logits
from ksdk.weights.gguf_file import GGUFFile
from tests.models.test_decode_graph import batched_run, in_mode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not native_available(), reason="ksdk._native not built")]

PER_LAYER = 6
PROMPTS = [[0, 1000, 2000, 3000, 4000, 5000, 6000, 7000], list(range(400, 650))]


def load(gpu_experts: int, **options: object) -> DeepseekForCausalLM:
    gguf = GGUFFile.open(tiny_gguf("v3", "Q8_0"))
    config = ModelConfig.from_gguf(gguf.metadata)
    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    views = [gguf.tensor(f"blk.{moe_layers[0]}.ffn_{w}_exps.weight") for w in ("gate", "up", "down")]
    budget = gpu_experts * len(moe_layers) * ExpertLayout.from_views(*views).nbytes
    opts = ExpertOptions(**{"backend": "native", "gpu_stream_threshold": 0, "gpu_bytes": budget, **options})
    return load_model(gguf, device="cuda", dtype=torch.float32, experts=opts)


@pytest.fixture(scope="module")
def resident() -> DeepseekForCausalLM:
    return load(PER_LAYER)


@pytest.fixture(scope="module")
def all_on_cpu() -> DeepseekForCausalLM:
    return load(0)


def test_the_budget_puts_experts_in_every_moe_layer(resident: DeepseekForCausalLM) -> None:
    moes = [layer.ffn for layer in resident.layers if isinstance(layer.ffn, MoE)]
    assert moes and all(m.resident is not None and m.resident.experts == list(range(PER_LAYER)) for m in moes)
    assert all(m.resident.weights.is_cuda for m in moes)


def test_logits_match_every_expert_on_the_cpu(resident: DeepseekForCausalLM,
                                              all_on_cpu: DeepseekForCausalLM) -> None:
    """Fed the same tokens, the two differ by the CPU kernels' activation quantization, which the resident
    experts (fp32 on the GPU) do not have: on this chaotic random model that is the native-vs-torch bound of
    tests/models/test_native_experts.py (logits cosine >= 0.99 everywhere, >= 0.998 on average, >= 80% top-1
    agreement), since greedy tokens part at the first near tie."""
    for mode in ("step", "off"):
        for ids in PROMPTS:
            continuation = in_mode(all_on_cpu, mode, lambda: greedy_generate(all_on_cpu, ids, 16))
            got = in_mode(resident, mode, lambda: forced_logits(resident, ids, continuation[:-1]))
            want = in_mode(all_on_cpu, mode, lambda: forced_logits(all_on_cpu, ids, continuation[:-1]))
            assert want.argmax(dim=1).tolist() == continuation
            cosines = torch.nn.functional.cosine_similarity(got, want, dim=1)
            assert cosines.min().item() >= 0.99 and cosines.mean().item() >= 0.998, (mode, cosines.tolist())
            assert (got.argmax(dim=1) == want.argmax(dim=1)).float().mean().item() >= 0.8, mode


def test_step_graph_equals_eager_with_resident_experts(resident: DeepseekForCausalLM) -> None:
    eager = in_mode(resident, "attention", lambda: batched_run(resident, 10))
    graphed = in_mode(resident, "step", lambda: batched_run(resident, 10))
    assert graphed == eager
    assert resident.decode_graphs._graphs


def test_streamed_long_prompts_skip_the_resident_experts() -> None:
    """A prompt past the streaming threshold: the GPU streams the other experts and computes the resident
    ones in place, all in fp32 on the GPU, as when it streams them all."""
    with_resident, without = load(PER_LAYER, gpu_stream_threshold=16), load(0, gpu_stream_threshold=16)
    got, want = prefill_logits(with_resident, PROMPTS[1]), prefill_logits(without, PROMPTS[1])
    hybrids = [layer.ffn.experts for layer in with_resident.layers if isinstance(layer.ffn, MoE)]
    assert all(h.last_path == "gpu" for h in hybrids)
    assert ((got - want).norm() / want.norm()).item() < 1e-4

"""Routed experts held in GPU memory (ksdk.offload.resident): the budget's share per layer, the ids hidden from
the CPU side, and their output against TorchExperts on the same experts. The math runs on CPU tensors through
Triton's interpreter here; the model on a GPU is tested in tests/models/test_resident_experts.py."""

from __future__ import annotations

import pytest
import torch

from ksdk.errors import InvalidRequestError
from ksdk.layers.moe import MoE, TorchExperts
from ksdk.models import load_model
from ksdk.offload.options import ExpertOptions
from ksdk.offload.resident import GEMV_MAX_TOKENS, ResidentExperts, resident_counts
from ksdk.testing import tiny_gguf
from ksdk.weights.gguf_file import GGUFFile
from tests.kernels.test_gpu_experts import assert_close, mixed_views, random_routing, tiny_layer_views

CPU = torch.device("cpu")


def test_the_budget_is_shared_evenly_then_what_is_left_fills_layers_in_order() -> None:
    assert resident_counts(0, [10, 10, 10], 16) == [0, 0, 0]
    assert resident_counts(75, [10, 10, 10], 16) == [3, 2, 2]  # 2 each (60 bytes), 15 left: one more in layer 0
    assert resident_counts(10_000, [10, 10], 16) == [16, 16]  # never more than a layer has
    assert resident_counts(25, [10, 20], 16) == [1, 0]  # the even share is 0; the small layer still fits one
    assert resident_counts(100, [], 16) == []
    with pytest.raises(ValueError, match="bytes >= 0"):
        resident_counts(-1, [10], 16)


def test_host_ids_hide_the_resident_experts() -> None:
    resident = ResidentExperts(*tiny_layer_views(), experts=[3, 1], device=CPU)
    assert resident.experts == [1, 3] and resident.slots[[1, 3, 0]].tolist() == [0, 1, -1]
    ids = torch.tensor([[1, 2], [3, 1], [0, 5]])
    assert resident.host_ids(ids).tolist() == [[-1, 2], [-1, -1], [0, 5]]
    assert resident.nbytes == 2 * resident.layout.nbytes


def test_resident_experts_refuse_bad_ids() -> None:
    for bad in ([1, 1], [16], [-1]):
        with pytest.raises(ValueError, match="distinct ids"):
            ResidentExperts(*tiny_layer_views(), experts=bad, device=CPU)


@pytest.mark.parametrize("views", ["tiny", "mixed"])
@pytest.mark.parametrize("num_tokens", [3, GEMV_MAX_TOKENS + 8], ids=lambda t: f"T{t}")
def test_resident_output_matches_torch_experts_on_those_experts(views: str, num_tokens: int) -> None:
    """Per-pair kernels at decode sizes, expert by expert past GEMV_MAX_TOKENS; slots of other experts add 0."""
    gate, up, down = tiny_layer_views() if views == "tiny" else mixed_views()
    n_expert = gate.shape[0]
    resident = ResidentExperts(gate, up, down, experts=[0, 2] if views == "mixed" else [1, 6, 11], device=CPU)
    ids, weights = random_routing(num_tokens, n_expert, 2, seed=num_tokens)
    x = torch.randn(num_tokens, resident.layout.hidden, generator=torch.Generator().manual_seed(4))
    out = resident.forward(x, ids, weights)
    on_gpu = torch.where(resident.host_ids(ids) < 0, ids, -1)  # the resident slots only
    ref = TorchExperts(gate, up, down, CPU, torch.float32).forward(x, on_gpu, weights)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, torch.float32)
    untouched = (on_gpu < 0).all(dim=1)
    assert untouched.any() and torch.equal(out[untouched], torch.zeros_like(out[untouched]))


def test_moe_with_resident_experts_equals_moe_without() -> None:
    """The CPU side (here TorchExperts) gets the other slots as -1 and the two sums add up to the whole."""
    gate, up, down = tiny_layer_views()
    torch_experts = TorchExperts(gate, up, down, CPU, torch.float32)
    n_expert, hidden = gate.shape[0], gate.shape[2]

    class Router(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return random_routing(x.shape[0], n_expert, 4, seed=x.shape[0])

    x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(5))
    whole = MoE(Router(), torch_experts, None)(x)
    resident = ResidentExperts(gate, up, down, experts=range(0, n_expert, 2), device=CPU)
    split = MoE(Router(), torch_experts, None, resident)(x)
    assert_close(split, whole, torch.float32)


def test_gpu_expert_memory_needs_a_gpu_and_a_size() -> None:
    with pytest.raises(InvalidRequestError, match="needs a model on a CUDA device"):
        load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), device="cpu", experts=ExpertOptions(gpu_bytes=1 << 20))
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="gpu_expert_memory="):
            ExpertOptions(gpu_bytes=bad)  # type: ignore[arg-type]


def test_a_budget_the_gpu_cannot_hold_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResidentExperts' allocation failing for lack of GPU memory becomes InvalidRequestError naming the option."""
    from ksdk.models import deepseek
    from ksdk.models.config import ModelConfig
    from ksdk.offload import resident

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(resident, "ResidentExperts", out_of_memory)
    gguf = GGUFFile.open(tiny_gguf("v3", "Q8_0"))
    config = ModelConfig.from_gguf(gguf.metadata)
    layer = next(i for i in range(config.num_layers) if config.is_moe_layer(i))
    options = ExpertOptions(backend="torch", gpu_bytes=1 << 40)
    with pytest.raises(InvalidRequestError, match=r"gpu_expert_memory=1099511627776 bytes do not fit.*layer"):
        deepseek._ffn(config, gguf, layer, lambda name: None, CPU, torch.float32, options, None, num_resident=4)

"""route (the fused expert choice) against its torch reference and Router.forward."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.router import route, route_reference

V3 = dict(top_k=4, num_groups=4, topk_groups=2, sigmoid=True, normalize=True, scaling=2.5)
RULES = {
    "v3": V3,
    "v3-odd-groups": dict(top_k=3, num_groups=3, topk_groups=2, sigmoid=True, normalize=True, scaling=1.5),
    "v3-ungrouped": dict(top_k=6, num_groups=1, topk_groups=1, sigmoid=True, normalize=False, scaling=1.0),
    "v2-greedy": dict(top_k=2, sigmoid=False, normalize=False),
    "v2-grouped": dict(top_k=3, num_groups=4, topk_groups=2, sigmoid=False, normalize=True, scaling=16.0),
}


def _inputs(T: int, E: int, bias: bool, device: torch.device, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    b = torch.randn(E, generator=g) * 0.5 if bias else None  # large enough to change the choice
    return logits.to(device), None if b is None else b.to(device)


def _by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's (id, weight) pairs by id: the order of the chosen experts is not part of the result."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("T", "E"), [(1, 24), (7, 48)])
def test_route_matches_reference(name: str, T: int, E: int, device: torch.device) -> None:
    rule = RULES[name]
    logits, bias = _inputs(T, E, rule["sigmoid"], device, seed=T)
    ids, weights = route(logits, bias, **rule)
    ref_ids, ref_weights = route_reference(logits, bias, **rule)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (T, rule["top_k"])
    ids, weights = _by_expert(ids, weights)
    ref_ids, ref_weights = _by_expert(ref_ids, ref_weights)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)


def test_bias_chooses_but_does_not_weigh(device: torch.device) -> None:
    """A bias that promotes expert 0 everywhere: chosen, but weighted by its own (small) sigmoid score."""
    rule = dict(top_k=2, sigmoid=True, normalize=False)
    logits = torch.tensor([[-3.0, 2.0, 1.0, 0.0]], device=device)
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0], device=device)
    ids, weights = route(logits, bias, **rule)
    assert ids.tolist() == [[0, 1]]  # best first
    torch.testing.assert_close(weights, logits.sigmoid()[:, :2])


def test_group_limit_beats_a_lone_high_score(device: torch.device) -> None:
    """Group 0 has the single best expert but the worst top-2 sum: V3 skips it; V2 (best score) keeps it."""
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 2.0, 2.0, 1.0, 1.0]], device=device)
    v3 = dict(top_k=2, num_groups=2, topk_groups=1, sigmoid=True, normalize=True)
    assert sorted(route(logits, None, **v3)[0].tolist()[0]) == [4, 5]
    v2 = dict(top_k=2, num_groups=2, topk_groups=1, sigmoid=False, normalize=False)
    assert sorted(route(logits, None, **v2)[0].tolist()[0]) == [0, 1]


def test_ties_go_to_the_lower_index(device: torch.device) -> None:
    logits = torch.zeros(1, 8, device=device)
    ids, _ = route(logits, None, top_k=3, num_groups=4, topk_groups=2, sigmoid=True)
    assert ids.tolist() == [[0, 1, 2]]


def test_router_module_uses_the_same_rule(device: torch.device) -> None:
    """Router.forward (GEMM + this kernel on a GPU, torch ops on the CPU) against the reference."""
    import ksdk.models  # noqa: F401  (first: ksdk.layers.moe's config import goes through ksdk.models)
    from ksdk.layers.moe import Router
    from ksdk.models.config import ModelConfig

    config = ModelConfig.__new__(ModelConfig)
    fields = dict(num_experts_per_tok=4, num_groups=4, topk_groups=2, gating="sigmoid", norm_topk_prob=True,
                  routed_scaling_factor=2.5)
    for key, value in fields.items():
        object.__setattr__(config, key, value)
    g = torch.Generator().manual_seed(3)
    weight, bias, x = torch.randn(24, 32, generator=g), torch.randn(24, generator=g) * 0.5, torch.randn(5, 32, generator=g)
    router = Router(config, weight.to(device), bias.to(device))
    ids, weights = router(x.to(device))
    ref_ids, ref_weights = route_reference(torch.nn.functional.linear(x, weight).to(device), bias.to(device), **V3)
    ids, weights = _by_expert(ids, weights)
    ref_ids, ref_weights = _by_expert(ref_ids, ref_weights)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-5)


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    logits, bias = _inputs(2, 24, True, device)
    with pytest.raises(ValueError, match="logits is torch.float64"):
        route(logits.double(), bias, **V3)
    with pytest.raises(ValueError, match=r"bias is torch.float32 \(23,\)"):
        route(logits, bias[:-1], **V3)
    with pytest.raises(ValueError, match="cannot route 24 experts in 5 groups"):
        route(logits, bias, top_k=2, num_groups=5, topk_groups=2)


@pytest.mark.gpu
def test_r1_routing_on_the_gpu() -> None:
    """R1's 256 experts in 8 groups, top-4 groups, top-8 experts, at decode and prefill sizes."""
    r1 = dict(top_k=8, num_groups=8, topk_groups=4, sigmoid=True, normalize=True, scaling=2.5)
    for T in (1, 16, 512):
        logits, bias = _inputs(T, 256, True, torch.device("cuda"), seed=T)
        ids, weights = _by_expert(*route(logits, bias, **r1))
        ref_ids, ref_weights = _by_expert(*route_reference(logits, bias, **r1))
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)

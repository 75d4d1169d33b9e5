"""Expert choice from router logits in one launch (everything :class:`ksdk.layers.moe.Router` does after W_g·x).

Per token, over E experts in G groups of E/G:
``s = sigmoid(logits)`` (V3/R1) or ``softmax(logits)`` (V2), ``c = s + bias`` (when there is a bias). When
groups limit the choice, each group scores the sum of its two best c (V3/R1) or its best c (V2); the experts
of all but the ``topk_groups`` best groups get c = −inf (V3/R1) or 0 (V2). The ``top_k`` best c name the
experts; their weights are the unbiased s, divided by (their sum + 1e-20) when ``normalize``, times ``scaling``.

One program per token keeps all E scores in registers and selects by repeated arg-max. Ties (equal c, or
equal group scores) go to the lower index; torch's topk leaves ties unspecified, so the two can differ only
where two candidates' fp32 scores are exactly equal. Experts come out best first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["route", "route_reference"]


def _grouped(num_groups: int, topk_groups: int) -> bool:
    return num_groups > 1 and topk_groups < num_groups


def route_reference(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, num_groups: int = 1,
                    topk_groups: int = 1, sigmoid: bool = True, normalize: bool = True,
                    scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (ids [T, k] int64, weights [T, k] fp32) with torch ops (Router.forward's math)."""
    T = logits.shape[0]
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if _grouped(num_groups, topk_groups):
        grouped = choice.view(T, num_groups, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1) if sigmoid else grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_groups, dim=-1, sorted=False).indices, True)
        fill = float("-inf") if sigmoid else 0.0
        choice = grouped.masked_fill(~keep[..., None], fill).view_as(choice)
    ids = choice.topk(top_k, dim=-1, sorted=False).indices  # [T, k]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


@triton.jit
def _first_argmax(values, index, BIG: tl.constexpr):
    """The lowest ``index`` among the largest ``values`` (2-D blocks), and that largest value."""
    best = tl.max(tl.max(values, axis=1), axis=0)
    return tl.min(tl.min(tl.where(values == best, index, BIG), axis=1), axis=0), best


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, stride_l, stride_i, stride_w, scaling,
                  NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, NORMALIZE: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    ok = (g[:, None] < NUM_GROUPS) & (j[None, :] < GROUP_SIZE)
    expert = g[:, None] * GROUP_SIZE + j[None, :]  # [BG, BJ]
    BIG: tl.constexpr = BLOCK_G * BLOCK_J
    logits = tl.load(logits_ptr + t * stride_l + expert, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        top = tl.max(tl.max(logits, axis=1), axis=0)
        p = tl.exp(logits - top)
        scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
    scores = tl.where(ok, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + expert, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))

    if GROUPED:
        if SIGMOID:  # a group's two best: drop one occurrence of the best, take the best of the rest
            first = tl.max(choice, axis=1)
            first_j = tl.min(tl.where(choice == first[:, None], j[None, :], BLOCK_J), axis=1)
            second = tl.max(tl.where(j[None, :] == first_j[:, None], float("-inf"), choice), axis=1)
            group_score = first + second
        else:
            group_score = tl.max(choice, axis=1)
        group_score = tl.where(g < NUM_GROUPS, group_score, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.max(group_score, axis=0)
            pick = tl.min(tl.where(group_score == best, g, BLOCK_G), axis=0)
            keep = keep | (g == pick)
            group_score = tl.where(g == pick, float("-inf"), group_score)
        if SIGMOID:
            choice = tl.where(keep[:, None], choice, float("-inf"))
        else:
            choice = tl.where(keep[:, None] | ~ok, choice, 0.0)

    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pick, _ = _first_argmax(choice, expert, BIG)
        chosen = expert == pick
        w = tl.sum(tl.sum(tl.where(chosen, scores, 0.0), axis=1), axis=0)
        ids = tl.where(k == slot, pick.to(tl.int64), ids)
        weights = tl.where(k == slot, w, weights)
        choice = tl.where(chosen, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    tl.store(ids_ptr + t * stride_i + k, ids, mask=k < TOP_K)
    tl.store(weights_ptr + t * stride_w + k, weights * scaling, mask=k < TOP_K)


def route(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, num_groups: int = 1, topk_groups: int = 1,
          sigmoid: bool = True, normalize: bool = True, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 (unit last stride), bias [E] fp32 or None -> (ids [T, k] int64, weights [T, k] fp32),
    experts best first. The keywords are the model's routing constants (see the module docstring)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits is {logits.dtype} {tuple(logits.shape)} with strides {logits.stride()}; "
                         "expected float32 [T, E] with unit last stride")
    T, E = logits.shape
    if bias is not None and (bias.shape != (E,) or bias.dtype != torch.float32 or not bias.is_contiguous()
                             or bias.device != logits.device):
        raise ValueError(f"bias is {bias.dtype} {tuple(bias.shape)} on {bias.device}; "
                         f"expected contiguous float32 [{E}] on {logits.device}")
    grouped = _grouped(num_groups, topk_groups)
    groups = num_groups if grouped else 1
    if E % groups or not 0 < top_k <= E or (grouped and sigmoid and E // groups < 2):
        raise ValueError(f"cannot route {E} experts in {groups} groups to top_k={top_k} "
                         "(groups must divide the experts, hold two each when scored by their top-2, and 0 < top_k <= E)")
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T > 0:
        _route_kernel[(T,)](
            logits, logits if bias is None else bias, ids, weights, logits.stride(0), ids.stride(0),
            weights.stride(0), scaling,
            NUM_GROUPS=groups, GROUP_SIZE=E // groups, TOPK_GROUPS=topk_groups, TOP_K=top_k,
            SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUPED=grouped, NORMALIZE=normalize,
            BLOCK_G=triton.next_power_of_2(groups), BLOCK_J=triton.next_power_of_2(E // groups),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4,
        )
    return ids, weights

"""The online-softmax step the flash-style attention kernels share (MLA decode and prefill)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["online_softmax_step"]


@triton.jit
def online_softmax_step(acc, l_i, m_i, scores, v, DOT_FP32: tl.constexpr):
    """Fold one block of log2-scaled ``scores`` [M, N] (masked entries -inf) and its values ``v`` [N, D] into the
    running max ``m_i`` [M], sum ``l_i`` [M] and fp32 output ``acc`` [M, D]; returns the three updated."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    probs = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    if DOT_FP32:
        acc = tl.dot(probs, v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(probs.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new

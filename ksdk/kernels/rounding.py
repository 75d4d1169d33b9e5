"""Rounding an fp32 value to a storage dtype's precision inside a Triton kernel, keeping it in fp32.

Kernels that reproduce torch's eager roundings (each op's result stored in bf16, say) need a rounding the
compiler cannot undo: Triton rewrites ``(a * b).to(bf16).to(fp32) - c`` into a bf16 fused multiply-add, which
rounds once where the eager ops round twice (seen on the H100: one bf16 ulp off now and then). So bf16 is
rounded by integer arithmetic on the bits (to nearest, ties to even), which also gets right what Triton's CPU
interpreter (triton 3.9) truncates.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to"]


@triton.jit
def round_to(x, ROUND: tl.constexpr):
    """fp32 x -> fp32 holding x rounded to ``ROUND`` (bfloat16, float16, or float32: unchanged)."""
    if ROUND == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    elif ROUND == tl.float16:  # a cast pair: fp16 has no such shortcut across its subnormals
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y

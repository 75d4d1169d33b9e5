"""A MoE layer's hand-off to the host experts in a captured decode step, as two small kernels on pinned memory.

Copy-engine transfers cost a captured step more than their bytes: each copy node waits for the one before it,
and the first kernel after a host-to-device copy starts about 8 us after the copy ends (measured on the H100).
So the step's kernels read and write the pinned host buffers themselves (they are mapped into the GPU's
address space):

- :func:`stage_to_host` writes the layer's hidden states, expert ids and weights into the host buffers, one
  launch for all three (ids of experts resident on the GPU written as -1: the host skips them);
- :func:`add_from_host` reads the experts' fp32 output back, adds the resident experts' (fp32), rounds to the
  hidden states' dtype and adds the shared expert's output, as ``(routed + resident).to(dtype) + shared``
  does in eager torch (same roundings).

Both also run in Triton's CPU interpreter, on plain host tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ksdk.kernels.rounding import round_to

__all__ = ["add_from_host", "add_from_host_reference", "stage_to_host"]

_BLOCK = 1024


@triton.jit
def _stage_kernel(x_ptr, ids_ptr, w_ptr, slots_ptr, host_x_ptr, host_ids_ptr, host_w_ptr, NX, NK,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SLOTS: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(host_x_ptr + i, tl.load(x_ptr + i, mask=i < NX), mask=i < NX)
    if tl.program_id(0) == 0:
        j = tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + j, mask=j < NK, other=0)
        if HAS_SLOTS:
            ids = tl.where(tl.load(slots_ptr + ids, mask=j < NK, other=-1) >= 0, -1, ids)
        tl.store(host_ids_ptr + j, ids, mask=j < NK)
        tl.store(host_w_ptr + j, tl.load(w_ptr + j, mask=j < NK), mask=j < NK)


def stage_to_host(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, host_x: torch.Tensor,
                  host_ids: torch.Tensor, host_weights: torch.Tensor, resident_slots: torch.Tensor | None = None) -> None:
    """Copy x, ids and weights (contiguous, of the host buffers' dtypes and shapes) into the pinned host
    buffers, in one launch on the current stream. With ``resident_slots`` (int32 [E] on the device, -1 for
    experts that are not on the GPU), the ids of resident experts are written as -1."""
    for dev, host in ((x, host_x), (ids, host_ids), (weights, host_weights)):
        if dev.shape != host.shape or dev.dtype != host.dtype or not (dev.is_contiguous() and host.is_contiguous()):
            raise ValueError(f"{dev.dtype} {tuple(dev.shape)} cannot be staged into {host.dtype} {tuple(host.shape)} "
                             f"(both contiguous, same dtype and shape)")
    if ids.numel() != weights.numel():
        raise ValueError(f"ids has {ids.numel()} values but weights {weights.numel()}")
    if resident_slots is not None and (resident_slots.dtype != torch.int32 or resident_slots.dim() != 1):
        raise ValueError(f"resident_slots is {resident_slots.dtype} {tuple(resident_slots.shape)}; expected int32 [E]")
    nx, nk = x.numel(), ids.numel()
    _stage_kernel[(max(1, triton.cdiv(nx, _BLOCK)),)](
        x, ids, weights, resident_slots if resident_slots is not None else ids, host_x, host_ids, host_weights,
        nx, nk, BLOCK=_BLOCK, BLOCK_K=triton.next_power_of_2(max(nk, 16)), HAS_SLOTS=resident_slots is not None)


@triton.jit
def _add_from_host_kernel(host_ptr, resident_ptr, shared_ptr, out_ptr, N, HAS_RESIDENT: tl.constexpr,
                          HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    y = tl.load(host_ptr + i, mask=ok, other=0.0)
    if HAS_RESIDENT:
        y += tl.load(resident_ptr + i, mask=ok, other=0.0)
    y = round_to(y, out_ptr.dtype.element_ty)
    if HAS_SHARED:
        y = round_to(y + tl.load(shared_ptr + i, mask=ok, other=0.0).to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_from_host(host_out: torch.Tensor, shared: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device, resident: torch.Tensor | None = None) -> torch.Tensor:
    """host_out (pinned fp32 [T, H]) plus ``resident`` (fp32 [T, H] on ``device``) when given, rounded to
    ``dtype``, plus ``shared`` ([T, H] in ``dtype``) when given, as a new tensor on ``device``:
    ``(host_out.to(device) + resident).to(dtype) + shared`` in one launch."""
    if host_out.dtype != torch.float32 or not host_out.is_contiguous():
        raise ValueError(f"host_out is {host_out.dtype} (contiguous: {host_out.is_contiguous()}); "
                         f"expected contiguous fp32")
    if shared is not None and (shared.shape != host_out.shape or shared.dtype != dtype or not shared.is_contiguous()):
        raise ValueError(f"shared is {shared.dtype} {tuple(shared.shape)}; expected contiguous {dtype} "
                         f"{tuple(host_out.shape)}")
    if resident is not None and (resident.shape != host_out.shape or resident.dtype != torch.float32
                                 or not resident.is_contiguous()):
        raise ValueError(f"resident is {resident.dtype} {tuple(resident.shape)}; expected contiguous fp32 "
                         f"{tuple(host_out.shape)}")
    out = torch.empty(host_out.shape, dtype=dtype, device=device)
    n = host_out.numel()
    _add_from_host_kernel[(max(1, triton.cdiv(n, _BLOCK)),)](
        host_out, resident if resident is not None else host_out, shared if shared is not None else out, out, n,
        HAS_RESIDENT=resident is not None, HAS_SHARED=shared is not None, BLOCK=_BLOCK)
    return out


def add_from_host_reference(host_out: torch.Tensor, shared: torch.Tensor | None, dtype: torch.dtype,
                            device: torch.device, resident: torch.Tensor | None = None) -> torch.Tensor:
    """The eager ops :func:`add_from_host` replaces."""
    out = host_out.to(device)
    out = (out if resident is None else out + resident).to(dtype)
    return out if shared is None else out + shared

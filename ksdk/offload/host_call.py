"""Routed experts as a host node inside a captured CUDA graph.

In a captured decode step each MoE layer (a) copies x, expert ids and weights into fixed pinned host
buffers, (b) enqueues the native ``ksdk_moe_host_call`` with the driver's ``cuLaunchHostFunc`` (a capturing
stream records it as a host node; the driver runs it on its own thread, in stream order, without the GIL)
and (c) copies the pinned output back. The copies go through the driver as well (``cuMemcpy*Async`` on the
same stream), so that capture involves none of torch's pinned-memory bookkeeping. Errors and the time spent
in the experts land in a native ``HostCallLog`` that :func:`raise_if_failed` reads after the step.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import torch

from ksdk.errors import InvalidRequestError
from ksdk.offload.native import load_native

if TYPE_CHECKING:
    from ksdk.offload.cpu_experts import CPUExperts

__all__ = ["CudaDriver", "ExpertHostCall", "cuda_driver", "raise_if_failed"]


class CudaDriver:
    """The few driver calls a host node needs, through ctypes on ``libcuda.so.1`` (torch has no binding)."""

    def __init__(self) -> None:
        self._lib = lib = ctypes.CDLL("libcuda.so.1")
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        lib.cuLaunchHostFunc.argtypes = [vp, vp, vp]
        lib.cuMemcpyDtoHAsync_v2.argtypes = [vp, ctypes.c_uint64, size, vp]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, vp, size, vp]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in (lib.cuLaunchHostFunc, lib.cuMemcpyDtoHAsync_v2, lib.cuMemcpyHtoDAsync_v2, lib.cuGetErrorName):
            fn.restype = ctypes.c_int

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({result})")

    def launch_host_func(self, stream: int, fn: int, user_data: int) -> None:
        self._check(self._lib.cuLaunchHostFunc(stream, fn, user_data), "cuLaunchHostFunc")

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self._lib.cuMemcpyDtoHAsync_v2(dst, src, nbytes, stream), "cuMemcpyDtoHAsync")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self._lib.cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")


@functools.cache
def cuda_driver() -> CudaDriver:
    return CudaDriver()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ExpertHostCall:
    """One MoE layer's routed experts for ``num_tokens`` tokens as a stream-ordered host call.

    The pinned buffers and the native call bound to them live as long as this object: a graph that
    captured :meth:`enqueue` must not outlive it.
    """

    def __init__(self, experts: CPUExperts, log: object, num_tokens: int, top_k: int, x_dtype: torch.dtype,
                 device: torch.device) -> None:
        if x_dtype not in (torch.float32, torch.bfloat16):
            raise InvalidRequestError(f"x_dtype={x_dtype}; the native experts read float32 or bfloat16")
        native = load_native()
        H = experts.hidden
        self.device, self.log = device, log
        self.x = torch.empty(num_tokens, H, dtype=x_dtype, pin_memory=True)
        self.ids = torch.empty(num_tokens, top_k, dtype=torch.int64, pin_memory=True)
        self.weights = torch.empty(num_tokens, top_k, dtype=torch.float32, pin_memory=True)
        self.out = torch.zeros(num_tokens, H, dtype=torch.float32, pin_memory=True)
        self._call = native.HostCall(experts.native_runner, log, self.x.data_ptr(), x_dtype == torch.bfloat16,
                                     self.ids.data_ptr(), True, self.weights.data_ptr(), self.out.data_ptr(),
                                     num_tokens, top_k, H)
        self._fn = native.moe_host_call_address()

    def enqueue(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """On the current stream (capturable): x [T, H] in x_dtype, ids [T, k] int64, weights [T, k] fp32
        on the device -> [T, H] fp32 routed output on the device, ready in stream order."""
        assert x.shape == self.x.shape and ids.shape == self.ids.shape and weights.shape == self.weights.shape
        x, ids, weights = x.to(self.x.dtype).contiguous(), ids.contiguous(), weights.float().contiguous()
        assert ids.dtype == torch.int64
        stream = torch.cuda.current_stream(self.device).cuda_stream
        driver = cuda_driver()
        for host, dev in ((self.x, x), (self.ids, ids), (self.weights, weights)):
            driver.copy_to_host(host.data_ptr(), dev.data_ptr(), _nbytes(host), stream)
        driver.launch_host_func(stream, self._fn, self._call.address)
        out = torch.empty(self.out.shape, dtype=torch.float32, device=self.device)
        driver.copy_to_device(out.data_ptr(), self.out.data_ptr(), _nbytes(out), stream)
        return out


def raise_if_failed(log: object) -> None:
    """Raise the first error a host call recorded since the last check (call after the stream drained)."""
    error = log.take_error()  # type: ignore[attr-defined]
    if error:
        raise InvalidRequestError(f"routed experts in a captured decode step failed: {error}")

"""Routed experts as host work inside a captured CUDA graph.

In a captured decode step each MoE layer (a) writes x, expert ids and weights into fixed pinned host
buffers, (b) hands the native experts the call and waits for them, in stream order, and (c) reads the
pinned output back, adding the shared expert's output (``ksdk.kernels.host_staging``: kernels that read and
write the mapped host memory themselves, cheaper in a graph than copy-engine copies). Step (b) takes one of
two forms (``HOST_CALL_MODES``):

- ``"doorbell"`` (the default): the stream writes the call's id into a pinned word that a native server
  thread spins on (``cuStreamWriteValue32``), and waits until the server writes the id into a second word
  (``cuStreamWaitValue32``): the GPU and the thread only poll memory (:class:`DoorbellServer`).
- ``"driver"``: ``ksdk_moe_host_call`` as a host node (``cuLaunchHostFunc``): the driver runs it on its own
  thread, which the GPU has to wake and whose return releases the stream, twice through the driver.

Errors and the time spent in the experts land in a native ``HostCallLog`` that :func:`raise_if_failed` reads
after the step.
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

__all__ = ["CudaDriver", "DoorbellServer", "ExpertHostCall", "HOST_CALL_MODES", "cuda_driver", "raise_if_failed"]

HOST_CALL_MODES = ("doorbell", "driver")
_WAIT_VALUE_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ


class CudaDriver:
    """The few driver calls the host hand-off and the streamed experts need, through ctypes on ``libcuda.so.1``
    (torch has no binding)."""

    def __init__(self) -> None:
        self._lib = lib = ctypes.CDLL("libcuda.so.1")
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        lib.cuLaunchHostFunc.argtypes = [vp, vp, vp]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, vp, size, vp]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        u32 = ctypes.c_uint32
        lib.cuStreamWriteValue32_v2.argtypes = [vp, ctypes.c_uint64, u32, ctypes.c_uint]
        lib.cuStreamWaitValue32_v2.argtypes = [vp, ctypes.c_uint64, u32, ctypes.c_uint]
        lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), vp, ctypes.c_uint]
        for fn in (lib.cuLaunchHostFunc, lib.cuMemcpyHtoDAsync_v2, lib.cuGetErrorName,
                   lib.cuStreamWriteValue32_v2, lib.cuStreamWaitValue32_v2, lib.cuMemHostGetDevicePointer_v2):
            fn.restype = ctypes.c_int

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({result})")

    def launch_host_func(self, stream: int, fn: int, user_data: int) -> None:
        self._check(self._lib.cuLaunchHostFunc(stream, fn, user_data), "cuLaunchHostFunc")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self._lib.cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")

    def write_value(self, stream: int, address: int, value: int) -> None:
        """Write a uint32 in stream order, after the stream's earlier work (and its writes) completed."""
        self._check(self._lib.cuStreamWriteValue32_v2(stream, address, value, 0), "cuStreamWriteValue32")

    def wait_value(self, stream: int, address: int, value: int) -> None:
        """Hold the stream until the uint32 at ``address`` equals ``value``."""
        self._check(self._lib.cuStreamWaitValue32_v2(stream, address, value, _WAIT_VALUE_EQ), "cuStreamWaitValue32")

    def device_address(self, host_pointer: int) -> int:
        """The device address of pinned host memory."""
        address = ctypes.c_uint64()
        self._check(self._lib.cuMemHostGetDevicePointer_v2(ctypes.byref(address), host_pointer, 0),
                    "cuMemHostGetDevicePointer")
        return address.value


@functools.cache
def cuda_driver() -> CudaDriver:
    return CudaDriver()


class DoorbellServer:
    """The native HostCallServer on two words of pinned memory (each on its own cache line), for the host
    calls of one set of step graphs. A step is served between :meth:`arm` and :meth:`finish`."""

    def __init__(self) -> None:
        self._words = torch.zeros(32, dtype=torch.int32, pin_memory=True)
        self._native = load_native().HostCallServer(self._words[0:].data_ptr(), self._words[16:].data_ptr())
        driver = cuda_driver()
        self.doorbell = driver.device_address(self._words[0:].data_ptr())
        self.done = driver.device_address(self._words[16:].data_ptr())

    def add(self, native_call: object) -> int:
        return self._native.add(native_call)

    def arm(self, num_calls: int) -> None:
        """Serve the next ``num_calls`` calls (from the step just launched, or about to be)."""
        self._native.arm(num_calls)

    def finish(self, timeout_s: float = 5.0) -> None:
        """After the step's stream drained: every armed call was served, or RuntimeError (the server stops
        waiting either way)."""
        if not self._native.finish(int(timeout_s * 1e3)):
            raise RuntimeError("a captured decode step rang fewer doorbells than it has MoE layers")

    @property
    def served(self) -> int:
        return self._native.served


class ExpertHostCall:
    """One MoE layer's routed experts for ``num_tokens`` tokens as stream-ordered host work: through
    ``server``'s doorbell, or as a host node of the driver when ``server`` is None.

    The pinned buffers and the native call bound to them live as long as this object: a graph that
    captured :meth:`enqueue` must not outlive it.
    """

    def __init__(self, experts: CPUExperts, log: object, num_tokens: int, top_k: int, x_dtype: torch.dtype,
                 device: torch.device, server: DoorbellServer | None = None) -> None:
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
        self.server = server
        self._id = server.add(self._call) if server is not None else 0

    def enqueue(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                resident_slots: torch.Tensor | None = None) -> None:
        """On the current stream (capturable): stage x [T, H] (in x_dtype), ids [T, k] int64 and weights [T, k]
        into the pinned buffers and run the experts on them; :meth:`output` then reads the result. The ids of
        experts that ``resident_slots`` (int32 [E], -1: not on the GPU) places on the GPU are staged as -1."""
        assert x.shape == self.x.shape and ids.shape == self.ids.shape and weights.shape == self.weights.shape
        x, ids, weights = x.to(self.x.dtype).contiguous(), ids.contiguous(), weights.float().contiguous()
        assert ids.dtype == torch.int64
        from ksdk.kernels.host_staging import stage_to_host

        stage_to_host(x, ids, weights, self.x, self.ids, self.weights, resident_slots)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        driver = cuda_driver()
        if self.server is None:
            driver.launch_host_func(stream, self._fn, self._call.address)
        else:  # the doorbell's write comes after the staging kernel's writes (a system-scope fence)
            driver.write_value(stream, self.server.doorbell, self._id)
            driver.wait_value(stream, self.server.done, self._id)
            driver.write_value(stream, self.server.done, 0)  # before the next doorbell: see HostCallServer

    def output(self, dtype: torch.dtype, shared: torch.Tensor | None = None,
               resident: torch.Tensor | None = None) -> torch.Tensor:
        """After :meth:`enqueue`, on the current stream: the routed output [T, H] plus ``resident`` (the GPU's
        resident experts' fp32 output) when given, rounded to ``dtype``, plus ``shared`` (the shared expert's
        output in ``dtype``) when given, as a new device tensor."""
        from ksdk.kernels.host_staging import add_from_host

        return add_from_host(self.out, shared, dtype, self.device, resident)


def raise_if_failed(log: object) -> None:
    """Raise the first error a host call recorded since the last check (call after the stream drained)."""
    error = log.take_error()  # type: ignore[attr-defined]
    if error:
        raise InvalidRequestError(f"routed experts in a captured decode step failed: {error}")

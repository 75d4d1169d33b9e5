"""Routed experts on the CPU: native kernels on GGUF blocks (``ksdk._native``)."""

from ksdk.offload.cpu_experts import CPUExperts, default_num_threads
from ksdk.offload.native import load_native, native_available
from ksdk.offload.options import ExpertOptions

__all__ = ["CPUExperts", "ExpertOptions", "default_num_threads", "load_native", "native_available"]

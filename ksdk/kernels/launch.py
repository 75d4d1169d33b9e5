"""Launch sizing shared by the kernels."""

from __future__ import annotations

import functools

import torch

__all__ = ["num_programs_wanted"]


@functools.cache
def num_programs_wanted(device: torch.device, per_sm: int = 2) -> int:
    """Programs that fill ``device`` ``per_sm`` times over; 1 in Triton's CPU interpreter, where fewer is faster."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 1

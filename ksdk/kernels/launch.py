"""Launch sizing shared by the kernels."""

from __future__ import annotations

import functools

import torch

__all__ = ["num_programs_wanted"]


@functools.cache
def num_programs_wanted(device: torch.device) -> int:
    """Programs that fill ``device`` twice over; 1 in Triton's CPU interpreter, where fewer is faster."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1

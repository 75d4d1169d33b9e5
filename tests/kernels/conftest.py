"""Kernel tests run the Triton kernels on the GPU when there is one, else in Triton's interpreter on the CPU.

The interpreter is chosen when ``triton.jit`` decorates a kernel, so the variable must be set before any
kernel module is imported; conftest runs first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

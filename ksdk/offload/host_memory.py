"""Expert bytes copied into process memory, where the CUDA driver can read them directly.

``ExpertHostMemory`` copies one layer's expert tensors into one page-aligned anonymous mapping (own pages:
nothing else shares them, so registering it never overlaps another registration). The CPU kernels read it;
:meth:`ExpertHostMemory.register_cuda` pins it with ``cudaHostRegister`` so host-to-device copies of experts
DMA straight from it, with no staging copy through a pinned bounce buffer.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Sequence

import numpy as np

__all__ = ["ExpertHostMemory"]

logger = logging.getLogger(__name__)

_ALIGN = 4096  # each tensor starts on its own page


def _unregister(ptr: int, keepalive: mmap.mmap) -> None:
    """Undo a registration; ``keepalive`` (the mapping) stays mapped until this has run."""
    import torch

    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        logger.warning("cudaHostUnregister of expert memory failed (cudaError %d)", err)


class ExpertHostMemory:
    """Copies of ``raws`` (uint8 arrays, e.g. gate/up/down ``TensorView.raw``) in one mapping of process memory.

    ``arrays`` are the copies, in order, same shapes. ``register_cuda()`` pins them for direct GPU copies;
    ``close()`` (or garbage collection) unregisters them; the arrays stay valid either way.
    """

    def __init__(self, raws: Sequence[np.ndarray]) -> None:
        offsets, total = [], 0
        for raw in raws:
            offsets.append(total)
            total += -(-raw.nbytes // _ALIGN) * _ALIGN
        # Private anonymous memory (not mmap's default shared one, which is shmem: no transparent huge pages)
        self._map = mmap.mmap(-1, max(total, _ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer TLB misses for the CPU kernels, fewer pages to pin
            self._map.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.arrays: tuple[np.ndarray, ...] = tuple(
            whole[offset : offset + raw.nbytes].reshape(raw.shape) for offset, raw in zip(offsets, raws))
        for dst, raw in zip(self.arrays, raws):
            np.copyto(dst, raw)
        self.nbytes = total
        self._ptr = int(whole.ctypes.data)
        self._registration: weakref.finalize | None = None

    @property
    def registered(self) -> bool:
        return self._registration is not None and self._registration.alive

    def register_cuda(self) -> bool:
        """Pin the copies with ``cudaHostRegister``; True when they are (or already were) registered.

        On failure (no CUDA, the driver refuses) logs why and returns False: copies to the GPU then go through
        pinned staging buffers, which is slower but correct."""
        if self.registered:
            return True
        import torch

        if not torch.cuda.is_available():
            logger.warning("expert memory not registered with CUDA (no CUDA device): staged copies instead")
            return False
        err = int(torch.cuda.cudart().cudaHostRegister(self._ptr, self.nbytes, 0))
        if err != 0:
            logger.warning("cudaHostRegister of %.1f GB of expert memory failed (cudaError %d): staged copies "
                           "instead", self.nbytes / 1e9, err)
            return False
        self._registration = weakref.finalize(self, _unregister, self._ptr, self._map)
        self._registration.atexit = False  # at exit the driver may be gone already; the process frees it all
        logger.debug("registered %.1f GB of expert memory with CUDA", self.nbytes / 1e9)
        return True

    def close(self) -> None:
        """Unregister from CUDA (if registered). The arrays stay usable by the CPU."""
        if self._registration is not None:
            self._registration()
            self._registration = None

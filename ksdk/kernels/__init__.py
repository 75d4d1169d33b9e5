"""Triton kernels for the GPU path, each family in its own module beside its torch reference.

``dequant_matmul`` (x @ W.T on GGUF blocks) and ``mla_decode`` (paged MLA decode attention) import Triton;
import them only where a GPU path is taken, so the CPU path does not need Triton.
"""

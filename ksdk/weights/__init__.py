"""Reading GGUF model files: metadata, memmapped tensor views, and dequantization.

``GGUFFile.open(path)`` reads a file, a split set or a folder; ``quants.dequantize`` decodes block
bytes in torch; ``quantize.quantize`` encodes float arrays (for test models and benchmarks);
``names`` holds the deepseek2 tensor names.
"""

from ksdk.weights.gguf_file import GGUFFile, TensorView, require_architecture
from ksdk.weights.quantize import QUANTIZABLE_QTYPES, quantize
from ksdk.weights.quants import SUPPORTED_QTYPES, block_size, bytes_per_row, dequantize, type_size

__all__ = [
    "GGUFFile",
    "QUANTIZABLE_QTYPES",
    "SUPPORTED_QTYPES",
    "TensorView",
    "block_size",
    "bytes_per_row",
    "dequantize",
    "quantize",
    "require_architecture",
    "type_size",
]

"""qext: quantization for PyTorch, with C++ operators (``torch.ops.qext``)."""

import torch  # noqa: F401  (loads libtorch before libqext)

from . import _C
from .functional import dequantize, fake_quantize, fake_quantize_learnable, quantize

__version__ = _C.version()

__all__ = [
    "dequantize",
    "fake_quantize",
    "fake_quantize_learnable",
    "quantize",
    "with_cuda",
]


def with_cuda() -> bool:
    """Whether this build of qext has its CUDA kernels."""
    return _C.with_cuda()

"""qext: quantization for PyTorch, with C++ operators (``torch.ops.qext``)."""

import torch  # noqa: F401  (loads libtorch before libqext)

from . import _C
from .qconfig import KMeansSpec, QConfig, QuantSpec, get_qconfig
from .observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, make_observer
from .fake_quant import FakeQuantize, disable_fake_quant, disable_observer, set_module_names
from . import nn
from .quantization import (
    LayerSize,
    ModelSize,
    QuantizationWarning,
    StateDictMismatchError,
    calibrate,
    check_state_dict,
    convert,
    enable_fake_quant,
    enable_observer,
    freeze_bn_stats,
    fuse,
    load_state_dict,
    model_size,
    prepare,
    prepare_qat,
    quantize_dynamic,
)

from .functional import (
    dequantize,
    dequantize_per_tensor,
    fake_quantize,
    fake_quantize_learnable,
    quantize,
    quantize_per_tensor,
)
from .clustering import kmeans, kmeans_assign, kmeans_dequantize, pack_labels, unpack_labels
from .export import ModelFileError, TraceMismatchError, load_torchscript, save_torchscript

__version__ = _C.version()

__all__ = [
    "FakeQuantize",
    "LayerSize",
    "ModelSize",
    "QuantizationWarning",
    "StateDictMismatchError",
    "calibrate",
    "check_state_dict",
    "convert",
    "freeze_bn_stats",
    "fuse",
    "load_state_dict",
    "model_size",
    "nn",
    "prepare",
    "prepare_qat",
    "quantize_dynamic",
    "HistogramObserver",
    "KMeansSpec",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "QConfig",
    "QuantSpec",
    "dequantize",
    "dequantize_per_tensor",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "fake_quantize",
    "fake_quantize_learnable",
    "get_qconfig",
    "kmeans",
    "kmeans_assign",
    "kmeans_dequantize",
    "make_observer",
    "pack_labels",
    "quantize",
    "quantize_per_tensor",
    "set_module_names",
    "unpack_labels",
    "with_cuda",
    "ModelFileError", "TraceMismatchError", "load_torchscript", "save_torchscript",
]


def with_cuda() -> bool:
    """Whether this build of qext has its CUDA kernels."""
    return _C.with_cuda()

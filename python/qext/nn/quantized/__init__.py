"""Converted integer modules (made by :func:`qext.convert` and :func:`qext.quantize_dynamic`)."""

from .kmeans import KMEANS_QUANTIZED_MODULES, KMeansConv2d, KMeansLinear
from .modules import (
    QUANTIZED_MODULES as _INTEGER_MODULES,
    AdaptiveAvgPool2d,
    AvgPool2d,
    Conv2d,
    DeQuantize,
    DynamicLinear,
    Flatten,
    Linear,
    MaxPool2d,
    QAdd,
    Quantize,
)

QUANTIZED_MODULES = _INTEGER_MODULES + KMEANS_QUANTIZED_MODULES

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "Conv2d",
    "DeQuantize",
    "DynamicLinear",
    "Flatten",
    "KMEANS_QUANTIZED_MODULES",
    "KMeansConv2d",
    "KMeansLinear",
    "Linear",
    "MaxPool2d",
    "QAdd",
    "Quantize",
    "QUANTIZED_MODULES",
]

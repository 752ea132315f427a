"""Converted integer modules (made by :func:`qext.convert` and :func:`qext.quantize_dynamic`)."""

from .modules import (
    QUANTIZED_MODULES,
    AdaptiveAvgPool2d,
    AvgPool2d,
    Conv2d,
    DeQuantize,
    DynamicLinear,
    Linear,
    QAdd,
    Quantize,
)

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "Conv2d",
    "DeQuantize",
    "DynamicLinear",
    "Linear",
    "QAdd",
    "Quantize",
    "QUANTIZED_MODULES",
]

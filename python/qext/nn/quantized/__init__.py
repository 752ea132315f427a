"""Converted reference integer modules (made by :func:`qext.convert` and :func:`qext.quantize_dynamic`)."""

from .modules import Conv2d, DeQuantize, DynamicLinear, Linear, QAdd, Quantize, QUANTIZED_MODULES

__all__ = ["Conv2d", "DeQuantize", "DynamicLinear", "Linear", "QAdd", "Quantize", "QUANTIZED_MODULES"]

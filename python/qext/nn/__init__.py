"""qext.nn: quantization-aware training modules, the float fused containers made by :func:`qext.fuse`,
and (``qext.nn.quantized``) the converted integer modules."""

from . import quantized
from .kmeans import KMeansConv2d, KMeansLinear
from .fused import FusedConvBn2d, FusedConvBnReLU2d, FusedConvReLU2d, FusedLinearReLU
from .qat import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    ConvBn2d,
    ConvBnReLU2d,
    ConvReLU2d,
    DeQuantStub,
    LinearReLU,
    QAdd,
    QConv2d,
    QLinear,
    QuantStub,
)

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "ConvBn2d",
    "ConvBnReLU2d",
    "ConvReLU2d",
    "DeQuantStub",
    "FusedConvBn2d",
    "FusedConvBnReLU2d",
    "FusedConvReLU2d",
    "FusedLinearReLU",
    "KMeansConv2d",
    "KMeansLinear",
    "LinearReLU",
    "QAdd",
    "QConv2d",
    "QLinear",
    "QuantStub",
    "quantized",
]

"""Converted k-means layers: labels packed at 1, 2, 4 or 8 bits per weight plus the float32 codebook.

``KMeansLinear`` runs ``torch.ops.qext.kmeans_linear``, which decodes the packed labels through the codebook
on the fly (the dense weight is never built) with a fixed accumulation order, bit-identical to its
scalar reference on the dense reconstruction and equal to ``F.linear`` on it up to float rounding.
``KMeansConv2d`` decodes the weight (``torch.ops.qext.kmeans_decode``) and runs the float convolution, so it
is bit-identical to the dense reconstruction followed by ``F.conv2d``.

Inputs may be float or quantized tensors (dequantized first); the output is float, or a quantized tensor
when the QAT layer fake-quantized its output. The state dict holds ``packed_labels`` (uint8),
``centroids`` (float32 ``[k]``, or ``[out_channels, k]`` per channel) and ``bias``; it round-trips bit
for bit through ``torch.save`` / ``torch.load`` and TorchScript.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _utils
from ...clustering import pack_labels
from .modules import ConvGeometry, _QuantizedBase


class _KMeansWeighted(_QuantizedBase):
    def _init_codebook(self, centroids: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                       storage_bits: int, relu: bool) -> None:
        self.weight_shape = [int(d) for d in labels.shape]
        self.bits, self.storage_bits, self.relu = int(bits), int(storage_bits), bool(relu)
        self.per_channel = centroids.dim() == 2
        self.register_buffer("packed_labels", pack_labels(labels.detach().contiguous(), self.storage_bits))
        self.register_buffer("centroids", centroids.detach().to(torch.float32).contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @property
    def weight_bits(self) -> int:
        return self.bits

    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight the packed labels and codebook stand for."""
        return torch.ops.qext.kmeans_decode(self.packed_labels, self.centroids, self.storage_bits, self.weight_shape)

    def _layout(self) -> dict:
        return {**super()._layout(), "weight_shape": self.weight_shape, "bits": self.bits,
                "storage_bits": self.storage_bits, "per_channel": self.per_channel, "relu": self.relu}

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return self._finish(F.relu(y) if self.relu else y)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, storage_bits={self.storage_bits}, per_channel={self.per_channel}, relu={self.relu}"


class KMeansLinear(_KMeansWeighted):
    """Converted :class:`qext.nn.KMeansLinear` (look-up-table decoding of the packed labels)."""

    def __init__(self, centroids, labels, bias, bits: int, storage_bits: int, relu: bool = False,
                 scale=None, zero_point=None, quant_min=None, quant_max=None):
        super().__init__()
        self.out_features, self.in_features = int(labels.shape[0]), int(labels.shape[1])
        self._init_codebook(centroids, labels, bias, bits, storage_bits, relu)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _utils.dequantize_any(x)
        return self._output(torch.ops.qext.kmeans_linear(x, self.packed_labels, self.centroids, self.storage_bits,
                                                         self.weight_shape, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class KMeansConv2d(ConvGeometry, _KMeansWeighted):
    """Converted :class:`qext.nn.KMeansConv2d` (weight decoded from the packed labels, then ``F.conv2d``)."""

    def __init__(self, centroids, labels, bias, bits: int, storage_bits: int, relu: bool = False,
                 scale=None, zero_point=None, quant_min=None, quant_max=None, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self._init_geometry(labels.shape, stride, padding, dilation, groups, padding_mode)
        self._init_codebook(centroids, labels, bias, bits, storage_bits, relu)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _utils.dequantize_any(x)
        return self._output(self._conv(x, self.dequantized_weight(), self.bias))

    def extra_repr(self) -> str:
        return self._geometry_repr() + ", " + super().extra_repr()


KMEANS_QUANTIZED_MODULES = (KMeansLinear, KMeansConv2d)

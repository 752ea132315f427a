"""Functional API over the ``torch.ops.qext`` operators.

Quantization parameters may be given as Python numbers (per-tensor) or tensors (one element:
per-tensor; ``C`` elements: per-channel along ``axis``). Numbers become tensors on the input's
device; tensors are passed as they are, so a scale on another device is an error, not a copy.
"""

from typing import Optional, Union

import torch

Scale = Union[float, torch.Tensor]
ZeroPoint = Union[int, float, torch.Tensor]


def _scale_tensor(scale: Scale, like: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    return torch.tensor(float(scale), dtype=torch.float32, device=like.device)


def _zero_point_tensor(zero_point: ZeroPoint, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(zero_point, torch.Tensor):
        return zero_point
    if isinstance(zero_point, bool) or not isinstance(zero_point, (int, float)):
        raise TypeError(f"zero_point must be a number or a tensor, got {type(zero_point).__name__}")
    if dtype == torch.int32 and float(zero_point) != int(zero_point):
        raise ValueError(f"zero_point must be an integer, got {zero_point}")
    return torch.tensor(zero_point, dtype=dtype, device=like.device)


def fake_quantize(
    x: torch.Tensor,
    scale: Scale,
    zero_point: ZeroPoint,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Affine fake quantization with the clipped straight-through gradient.

    ``(clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale``, rounding
    half to even, bit-identical to ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` for finite inputs. NaN inputs stay NaN and +-inf
    saturate to the ends of the range. The gradient of ``x`` is passed where ``x`` quantized inside
    the range and zero elsewhere; only a bit mask is kept for it.
    """
    return torch.ops.qext.fake_quantize(
        x,
        _scale_tensor(scale, x),
        _zero_point_tensor(zero_point, x, torch.int32),
        quant_min,
        quant_max,
        axis,
    )


def fake_quantize_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: ZeroPoint,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Fake quantization with a learnable step size (LSQ) and zero point (LSQ+).

    ``scale`` (and ``zero_point`` when it is a float tensor with ``requires_grad``) receive
    gradients matching ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``, scaled by
    ``grad_factor`` (LSQ suggests ``1 / sqrt(numel * quant_max)``). The zero point is rounded half
    to even and clamped to ``[quant_min, quant_max]`` in the forward pass.
    """
    return torch.ops.qext.fake_quantize_learnable(
        x,
        _scale_tensor(scale, x),
        _zero_point_tensor(zero_point, x, torch.float32),
        quant_min,
        quant_max,
        float(grad_factor),
        axis,
    )


def quantize(
    x: torch.Tensor,
    scale: Scale,
    zero_point: ZeroPoint,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Float to integer: ``clamp(round(x / scale) + zero_point, quant_min, quant_max)`` stored as
    ``dtype`` (int8, uint8 or int32; by default the smallest that holds the range)."""
    return torch.ops.qext.quantize(
        x,
        _scale_tensor(scale, x),
        _zero_point_tensor(zero_point, x, torch.int32),
        quant_min,
        quant_max,
        axis,
        dtype,
    )


def dequantize(
    q: torch.Tensor,
    scale: Scale,
    zero_point: ZeroPoint,
    axis: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Integer to float: ``(q - zero_point) * scale`` as ``dtype`` (float32 by default)."""
    return torch.ops.qext.dequantize(
        q, _scale_tensor(scale, q), _zero_point_tensor(zero_point, q, torch.int32), axis, dtype
    )


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """``quantize`` with one scale and zero point, returned as a PyTorch quantized tensor (quint8, qint8 or
    qint32: the first that holds the range) with scale ``float32(scale)``, the tensors torch's quantized
    modules and qext's converted ones take. Channels-last inputs stay channels-last. CPU."""
    return torch.ops.qext.quantize_per_tensor(x, float(scale), int(zero_point), quant_min, quant_max)


def dequantize_per_tensor(q: torch.Tensor) -> torch.Tensor:
    """float32 values of a per-tensor quantized tensor, ``dequantize`` of its levels with its scale (as float32)
    and zero point. CPU."""
    return torch.ops.qext.dequantize_per_tensor(q)

"""Converted (integer) modules: the reference integer path.

Weights are stored as integers (``weight``: int8 for ranges of at most 8 bits, int32 beyond) with float32
scales and int32 zero points, per output channel or per tensor. Between modules, activations travel as
PyTorch per-tensor affine quantized tensors (``torch.quint8`` / ``torch.qint8`` / ``torch.qint32``), so the
float model's parameter-free modules (``MaxPool2d``, ``Flatten``, ``ReLU``, ``Dropout`` in eval, ...) keep
working on them unchanged.

``Linear`` / ``Conv2d`` with a quantized input compute as the integer kernels will (Jacob et al. 2018):

    acc   = sum((q_x - z_x) * (q_w - z_w)) + bias_q,   bias_q = round(bias / (s_x * s_w))   (int32)
    q_out = clamp(round(acc * (s_x * s_w / s_out)) + z_out, qmin, qmax)    (ReLU: clamp at z_out first)

The integer products and sums are carried out exactly in float64 ("integer-valued float compute"); the
requantization multiplier ``s_x * s_w / s_out`` is applied in float64 (the integer kernels will use a
fixed-point multiplier and shift). ``bias_q`` depends on the input scale, which an eager model only knows at
run time: the float32 ``bias`` is stored and ``bias_q`` is computed for the input scale seen and cached
(``bias_int32(input_scale)``).

A float input (no ``Quantize`` in front, as in the QAT model) runs the layer in float32 with the
dequantized weights, exactly as the fake-quant model did, and the output is quantized as usual.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...functional import dequantize, fake_quantize, quantize
from .. import _utils

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _quantize_output(y: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int) -> torch.Tensor:
    q = quantize(y.float(), scale, zero_point, quant_min, quant_max)
    return _utils.make_qtensor(q, scale, zero_point, quant_min, quant_max)


class _QuantizedBase(nn.Module):
    """Output quantization parameters, the module's name (for messages) and the extra-state check."""

    def _init_output(self, scale: Optional[torch.Tensor], zero_point: Optional[torch.Tensor], quant_min, quant_max):
        if scale is None:
            self.register_buffer("scale", None)
            self.register_buffer("zero_point", None)
            self.out_quant_min = self.out_quant_max = None
        else:
            self.register_buffer("scale", scale.detach().to(torch.float32).reshape(1).clone())
            self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(1).clone())
            self.out_quant_min, self.out_quant_max = int(quant_min), int(quant_max)
        self.qext_name = ""

    @property
    def output_quantized(self) -> bool:
        return self.scale is not None

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return y
        return _quantize_output(y, self.scale, self.zero_point, self.out_quant_min, self.out_quant_max)

    def _layout(self) -> dict:
        return {"output": None if self.scale is None else [self.out_quant_min, self.out_quant_max]}

    def qext_description(self) -> dict:
        return {"version": _utils.EXTRA_STATE_VERSION, "module": type(self).__name__, "layout": self._layout()}

    def get_extra_state(self):
        return self.qext_description()

    def set_extra_state(self, state) -> None:
        expected = self.qext_description()
        if state != expected:
            raise RuntimeError(
                f"qext: state dict entry for this {type(self).__name__} was saved from a model with another "
                f"quantization layout ({_utils.describe_difference(state, expected)})"
            )

    def _who(self) -> str:
        return f"{type(self).__module__.rsplit('.', 1)[0]}.{type(self).__name__}" + (
            f" '{self.qext_name}'" if self.qext_name else ""
        )


class Quantize(_QuantizedBase):
    """Float to a per-tensor quantized tensor (from a ``QuantStub``). A quantized input is requantized."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int):
        super().__init__()
        self._init_output(scale, zero_point, quant_min, quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(_utils.dequantize_any(x))

    def extra_repr(self) -> str:
        return f"scale={float(self.scale[0]):.6g}, zero_point={int(self.zero_point[0])}, range=[{self.out_quant_min}, {self.out_quant_max}]"


class DeQuantize(nn.Module):
    """Quantized tensor to float32 (from a ``DeQuantStub``); float inputs pass through."""

    def forward(self, x):
        return _utils.dequantize_any(x)


class QAdd(_QuantizedBase):
    """Quantized residual add: ``quantize(dequantize(x) + dequantize(y))`` with the add's own output scale
    (float output when the QAT add had no output quantizer)."""

    def __init__(self, scale=None, zero_point=None, quant_min=None, quant_max=None):
        super().__init__()
        self._init_output(scale, zero_point, quant_min, quant_max)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._finish(_utils.dequantize_any(x) + _utils.dequantize_any(y))


# --------------------------------------------------------------------------------------------------
# Linear / Conv2d
# --------------------------------------------------------------------------------------------------


class _WeightedBase(_QuantizedBase):
    """Integer weights (or float weights when the QAT module had no weight quantizer) and a float bias."""

    def _init_weight(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_scale: Optional[torch.Tensor],
        w_zero_point: Optional[torch.Tensor],
        w_quant_min: Optional[int],
        w_quant_max: Optional[int],
        w_axis: Optional[int],
        relu: bool,
    ) -> None:
        weight = weight.detach()
        if w_scale is None:
            self.register_buffer("weight", weight.to(torch.float32).clone())
            self.register_buffer("weight_scale", None)
            self.register_buffer("weight_zero_point", None)
            self.weight_quant_min = self.weight_quant_max = self.weight_axis = None
        else:
            w_scale = w_scale.detach().to(torch.float32).reshape(-1).clone()
            w_zero_point = w_zero_point.detach().to(torch.int32).reshape(-1).clone()
            axis = w_axis if w_scale.numel() > 1 else None
            if axis is not None and axis != 0:
                raise ValueError(f"weights must be quantized per output channel (axis 0) or per tensor, got axis {w_axis}")
            dtype = torch.int8 if (w_quant_min >= -128 and w_quant_max <= 127) else torch.int32
            q = quantize(weight.float(), w_scale, w_zero_point, w_quant_min, w_quant_max, axis=axis, dtype=dtype)
            self.register_buffer("weight", q)
            self.register_buffer("weight_scale", w_scale)
            self.register_buffer("weight_zero_point", w_zero_point)
            self.weight_quant_min, self.weight_quant_max, self.weight_axis = int(w_quant_min), int(w_quant_max), axis
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.relu = bool(relu)
        self._bias_cache: Optional[tuple[float, torch.Tensor]] = None

    @property
    def weight_quantized(self) -> bool:
        return self.weight_scale is not None

    @property
    def weight_bits(self) -> int:
        if not self.weight_quantized:
            return 32
        return _utils.range_bits(self.weight_quant_min, self.weight_quant_max)

    def _layout(self) -> dict:
        d = super()._layout()
        d["weight"] = (
            None
            if not self.weight_quantized
            else [self.weight_quant_min, self.weight_quant_max, self.weight_axis]
        )
        d["relu"] = self.relu
        return d

    def _channel_view(self, t: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.weight.dim()
        shape[0] = -1
        return t.reshape(shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weights the module computes with (``(q_w - z_w) * s_w``)."""
        if not self.weight_quantized:
            return self.weight
        return dequantize(self.weight, self.weight_scale, self.weight_zero_point, axis=self.weight_axis)

    def _weight_scale_per_channel(self) -> torch.Tensor:
        n = self.weight.shape[0]
        return self.weight_scale.expand(n) if self.weight_scale.numel() == 1 else self.weight_scale

    def bias_int32(self, input_scale: float) -> Optional[torch.Tensor]:
        """``round(bias / (input_scale * weight_scale))`` per output channel, clamped to int32 (cached for
        the last input scale)."""
        if self.bias is None:
            return None
        if self._bias_cache is not None and self._bias_cache[0] == input_scale and self._bias_cache[1].device == self.bias.device:
            return self._bias_cache[1]
        acc_scale = float(input_scale) * self._weight_scale_per_channel().double()
        bq = torch.round(self.bias.double() / acc_scale).clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)
        self._bias_cache = (input_scale, bq)
        return bq

    def _integer_matmul(self, xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _float_matmul(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _acc_view(self, t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_quantized and self.weight_quantized:
            q_x, s_x, z_x = _utils.qtensor_levels(x)
            xc = q_x.to(torch.float64) - z_x
            wc = self.weight.to(torch.float64) - self._channel_view(self.weight_zero_point.to(torch.float64))
            acc = self._integer_matmul(xc, wc)  # exact integers in float64
            bq = self.bias_int32(s_x)
            if bq is not None:
                acc = acc + self._acc_view(bq.to(torch.float64), acc)
            acc_scale = s_x * self._weight_scale_per_channel().double()
            if self.scale is None:
                y = acc * self._acc_view(acc_scale, acc)
                if self.relu:
                    y = F.relu(y)
                return y.to(torch.float32)
            mult = self._acc_view(acc_scale / float(self.scale[0]), acc)
            level = torch.round(acc * mult) + int(self.zero_point[0])
            if self.relu:
                level = torch.clamp(level, min=int(self.zero_point[0]))
            level = torch.clamp(level, self.out_quant_min, self.out_quant_max)
            return _utils.make_qtensor(level, self.scale, self.zero_point, self.out_quant_min, self.out_quant_max)
        xf = _utils.dequantize_any(x)
        y = self._float_matmul(xf, self.dequantized_weight().to(xf.dtype), None if self.bias is None else self.bias.to(xf.dtype))
        if self.relu:
            y = F.relu(y)
        return self._finish(y)

    def extra_repr(self) -> str:
        w = "float" if not self.weight_quantized else (
            f"int{self.weight_bits} [{self.weight_quant_min}, {self.weight_quant_max}] "
            + ("per-tensor" if self.weight_axis is None else f"per-channel axis={self.weight_axis}")
        )
        out = "float" if self.scale is None else f"scale={float(self.scale[0]):.6g}, zero_point={int(self.zero_point[0])}"
        return f"weight={w}, output={out}, relu={self.relu}"


class Linear(_WeightedBase):
    """Converted ``Linear`` / ``LinearReLU`` (``relu=True``)."""

    def __init__(self, weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis,
                 scale=None, zero_point=None, quant_min=None, quant_max=None, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self._init_weight(weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis, relu)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def _integer_matmul(self, xc, wc):
        return F.linear(xc, wc)

    def _float_matmul(self, x, w, b):
        return F.linear(x, w, b)

    def _acc_view(self, t, acc):
        return t  # the channel is the last dimension

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class Conv2d(_WeightedBase):
    """Converted ``Conv2d`` / ``ConvReLU2d`` / ``ConvBn2d`` / ``ConvBnReLU2d`` (BN folded in)."""

    def __init__(self, weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis,
                 scale=None, zero_point=None, quant_min=None, quant_max=None, relu: bool = False,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self.in_channels = int(weight.shape[1]) * int(groups)
        self.out_channels = int(weight.shape[0])
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), int(groups)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError(f"padding={self.padding!r} with padding_mode={padding_mode!r} is not supported")
            self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]
        self._init_weight(weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis, relu)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def _conv(self, x, w, b):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _integer_matmul(self, xc, wc):
        # Zero padding of (q_x - z_x) is padding q_x with its zero point; replicate / reflect / circular
        # padding pads the levels themselves; either way the padded values are exact.
        return self._conv(xc, wc, None)

    def _float_matmul(self, x, w, b):
        return self._conv(x, w, b)

    def _acc_view(self, t, acc):
        return t.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + super().extra_repr()
        )


# --------------------------------------------------------------------------------------------------
# Dynamic quantization
# --------------------------------------------------------------------------------------------------


def _choose_qparams(lo: torch.Tensor, hi: torch.Tensor, quant_min: int, quant_max: int):
    """Affine (scale, zero point) for [lo, hi] with torch.ao's formulas (``torch.ops.qext.choose_qparams``)."""
    return torch.ops.qext.choose_qparams(lo, hi, quant_min, quant_max, False)


class DynamicLinear(nn.Module):
    """``Linear`` with integer weights and activations quantized per call (per batch) at run time:
    the input's min / max give an affine uint8 (``[0, 255]``, or ``[0, 127]`` with ``reduce_range``) scale
    and zero point; the product is computed exactly on the integer levels (float64) and scaled back to
    float32, the float bias added. Output float32."""

    def __init__(self, weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis, reduce_range: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.inner = Linear(weight, None, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.act_quant_min, self.act_quant_max = 0, (127 if reduce_range else 255)
        self.qext_name = ""

    @property
    def weight(self):
        return self.inner.weight

    @property
    def weight_bits(self) -> int:
        return self.inner.weight_bits

    def input_qparams(self, x: torch.Tensor):
        """The scale and zero point this call quantizes ``x`` with: from the min / max of its finite
        values (the range always contains 0; an input without finite values gets the range [0, 0])."""
        lo, hi = torch.ops.qext.aminmax(x.detach(), None)
        if not bool(lo[0] <= hi[0]):
            lo, hi = torch.zeros_like(lo), torch.zeros_like(hi)
        return _choose_qparams(lo, hi, self.act_quant_min, self.act_quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _utils.dequantize_any(x)
        scale, zp = self.input_qparams(x)
        q = quantize(x.float(), scale, zp, self.act_quant_min, self.act_quant_max)
        xq = _utils.make_qtensor(q, scale, zp, self.act_quant_min, self.act_quant_max)
        y = self.inner(xq)  # float32: the inner Linear has no output quantization and no bias
        if self.bias is not None:
            y = y + self.bias
        return y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation in fake-quant form: ``linear(fake_quant(x), dequantized weight) + bias``."""
        scale, zp = self.input_qparams(x)
        xf = fake_quantize(x.float(), scale, zp, self.act_quant_min, self.act_quant_max)
        return F.linear(xf, self.inner.dequantized_weight(), self.bias)

    def qext_description(self) -> dict:
        return {"version": _utils.EXTRA_STATE_VERSION, "module": type(self).__name__,
                "layout": {"activation": [self.act_quant_min, self.act_quant_max]}}

    def get_extra_state(self):
        return self.qext_description()

    def set_extra_state(self, state) -> None:
        expected = self.qext_description()
        if state != expected:
            raise RuntimeError(
                f"qext: state dict entry for this DynamicLinear was saved with another layout "
                f"({_utils.describe_difference(state, expected)})"
            )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation=per-batch affine [{self.act_quant_min}, {self.act_quant_max}]")


QUANTIZED_MODULES = (Quantize, DeQuantize, QAdd, Linear, Conv2d, DynamicLinear)

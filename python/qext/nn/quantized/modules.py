"""Converted (integer) modules.

Weights are stored as integers (``weight``: int8 for ranges of at most 8 bits, int32 beyond) with float32
scales and int32 zero points, per output channel or per tensor. Between modules, activations travel as
PyTorch per-tensor affine quantized tensors (``torch.quint8`` / ``torch.qint8`` / ``torch.qint32``), so the
float model's parameter-free modules (``Flatten``, ``ReLU``, ``Dropout`` in eval, ...) keep working on them
unchanged; ``MaxPool2d`` becomes the integer :class:`MaxPool2d`, ``Flatten`` the :class:`Flatten` that reorders
channels-last activations with a block transpose.

``Linear`` / ``Conv2d`` compute as Jacob et al. (2018):

    acc   = sum((q_x - z_x) * q_w) + bias_q,   bias_q = round(b),  b = bias / (s_x * s_w)   (int32)
    q_out = clamp(requantize(acc + (b - bias_q), s_x * s_w / s_out) + z_out, qmin, qmax)  (ReLU: clamp at z_out)

Integer kernels (``torch.ops.qext.quantized_linear`` / ``quantized_conv2d``: AVX2 / AVX-512 VNNI / AMX on
CPU, tensor cores on CUDA) run every layer whose weights are 8-bit symmetric (zero point 0) and whose output
is 8-bit or float, on 8-bit quantized inputs; the weights are packed once, at convert time (and again
after a state dict is loaded: the packed copy is not part of the state dict). Requantization is by a
fixed-point multiplier and shift (``qext::kernels::requantize``) with one rounding; the fraction of the bias
below one accumulator unit (``b - bias_q``) rides in the multiplier's rounding offset, so an 8-bit output
sees the exact bias (rounding the bias to int32, as gemmlowp does, flipped 10 of 10k Fashion-MNIST top-1
classes against the fake-quant model; with it, none). Float outputs carry the int32 bias. ``b`` depends on
the input scale, which an eager model knows at run time only, so the kernels derive it (and the
multipliers) per call.

Everything else runs the reference integer path (``reference_forward``): the same integer products and sums,
carried out exactly in float64, requantized in float64 (round half to even). The two agree exactly except
where ``acc * multiplier`` lies within the fixed-point rounding of a .5 tie (one output step apart, rare).

A float input (no ``Quantize`` in front, as in the QAT model) runs the layer in float32 with the
dequantized weights, exactly as the fake-quant model did, and the output is quantized as usual.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...functional import dequantize, fake_quantize, quantize
from .. import _utils


def _is_8bit(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_quantized and x.dtype in (torch.quint8, torch.qint8)


def _pair(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _int_pair(v: Union[int, Tuple[int, int]]) -> List[int]:
    """``_pair`` that TorchScript compiles (a converted MaxPool2d scripts)."""
    if isinstance(v, int):
        return [v, v]
    return [v[0], v[1]]


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
        self._refresh_output_args()

    def _refresh_output_args(self) -> None:
        # Python numbers for the integer ops, read once (and again when a state dict is loaded) rather
        # than from the buffers on every call.
        self._output_args_value = (
            (None, 0, 0, 0)
            if self.scale is None
            else (float(self.scale[0]), int(self.zero_point[0]), self.out_quant_min, self.out_quant_max)
        )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_output_args()

    @property
    def output_quantized(self) -> bool:
        return self.scale is not None

    def _output_is_8bit(self) -> bool:
        return self.scale is not None and _utils.range_bits(self.out_quant_min, self.out_quant_max) <= 8

    def _output_args(self):
        """(scale, zero point, min, max) of the output for the integer ops; scale None: float output."""
        return self._output_args_value

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return y
        # From the cached numbers, on CPU in one op that returns the quantized tensor: on small activations
        # the Python wrappers and tensor reads cost more than the quantization.
        scale, zero_point, quant_min, quant_max = self._output_args_value
        if y.is_cpu:
            return torch.ops.qext.quantize_per_tensor.default(y.float(), scale, zero_point, quant_min, quant_max)
        q = torch.ops.qext.quantize.default(y.float(), self.scale, self.zero_point, quant_min, quant_max, None, None)
        return _utils.make_qtensor(q, scale, zero_point, quant_min, quant_max)

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
        if self.scale is not None and _is_8bit(x) and _is_8bit(y) and self._output_is_8bit():
            return torch.ops.qext.quantized_add(x, y, *self._output_args())
        return self.reference_forward(x, y)

    def reference_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._finish(_utils.dequantize_any(x) + _utils.dequantize_any(y))


# --------------------------------------------------------------------------------------------------
# Average pooling
# --------------------------------------------------------------------------------------------------


class _Pool(_QuantizedBase):
    """Average pool of a quantized input, requantized to the pool's own output parameters (those of the
    QAT pool's output quantizer): ``round(mean(q - z_x) * s_x / s_out) + z_out`` in integers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None and _is_8bit(x) and self._output_is_8bit():
            return self._kernel_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The QAT computation: the float pool of the dequantized input, quantized."""
        return self._finish(self._float_pool(_utils.dequantize_any(x)))


class AvgPool2d(_Pool):
    """Converted ``AvgPool2d`` (from ``qext.nn.AvgPool2d``)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None, scale=None, zero_point=None, quant_min=None, quant_max=None):
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def _float_pool(self, x):
        return self.pool(x)

    def _kernel_forward(self, x):
        p = self.pool
        return torch.ops.qext.quantized_avg_pool2d(
            x, _pair(p.kernel_size), _pair(p.stride), _pair(p.padding), p.ceil_mode, p.count_include_pad,
            p.divisor_override, *self._output_args()
        )

    def extra_repr(self) -> str:
        return self.pool.extra_repr()


class AdaptiveAvgPool2d(_Pool):
    """Converted ``AdaptiveAvgPool2d`` (from ``qext.nn.AdaptiveAvgPool2d``)."""

    def __init__(self, output_size, scale=None, zero_point=None, quant_min=None, quant_max=None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(output_size)
        self._init_output(scale, zero_point, quant_min, quant_max)

    def _float_pool(self, x):
        return self.pool(x)

    def _kernel_forward(self, x):
        size = _pair(self.pool.output_size)
        size = [x.shape[-2 + i] if v is None else v for i, v in enumerate(size)]
        return torch.ops.qext.quantized_adaptive_avg_pool2d(x, size, *self._output_args())

    def extra_repr(self) -> str:
        return self.pool.extra_repr()


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


class MaxPool2d(nn.MaxPool2d):
    """Converted ``MaxPool2d`` (``qext.convert`` swaps torch's in): on an 8-bit quantized CPU input, the integer
    max pool ``torch.ops.qext.quantized_max_pool2d`` (vectorized over the channel vectors of the channels-last
    tensors the converted convolutions write). Max commutes with the affine map, so the output keeps the
    input's dtype, scale, zero point and memory format, exactly as torch's quantized max pool. Any other input
    (float, CUDA, 32-bit) runs ``F.max_pool2d``. Stateless; ``return_indices`` is not supported."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        if return_indices:
            raise ValueError("qext.nn.quantized.MaxPool2d: return_indices=True is not supported (the integer "
                             "kernel returns no indices); keep torch.nn.MaxPool2d for it")
        super().__init__(kernel_size, stride, padding, dilation, False, ceil_mode)

    @classmethod
    def from_float(cls, mod: nn.MaxPool2d) -> "MaxPool2d":
        return cls(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.return_indices, mod.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-channel inputs reach the op too: its error names the qscheme (torch's max_pool2d takes none either).
        if _is_8bit(x) and x.is_cpu:
            return torch.ops.qext.quantized_max_pool2d(
                x, _int_pair(self.kernel_size), _int_pair(self.stride), _int_pair(self.padding),
                _int_pair(self.dilation), self.ceil_mode
            )
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


class Flatten(nn.Flatten):
    """Converted ``Flatten`` (``qext.convert`` swaps torch's in): ``torch.flatten``, by
    ``torch.ops.qext.quantized_flatten`` on 8-bit quantized CPU inputs. Flattening the channels-last tensors the
    converted convolutions write needs them in NCHW order: torch reorders a quantized tensor one byte at a time,
    the op with a block transpose. Same levels, qparams, shape and strides as ``nn.Flatten``; stateless."""

    @classmethod
    def from_float(cls, mod: nn.Flatten) -> "Flatten":
        return cls(mod.start_dim, mod.end_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_8bit(x) and x.is_cpu:
            return torch.ops.qext.quantized_flatten(x, self.start_dim, self.end_dim)
        return torch.flatten(x, self.start_dim, self.end_dim)


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

    def bias_in_accumulator_units(self, input_scale: float) -> Optional[torch.Tensor]:
        """``bias / (input_scale * weight_scale)`` per output channel (float64). The integer kernels add its
        int32 rounding to the accumulator and, for quantized outputs, the rest through the requantization
        (``FixedPointMultiplier.offset``), so that quantized outputs see the exact bias."""
        if self.bias is None:
            return None
        return self.bias.double() / (float(input_scale) * self._weight_scale_per_channel().double())

    def _integer_matmul(self, xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _float_matmul(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _acc_view(self, t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _init_kernel(self) -> None:
        """Packs the weights for the integer kernels when the layer fits them (8-bit symmetric weights,
        8-bit or float output); ``packed_weight`` stays None otherwise."""
        fits = (
            self.weight_quantized
            and self.weight.dtype == torch.int8
            and bool((self.weight_zero_point == 0).all())
            and (self.scale is None or self._output_is_8bit())
        )
        packed = row_sums = None
        if fits:
            packed, row_sums = torch.ops.qext.pack_quantized_weight(self.weight.cpu(), self._groups())
            packed, row_sums = packed.to(self.weight.device), row_sums.to(self.weight.device)
        # Derived from ``weight``: kept out of the state dict, rebuilt after loading one.
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("row_sums", row_sums, persistent=False)

    def _groups(self) -> int:
        return 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_kernel()

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None and x.is_quantized and x.dtype in (torch.quint8, torch.qint8):
            return self._kernel_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference integer path (float64 integer arithmetic) or, for float inputs, the float path."""
        if isinstance(x, torch.Tensor) and x.is_quantized and self.weight_quantized:
            q_x, s_x, z_x = _utils.qtensor_levels(x)
            xc = q_x.to(torch.float64) - z_x
            wc = self.weight.to(torch.float64) - self._channel_view(self.weight_zero_point.to(torch.float64))
            acc = self._integer_matmul(xc, wc)  # exact integers in float64
            b = self.bias_in_accumulator_units(s_x)
            if b is not None:  # float outputs: the int32 bias alone, as the kernels
                acc = acc + self._acc_view(b if self.scale is not None else torch.round(b), acc)
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
        self._init_kernel()

    def _kernel_forward(self, x):
        return torch.ops.qext.quantized_linear(
            x, self.packed_weight, self.row_sums, self.weight.shape, self.weight_scale, self.bias,
            *self._output_args(), self.relu
        )

    def _integer_matmul(self, xc, wc):
        return F.linear(xc, wc)

    def _float_matmul(self, x, w, b):
        return F.linear(x, w, b)

    def _acc_view(self, t, acc):
        return t  # the channel is the last dimension

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class ConvGeometry:
    """Stride, padding (with its mode), dilation and groups of a converted convolution, and the float
    convolution that applies them."""

    def _init_geometry(self, weight_shape, stride, padding, dilation, groups, padding_mode: str) -> None:
        self.in_channels = int(weight_shape[1]) * int(groups)
        self.out_channels = int(weight_shape[0])
        self.kernel_size = tuple(int(k) for k in weight_shape[2:])
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), int(groups)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError(f"padding={self.padding!r} with padding_mode={padding_mode!r} is not supported")
            self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]

    def _conv(self, x, w, b):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _geometry_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        )


class Conv2d(ConvGeometry, _WeightedBase):
    """Converted ``Conv2d`` / ``ConvReLU2d`` / ``ConvBn2d`` / ``ConvBnReLU2d`` (BN folded in)."""

    def __init__(self, weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis,
                 scale=None, zero_point=None, quant_min=None, quant_max=None, relu: bool = False,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self._init_geometry(weight.shape, stride, padding, dilation, groups, padding_mode)
        self._init_weight(weight, bias, w_scale, w_zero_point, w_quant_min, w_quant_max, w_axis, relu)
        self._init_output(scale, zero_point, quant_min, quant_max)
        self._init_kernel()

    def _groups(self) -> int:
        return self.groups

    def _kernel_forward(self, x):
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or (depthwise and self.scale is None):
            return self.reference_forward(x)
        return torch.ops.qext.quantized_conv2d(
            x, self.packed_weight, self.row_sums, self.weight.shape, self.weight_scale, self.bias, self.stride,
            self.padding, self.dilation, self.groups, *self._output_args(), self.relu
        )

    def _integer_matmul(self, xc, wc):
        # Zero padding of (q_x - z_x) is padding q_x with its zero point; replicate / reflect / circular
        # padding pads the levels themselves; either way the padded values are exact.
        return self._conv(xc, wc, None)

    def _float_matmul(self, x, w, b):
        return self._conv(x, w, b)

    def _acc_view(self, t, acc):
        return t.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return self._geometry_repr() + ", " + super().extra_repr()


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


QUANTIZED_MODULES = (Quantize, DeQuantize, QAdd, Linear, Conv2d, DynamicLinear, AvgPool2d, AdaptiveAvgPool2d,
                     MaxPool2d, Flatten)

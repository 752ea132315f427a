"""Quantization-aware training modules.

Every module here owns its fake-quantizers:

* ``weight_fake_quant``: a :class:`qext.fake_quant.FakeQuantize` built from ``qconfig.weight``, applied to
  the weights the module computes with (the BN-folded weights for ``ConvBn2d`` / ``ConvBnReLU2d``);
* ``activation_post_process``: a FakeQuantize built from ``qconfig.activation``, applied to the module's
  output (after the ReLU of the fused ``*ReLU`` variants);

either is ``None`` when its spec is ``None`` (that tensor stays in float). ``from_float(mod, qconfig)``
builds the QAT module from its float counterpart, sharing its parameters (and batch-norm state).

Batch-norm folding (``ConvBn2d``, ``ConvBnReLU2d``) follows Krishnamoorthi (2018), section 3.2, the way
``torch.ao.nn.intrinsic.qat.ConvBn2d`` implements it:

* ``folded_weight_bias()`` returns ``w_fold = w * gamma / sigma`` and
  ``b_fold = beta + (b - mu) * gamma / sigma`` with the *running* statistics (``sigma = sqrt(var + eps)``);
* in training, before the statistics are frozen, the convolution runs with ``fake_quant(w_fold)`` and its
  output is rescaled by ``sigma / sigma_B`` and shifted by ``beta + (b - mu_B) * gamma / sigma_B``, so the
  layer is normalised with the *batch* statistics ``mu_B, sigma_B`` (the batch-statistics correction); the
  running statistics are updated from the batch as ``nn.BatchNorm2d`` does;
* in eval mode, and in training once the statistics are frozen (``freeze_bn_stats()``, or after
  ``freeze_bn_step`` training steps), the layer computes ``conv(x, fake_quant(w_fold)) + b_fold`` and leaves
  the statistics alone: exactly the weights and bias that :func:`qext.convert` quantizes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _utils
from .fused import FusedConvBn2d, FusedConvBnReLU2d, FusedConvReLU2d, FusedLinearReLU


class _QATMixin:
    """Fake-quantizer ownership, qconfig bookkeeping and the qconfig check of state dicts."""

    qconfig = None
    weight_fake_quant: Optional[nn.Module]
    activation_post_process: Optional[nn.Module]

    def _init_fake_quant(self, qconfig, weight: bool = True) -> None:
        self.qconfig = qconfig
        wspec = getattr(qconfig, "weight", None) if (qconfig is not None and weight) else None
        aspec = getattr(qconfig, "activation", None) if qconfig is not None else None
        self.weight_fake_quant = _utils.make_fake_quant(wspec)
        self.activation_post_process = _utils.make_fake_quant(aspec)

    def _adopt(self, float_mod: nn.Module, qconfig):
        """Takes over float_mod's weight and bias (shared, not copied), builds the quantizers on
        their device and copies the training flag; returns self."""
        self.weight = float_mod.weight
        self.bias = float_mod.bias
        self._init_fake_quant(qconfig)
        for fq in (self.weight_fake_quant, self.activation_post_process):
            if fq is not None:
                fq.to(float_mod.weight.device)
        self.train(float_mod.training)
        return self

    def weight_bias(self):
        """The float weight and bias that convert() quantizes."""
        return self.weight, self.bias

    def _fq_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_fake_quant is None else self.weight_fake_quant(w)

    def _fq_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.activation_post_process is None else self.activation_post_process(y)

    # The qconfig travels with the state dict (``<name>._extra_state``), so that a state dict saved with
    # another qconfig is refused (qext.quantization checks the whole dict before anything is loaded).
    def qext_description(self) -> dict:
        return {
            "version": _utils.EXTRA_STATE_VERSION,
            "module": type(self).__name__,
            "qconfig": _utils.qconfig_description(self.qconfig),
        }

    def get_extra_state(self):
        return self.qext_description()

    def set_extra_state(self, state) -> None:
        expected = self.qext_description()
        if not _utils.extra_state_compatible(state, expected):
            raise RuntimeError(
                f"qext: state dict entry for this {type(self).__name__} was saved with another quantization "
                f"config ({_utils.describe_difference(state, expected)})"
            )


def _check_type(mod: nn.Module, types, who: str) -> None:
    if type(mod) not in types:
        names = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{who}.from_float expects {names}, got {type(mod).__name__}")


def _unwrap_fused(mod: nn.Module, fused_type, ao_name: str) -> list:
    """The submodules of a qext fused container or of torch.ao's intrinsic counterpart."""
    if type(mod) is fused_type:
        return list(mod)
    try:
        import torch.ao.nn.intrinsic as nni

        ao_type = getattr(nni, ao_name)
    except (ImportError, AttributeError):  # pragma: no cover - torch without torch.ao
        ao_type = None
    if ao_type is not None and type(mod) is ao_type:
        return list(mod)
    raise TypeError(f"from_float expects {fused_type.__name__}, got {type(mod).__name__}")


# --------------------------------------------------------------------------------------------------
# Linear / Conv2d
# --------------------------------------------------------------------------------------------------


class QLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weights and output."""

    _FLOAT_TYPES = (nn.Linear,)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_fake_quant(qconfig)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._fq_weight(self.weight), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(self._linear(x))

    @classmethod
    def _from_linear(cls, lin: nn.Linear, qconfig):
        mod = cls(lin.in_features, lin.out_features, lin.bias is not None, qconfig=None, device="meta")
        return mod._adopt(lin, qconfig)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        _check_type(mod, cls._FLOAT_TYPES, cls.__name__)
        return cls._from_linear(mod, qconfig)


class LinearReLU(QLinear):
    """Fused ``Linear`` + ``ReLU``: ``fake_quant(relu(linear(x, fake_quant(w))))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(F.relu(self._linear(x)))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        lin, _relu = _unwrap_fused(mod, FusedLinearReLU, "LinearReLU")
        return cls._from_linear(lin, qconfig)


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


class QConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) with fake-quantized weights and output."""

    _FLOAT_TYPES = (nn.Conv2d,)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        qconfig=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._init_fake_quant(qconfig)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._fq_weight(self.weight), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(self._conv(x))

    @classmethod
    def _from_conv(cls, conv: nn.Conv2d, qconfig):
        mod = cls(**_conv_args(conv), qconfig=None, device="meta")
        return mod._adopt(conv, qconfig)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        _check_type(mod, cls._FLOAT_TYPES, cls.__name__)
        return cls._from_conv(mod, qconfig)


class ConvReLU2d(QConv2d):
    """Fused ``Conv2d`` + ``ReLU``: ``fake_quant(relu(conv(x, fake_quant(w))))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(F.relu(self._conv(x)))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        conv, _relu = _unwrap_fused(mod, FusedConvReLU2d, "ConvReLU2d")
        return cls._from_conv(conv, qconfig)


# --------------------------------------------------------------------------------------------------
# Conv2d + BatchNorm2d with folding
# --------------------------------------------------------------------------------------------------


class _UnfoldBatchNorm(torch.autograd.Function):
    """``batch_norm(y / factor + bias)`` with batch statistics, updating the running ones: ConvBn2d's
    batch-statistics phase. Dividing the conv output ``y`` (folded weights) by the folding factor gives
    what the unfused conv would (up to the weight quantization); the native batch norm then computes
    Krishnamoorthi's correction ``y * sigma / sigma_B + beta + (b - mu_B) * gamma / sigma_B``.

    The forward is ``F.batch_norm``'s, bit for bit (the C++ ConvBn2d computes the same). The backward
    needs no full-size pass beyond the batch norm's own: its input gradient with weight
    ``gamma / factor`` is already the gradient of ``y``, and with ``x = y / factor + bias`` normalised
    by its batch statistics, ``sum(g_x) = 0`` and ``sum(g_x * x) = gamma * grad_gamma * eps * invstd^2``
    (sums over all but the channel dimension), so ``grad_bias = 0`` and
    ``grad_factor = -sum(g_x * (x - bias)) / factor = -gamma * grad_gamma * eps * invstd^2 / factor``."""

    @staticmethod
    def forward(ctx, y, factor, bias, gamma, beta, running_mean, running_var, momentum, eps):
        x = y / factor.reshape(1, -1, 1, 1)
        if bias is not None:
            x.add_(bias.reshape(1, -1, 1, 1))
        out, save_mean, save_invstd = torch.native_batch_norm(x, gamma, beta, running_mean, running_var, True,
                                                              momentum, eps)
        ctx.save_for_backward(x, factor, gamma, save_mean, save_invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, factor, gamma, save_mean, save_invstd = ctx.saved_tensors
        grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, gamma / factor, None, None, save_mean, save_invstd, True, ctx.eps, [True, True, True])
        grad_factor = -(gamma * grad_gamma * ctx.eps) * save_invstd.square() / factor
        grad_bias = torch.zeros_like(factor) if ctx.has_bias else None
        return grad_y, grad_factor, grad_bias, grad_gamma, grad_beta, None, None, None, None


class ConvBn2d(_QATMixin, nn.Conv2d):
    """Fused ``Conv2d`` + ``BatchNorm2d`` with the batch norm folded into the weights (see the module doc).

    ``bn`` is the ``nn.BatchNorm2d`` holding gamma, beta and the running statistics (state dict keys
    ``bn.weight``, ``bn.running_mean``, ..., as in torch.ao's ``ConvBn2d``). ``step`` counts training
    forward passes; the statistics freeze once ``step >= freeze_bn_step`` (None: never by count) or after
    ``freeze_bn_stats()``.
    """

    _relu = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        qconfig=None,
        freeze_bn_step: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, True, True, device=device, dtype=dtype)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device if device != "meta" else None))
        self._steps = 0  # Python mirror of ``step``: no device synchronisation per forward
        self.freeze_bn_step = freeze_bn_step
        self.bn_frozen = False
        self._init_fake_quant(qconfig)

    # -- batch norm state ------------------------------------------------------------------------
    def freeze_bn_stats(self, frozen: bool = True):
        """Stop (or, with False, resume) updating the running statistics and normalising with batch
        statistics in training; the layer then computes what it computes in eval mode."""
        self.bn_frozen = bool(frozen)
        return self

    @property
    def bn_stats_frozen(self) -> bool:
        if self.bn_frozen:
            return True
        return self.freeze_bn_step is not None and self._steps >= int(self.freeze_bn_step)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "step" in state_dict:
            self._steps = int(self.step)

    def _gamma_beta(self):
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return gamma, beta

    def folded_weight_bias(self):
        """``(w * gamma / sigma, beta + (b - mu) * gamma / sigma)`` with the running statistics: the
        weights the QAT model fake-quantizes (in eval mode / with frozen statistics, also the bias it
        adds) and exactly what convert() quantizes."""
        gamma, beta = self._gamma_beta()
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
        factor = gamma / running_std
        w_fold = self.weight * factor.reshape(-1, 1, 1, 1)
        b = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)
        b_fold = beta + (b - self.bn.running_mean) * factor
        return w_fold, b_fold

    def weight_bias(self):
        return self.folded_weight_bias()

    def _conv_bn(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            frozen = self.bn_stats_frozen
            self._steps += 1
            with torch.no_grad():
                self.step.add_(1)
        else:
            frozen = True
        if frozen:
            w_fold, b_fold = self.folded_weight_bias()
            return self._conv_forward(x, self._fq_weight(w_fold), b_fold)

        bn = self.bn
        gamma, beta = self._gamma_beta()
        running_std = torch.sqrt(bn.running_var + bn.eps)
        factor = gamma / running_std
        y = self._conv_forward(x, self._fq_weight(self.weight * factor.reshape(-1, 1, 1, 1)), None)
        if y.numel() // y.shape[1] <= 1:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training with batch "
                f"statistics, got input of shape {list(x.shape)}"
            )
        with torch.no_grad():
            bn.num_batches_tracked += 1
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return _UnfoldBatchNorm.apply(y, factor, self.bias, gamma, beta, bn.running_mean, bn.running_var, momentum,
                                      bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_bn(x)
        if self._relu:
            y = F.relu(y)
        return self._fq_output(y)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig, freeze_bn_step: Optional[int] = None):
        if cls._relu:
            conv, bn, _relu = _unwrap_fused(mod, FusedConvBnReLU2d, "ConvBnReLU2d")
        else:
            conv, bn = _unwrap_fused(mod, FusedConvBn2d, "ConvBn2d")
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(f"{cls.__name__}.from_float: the BatchNorm2d has no running statistics to fold")
        args = _conv_args(conv)
        qat = cls(**args, eps=bn.eps, momentum=bn.momentum, qconfig=None, freeze_bn_step=freeze_bn_step, device="meta")
        qat.weight = conv.weight
        qat.bias = conv.bias
        qat.bn = bn
        qat.step = torch.zeros((), dtype=torch.int64, device=conv.weight.device)
        qat._steps = 0
        qat._init_fake_quant(qconfig)
        for fq in (qat.weight_fake_quant, qat.activation_post_process):
            if fq is not None:
                fq.to(conv.weight.device)
        qat.train(mod.training)
        return qat


class ConvBnReLU2d(ConvBn2d):
    """Fused ``Conv2d`` + ``BatchNorm2d`` + ``ReLU``: ``fake_quant(relu(conv_bn(x)))`` (see ConvBn2d)."""

    _relu = True


# --------------------------------------------------------------------------------------------------
# Stubs and the residual add
# --------------------------------------------------------------------------------------------------


class QuantStub(_QATMixin, nn.Module):
    """Marks where a model's input becomes quantized. Without a qconfig (in the float model) it is the
    identity; after prepare / prepare_qat it fake-quantizes its input with ``qconfig.activation``, and
    convert() turns it into ``qext.nn.quantized.Quantize``."""

    def __init__(self, qconfig=None):
        super().__init__()
        self._init_fake_quant(qconfig, weight=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(x)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        if not isinstance(mod, (QuantStub, _ao_type("QuantStub"))):
            raise TypeError(f"QuantStub.from_float expects a QuantStub, got {type(mod).__name__}")
        stub = cls(qconfig)
        if qconfig is not None:
            dev = _module_device(mod)
            if dev is not None:
                stub.to(dev)
        stub.train(mod.training)
        return stub


class DeQuantStub(nn.Module):
    """Marks where a model's output goes back to float: the identity in float and QAT models;
    convert() turns it into ``qext.nn.quantized.DeQuantize``."""

    weight_fake_quant = None
    activation_post_process = None

    def __init__(self, qconfig=None):
        super().__init__()
        self.qconfig = qconfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        if not isinstance(mod, (DeQuantStub, _ao_type("DeQuantStub"))):
            raise TypeError(f"DeQuantStub.from_float expects a DeQuantStub, got {type(mod).__name__}")
        stub = cls(qconfig)
        stub.train(mod.training)
        return stub


class QAdd(_QATMixin, nn.Module):
    """Residual add, ``QAdd()(x, y)``. Without a qconfig it is ``x + y``; after prepare / prepare_qat it
    fake-quantizes the sum with its own output quantizer (``activation_post_process``), and convert()
    turns it into ``qext.nn.quantized.QAdd``. Use one instance per add in the model."""

    def __init__(self, qconfig=None):
        super().__init__()
        self._init_fake_quant(qconfig, weight=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._fq_output(x + y)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        if not isinstance(mod, QAdd):
            raise TypeError(f"QAdd.from_float expects a QAdd, got {type(mod).__name__}")
        add = cls(qconfig)
        if qconfig is not None:
            dev = _module_device(mod)
            if dev is not None:
                add.to(dev)
        add.train(mod.training)
        return add


class _QATPool(_QATMixin):
    """An average pool that fake-quantizes its output with its own quantizer (``activation_post_process``),
    so that the converted pool (``qext.nn.quantized.AvgPool2d`` / ``AdaptiveAvgPool2d``) rounds the mean
    of its integer inputs to exactly the grid the QAT model trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq_output(super().forward(x))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig):
        _check_type(mod, cls._FLOAT_TYPES, cls.__name__)
        pool = cls(**{k: getattr(mod, k) for k in cls._POOL_ARGS}, qconfig=qconfig)
        dev = _module_device(mod)
        if dev is not None:
            pool.to(dev)
        pool.train(mod.training)
        return pool


class AvgPool2d(_QATPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` with a fake-quantized output."""

    _FLOAT_TYPES = (nn.AvgPool2d,)
    _POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None, qconfig=None):
        nn.AvgPool2d.__init__(self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self._init_fake_quant(qconfig, weight=False)


class AdaptiveAvgPool2d(_QATPool, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with a fake-quantized output."""

    _FLOAT_TYPES = (nn.AdaptiveAvgPool2d,)
    _POOL_ARGS = ("output_size",)

    def __init__(self, output_size, qconfig=None):
        nn.AdaptiveAvgPool2d.__init__(self, output_size)
        self._init_fake_quant(qconfig, weight=False)


class _Never:  # stands in for a torch.ao type that this torch does not have
    pass


def _ao_type(name: str):
    try:
        import torch.ao.quantization as tq

        return getattr(tq, name)
    except (ImportError, AttributeError):  # pragma: no cover
        return _Never


def _module_device(mod: nn.Module):
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return None


QAT_MODULES = (
    QLinear, LinearReLU, QConv2d, ConvReLU2d, ConvBn2d, ConvBnReLU2d, QuantStub, DeQuantStub, QAdd, AvgPool2d,
    AdaptiveAvgPool2d,
)

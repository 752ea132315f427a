"""Float fused containers made by :func:`qext.fuse`.

They are plain ``nn.Sequential`` subclasses, so a fused float model computes exactly what the unfused
one did (same submodules, same state dict entries under ``<name>.0``, ``<name>.1``, ...). Their only job
is to mark a pattern that :func:`qext.prepare_qat` / :func:`qext.prepare` swap for one QAT module
(``qext.nn.ConvBn2d`` and friends), which folds the batch norm into the convolution weights.
"""

from __future__ import annotations

from torch import nn


class _Fused(nn.Sequential):
    _types: tuple = ()

    def __init__(self, *mods: nn.Module):
        if len(mods) != len(self._types) or not all(type(m) is t for m, t in zip(mods, self._types)):
            got = ", ".join(type(m).__name__ for m in mods)
            want = ", ".join(t.__name__ for t in self._types)
            raise TypeError(f"{type(self).__name__} takes ({want}), got ({got})")
        super().__init__(*mods)


def _check_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, who: str) -> None:
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"{who}: BatchNorm2d has {bn.num_features} features but the Conv2d has {conv.out_channels} output channels"
        )
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{who}: BatchNorm2d without running statistics (track_running_stats=False) cannot be folded")


class FusedConvBn2d(_Fused):
    """``Conv2d`` followed by ``BatchNorm2d`` (float); becomes :class:`qext.nn.ConvBn2d` in QAT."""

    _types = (nn.Conv2d, nn.BatchNorm2d)

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__(conv, bn)
        _check_bn(conv, bn, type(self).__name__)


class FusedConvBnReLU2d(_Fused):
    """``Conv2d``, ``BatchNorm2d``, ``ReLU`` (float); becomes :class:`qext.nn.ConvBnReLU2d` in QAT."""

    _types = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: nn.ReLU):
        super().__init__(conv, bn, relu)
        _check_bn(conv, bn, type(self).__name__)


class FusedConvReLU2d(_Fused):
    """``Conv2d``, ``ReLU`` (float); becomes :class:`qext.nn.ConvReLU2d` in QAT."""

    _types = (nn.Conv2d, nn.ReLU)

    def __init__(self, conv: nn.Conv2d, relu: nn.ReLU):
        super().__init__(conv, relu)


class FusedLinearReLU(_Fused):
    """``Linear``, ``ReLU`` (float); becomes :class:`qext.nn.LinearReLU` in QAT."""

    _types = (nn.Linear, nn.ReLU)

    def __init__(self, linear: nn.Linear, relu: nn.ReLU):
        super().__init__(linear, relu)


FUSED_TYPES = (FusedConvBn2d, FusedConvBnReLU2d, FusedConvReLU2d, FusedLinearReLU)

"""Quantization configuration: :class:`QuantSpec` (how one tensor is quantized), :class:`QConfig`
(weights and activations of a module) and named presets (:func:`get_qconfig`).

Integer ranges. ``bits`` b (1..16), ``reduce_range`` drops one bit (b - 1 effective bits):

* signed:   ``[-2^(b-1), 2^(b-1) - 1]``  (int8: [-128, 127])
* unsigned: ``[0, 2^b - 1]``             (uint8: [0, 255]; with reduce_range: [0, 127])

Symmetric signed ranges keep the full ``[-128, 127]`` (not torch.ao's optional "narrow" [-127, 127]):
the scale is ``max|x| / ((quant_max - quant_min) / 2) = max|x| / 127.5`` exactly as torch.ao's
``MinMaxObserver`` / ``PerChannelMinMaxObserver`` compute it for qint8, so torch.ao is a bit-exact
reference, and the int8 kernels stay exact with -128 weights: the AVX2 ``vpmaddubsw`` pair sum of
7-bit activations (``int8_avx2`` preset, reduce_range) and int8 weights is at most
``2 * 127 * 128 = 32512 < 32767``. (With full 8-bit activations the pair sum can saturate whatever the
weight range is, since ``2 * 255 * 127 > 32767`` too; that is what the 7-bit preset is for.)

Symmetric unsigned ranges put the zero point in the middle (``(quant_min + quant_max + 1) // 2``, 128
for uint8), as torch.ao does for quint8; for post-ReLU data use an affine unsigned spec (its zero point
becomes 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Union

OBSERVERS = ("minmax", "ema", "histogram")
HISTOGRAM_METHODS = ("entropy", "percentile", "mse")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an activation) is quantized.

    Attributes:
        bits: integer width, 1..16.
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        symmetric: zero point fixed (0 for signed ranges, mid-range for unsigned ones) and the range
            chosen symmetric around 0; otherwise affine (zero point from the observed minimum).
        axis: None = per-tensor; an int = one scale per index along that dimension (may be negative).
        observer: "minmax", "ema" (moving-average min/max) or "histogram" (per-tensor only).
        learnable: LSQ / LSQ+: the scale (and, when affine, the zero point) become Parameters,
            initialised from the first batch and trained with ``qext.fake_quantize_learnable``.
        reduce_range: one bit less (e.g. 7-bit activations [0, 127] for the AVX2 int8 kernels).
        averaging_constant: EMA constant c of the "ema" observer: ``min += c * (batch_min - min)``.
        histogram_method: how the "histogram" observer chooses the clipping range: "entropy"
            (TensorRT-style minimum KL divergence), "percentile" or "mse".
        percentile: for histogram_method "percentile", in percent (0, 100]: symmetric specs keep
            this percentile of |x|, affine ones this percentile of each tail.
        bins: number of histogram bins of the "histogram" observer (>= 16).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: Optional[int] = None
    observer: str = "minmax"
    learnable: bool = False
    reduce_range: bool = False
    averaging_constant: float = 0.01
    histogram_method: str = "entropy"
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self):
        def bad(msg: str):
            raise ValueError(f"QuantSpec: {msg}")

        if not _is_int(self.bits) or not 1 <= self.bits <= 16:
            bad(f"bits must be an integer in 1..16, got {self.bits!r}")
        for name in ("signed", "symmetric", "learnable", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.reduce_range and self.bits < 2:
            bad(f"reduce_range needs bits >= 2 (it drops one bit), got bits={self.bits}")
        if self.axis is not None and not _is_int(self.axis):
            bad(f"axis must be None (per-tensor) or an integer, got {self.axis!r}")
        if self.observer not in OBSERVERS:
            bad(f"observer must be one of {', '.join(map(repr, OBSERVERS))}, got {self.observer!r}")
        if self.observer == "histogram" and self.axis is not None:
            bad(f"the histogram observer is per-tensor only, got axis={self.axis}")
        if not _is_number(self.averaging_constant) or not 0.0 < self.averaging_constant <= 1.0:
            bad(f"averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        if self.histogram_method not in HISTOGRAM_METHODS:
            bad(
                f"histogram_method must be one of {', '.join(map(repr, HISTOGRAM_METHODS))}, "
                f"got {self.histogram_method!r}"
            )
        if not _is_number(self.percentile) or not 0.0 < self.percentile <= 100.0:
            bad(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not _is_int(self.bins) or not 16 <= self.bins <= (1 << 24):
            bad(f"bins must be an integer in 16..2^24, got {self.bins!r}")

    @property
    def effective_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def quant_min(self) -> int:
        b = self.effective_bits
        return -(1 << (b - 1)) if self.signed else 0

    @property
    def quant_max(self) -> int:
        b = self.effective_bits
        return (1 << (b - 1)) - 1 if self.signed else (1 << b) - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


KMEANS_INITS = ("linear", "density", "kmeans++")
KMEANS_GRADS = ("sum", "mean")
PACKED_LABEL_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class KMeansSpec:
    """Weights clustered by k-means (Deep Compression): a codebook of ``2^bits`` float centroids per
    tensor (or per output channel) and one label per weight. The centroids are trained through their
    own gradient (the sum, or mean, of the gradients of the weights in their cluster); the labels stay
    fixed unless ``reassign_every`` is set.

    Attributes:
        bits: label width, 1..8 (``k = 2^bits`` centroids). Converted layers store labels packed at the
            next width of 1, 2, 4 or 8 bits (``storage_bits``).
        per_channel: one codebook per output channel instead of one per weight tensor.
        init: centroid initialisation of :func:`qext.kmeans`: "linear" (evenly spaced over [min, max],
            the Deep Compression choice), "density" (evenly spaced quantiles) or "kmeans++".
        iters: Lloyd iterations of the initial clustering.
        seed: seed of the "kmeans++" initialisation.
        grad: "sum" (Deep Compression) or "mean" (divided by the cluster size) centroid gradient.
        reassign_every: None keeps the labels fixed. An integer n keeps the float weights as well, trains
            them with the straight-through gradient, and every n training steps moves each weight to the
            label of its nearest centroid.
    """

    bits: int = 4
    per_channel: bool = False
    init: str = "linear"
    iters: int = 30
    seed: int = 0
    grad: str = "sum"
    reassign_every: Optional[int] = None

    def __post_init__(self):
        def bad(msg: str):
            raise ValueError(f"KMeansSpec: {msg}")

        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            bad(f"bits must be an integer in 1..8, got {self.bits!r}")
        if not isinstance(self.per_channel, bool):
            bad(f"per_channel must be a bool, got {self.per_channel!r}")
        if self.init not in KMEANS_INITS:
            bad(f"init must be one of {', '.join(map(repr, KMEANS_INITS))}, got {self.init!r}")
        if not _is_int(self.iters) or self.iters < 0:
            bad(f"iters must be a non-negative integer, got {self.iters!r}")
        if not _is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.grad not in KMEANS_GRADS:
            bad(f"grad must be one of {', '.join(map(repr, KMEANS_GRADS))}, got {self.grad!r}")
        if self.reassign_every is not None and (not _is_int(self.reassign_every) or self.reassign_every < 1):
            bad(f"reassign_every must be None or a positive integer, got {self.reassign_every!r}")

    @property
    def k(self) -> int:
        return 1 << self.bits

    @property
    def storage_bits(self) -> int:
        """Bits per stored label: the smallest of 1, 2, 4, 8 that holds ``bits``."""
        return next(b for b in PACKED_LABEL_BITS if b >= self.bits)

    def replace(self, **changes) -> "KMeansSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class QConfig:
    """Quantization of a module: its output activations and its weights. ``None`` leaves that
    tensor in floating point. Weights may also be clustered (:class:`KMeansSpec`)."""

    activation: Optional[QuantSpec] = None
    weight: Optional[Union[QuantSpec, KMeansSpec]] = None

    def __post_init__(self):
        if self.activation is not None and not isinstance(self.activation, QuantSpec):
            raise TypeError(f"QConfig: activation must be a QuantSpec or None, got {type(self.activation).__name__}")
        if self.weight is not None and not isinstance(self.weight, (QuantSpec, KMeansSpec)):
            raise TypeError(
                f"QConfig: weight must be a QuantSpec, a KMeansSpec or None, got {type(self.weight).__name__}"
            )

    @property
    def kmeans(self) -> bool:
        """Whether the weights are k-means clustered."""
        return isinstance(self.weight, KMeansSpec)


def _presets() -> Dict[str, QConfig]:
    w8_pc = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, observer="minmax")
    w8_pt = QuantSpec(bits=8, signed=True, symmetric=True, axis=None, observer="minmax")
    a8_ema = QuantSpec(bits=8, signed=False, symmetric=False, observer="ema", averaging_constant=0.01)
    return {
        # per-channel symmetric int8 weights, EMA affine uint8 activations
        "int8": QConfig(activation=a8_ema, weight=w8_pc),
        "int8_per_tensor": QConfig(activation=a8_ema, weight=w8_pt),
        # 7-bit activations [0, 127]: exact with the AVX2 u8 x s8 (vpmaddubsw) int8 kernels
        "int8_avx2": QConfig(activation=a8_ema.replace(reduce_range=True), weight=w8_pc),
        # LSQ: learnable 4-bit per-channel symmetric weights; LSQ+ learnable affine 4-bit activations
        "int4_lsq": QConfig(
            activation=QuantSpec(bits=4, signed=False, symmetric=False, observer="minmax", learnable=True),
            weight=QuantSpec(bits=4, signed=True, symmetric=True, axis=0, observer="minmax", learnable=True),
        ),
        # k-means weight clustering (Deep Compression): one codebook per tensor, float activations
        **{f"kmeans{b}": QConfig(weight=KMeansSpec(bits=b)) for b in (8, 4, 2)},
        # post-training quantization: histogram (KL entropy) calibrated uint8 activations
        "int8_histogram": QConfig(
            activation=QuantSpec(bits=8, signed=False, symmetric=False, observer="histogram",
                                 histogram_method="entropy"),
            weight=w8_pc,
        ),
    }


QCONFIG_PRESETS: Dict[str, QConfig] = _presets()


def get_qconfig(name: str) -> QConfig:
    """A named preset: "int8", "int8_per_tensor", "int8_avx2", "int4_lsq", "int8_histogram", and the
    k-means presets "kmeans8", "kmeans4", "kmeans2"."""
    try:
        return QCONFIG_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"get_qconfig: unknown qconfig {name!r}; presets: {', '.join(sorted(QCONFIG_PRESETS))}"
        ) from None


__all__ = ["KMeansSpec", "QuantSpec", "QConfig", "get_qconfig", "QCONFIG_PRESETS", "OBSERVERS", "HISTOGRAM_METHODS"]


class SpecShortcuts:
    """Read-only shortcuts to the fields of ``self.spec`` (a :class:`QuantSpec`), shared by the
    observers and FakeQuantize."""

    spec: QuantSpec

    @property
    def quant_min(self) -> int:
        return self.spec.quant_min

    @property
    def quant_max(self) -> int:
        return self.spec.quant_max

    @property
    def axis(self) -> Optional[int]:
        return self.spec.axis

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def learnable(self) -> bool:
        return self.spec.learnable

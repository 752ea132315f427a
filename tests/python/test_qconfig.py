"""QuantSpec / QConfig / get_qconfig: integer ranges, presets, validation of bad specs."""

import dataclasses
import re

import pytest

from qext.fake_quant import FakeQuantize
from qext.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, make_observer
from qext.qconfig import KMeansSpec, QConfig, QuantSpec, get_qconfig


@pytest.mark.parametrize(
    "bits,signed,reduce_range,expected",
    [
        (8, True, False, (-128, 127)),
        (8, False, False, (0, 255)),
        (8, False, True, (0, 127)),  # 7-bit activations for the AVX2 int8 kernels
        (8, True, True, (-64, 63)),
        (4, True, False, (-8, 7)),
        (4, False, False, (0, 15)),
        (1, True, False, (-1, 0)),
        (1, False, False, (0, 1)),
        (2, False, True, (0, 1)),
        (16, True, False, (-32768, 32767)),
        (16, False, False, (0, 65535)),
    ],
)
def test_quant_range(bits, signed, reduce_range, expected):
    spec = QuantSpec(bits=bits, signed=signed, reduce_range=reduce_range)
    assert (spec.quant_min, spec.quant_max) == expected
    assert spec.effective_bits == bits - int(reduce_range)


def test_defaults_and_frozen():
    spec = QuantSpec()
    assert (spec.bits, spec.signed, spec.symmetric, spec.axis, spec.observer, spec.learnable) == (
        8, True, True, None, "minmax", False)
    assert not spec.per_channel and QuantSpec(axis=0).per_channel
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4
    assert spec.replace(bits=4).quant_max == 7
    assert hash(spec) == hash(QuantSpec())  # usable as a dict key


def test_presets():
    q = get_qconfig("int8")
    assert q.weight == QuantSpec(bits=8, signed=True, symmetric=True, axis=0, observer="minmax")
    assert (q.weight.quant_min, q.weight.quant_max) == (-128, 127)
    a = q.activation
    assert (a.bits, a.signed, a.symmetric, a.axis, a.observer) == (8, False, False, None, "ema")
    assert (a.quant_min, a.quant_max) == (0, 255)

    pt = get_qconfig("int8_per_tensor")
    assert pt.weight.axis is None and pt.activation == a

    avx2 = get_qconfig("int8_avx2")
    assert (avx2.activation.quant_min, avx2.activation.quant_max) == (0, 127)
    assert avx2.weight.axis == 0 and (avx2.weight.quant_min, avx2.weight.quant_max) == (-128, 127)
    # u8 x s8 pair sums of vpmaddubsw stay below int16 saturation
    assert 2 * avx2.activation.quant_max * -avx2.weight.quant_min <= 32767

    lsq = get_qconfig("int4_lsq")
    assert lsq.weight.learnable and lsq.activation.learnable
    assert lsq.weight.axis == 0 and (lsq.weight.quant_min, lsq.weight.quant_max) == (-8, 7)
    assert (lsq.activation.quant_min, lsq.activation.quant_max) == (0, 15)

    hist = get_qconfig("int8_histogram")
    assert hist.activation.observer == "histogram" and hist.activation.histogram_method == "entropy"
    assert hist.weight.axis == 0

    # every preset builds its modules
    for name in ("int8", "int8_per_tensor", "int8_avx2", "int4_lsq", "int8_histogram"):
        qc = get_qconfig(name)
        for spec in (qc.weight, qc.activation):
            FakeQuantize(spec)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown qconfig 'int3'.*int4_lsq.*int8"):
        get_qconfig("int3")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=0), "bits must be an integer in 1..16, got 0"),
        (dict(bits=17), "bits must be an integer in 1..16, got 17"),
        (dict(bits=-8), "bits must be an integer in 1..16, got -8"),
        (dict(bits=8.0), "bits must be an integer in 1..16, got 8.0"),
        (dict(bits=True), "bits must be an integer in 1..16, got True"),
        (dict(signed="yes"), "signed must be a bool, got 'yes'"),
        (dict(symmetric=1), "symmetric must be a bool, got 1"),
        (dict(bits=1, reduce_range=True), "reduce_range needs bits >= 2"),
        (dict(axis="0"), "axis must be None (per-tensor) or an integer, got '0'"),
        (dict(observer="max"), "observer must be one of 'minmax', 'ema', 'histogram', got 'max'"),
        (dict(observer="histogram", axis=0), "the histogram observer is per-tensor only, got axis=0"),
        (dict(averaging_constant=0.0), "averaging_constant must be in (0, 1], got 0.0"),
        (dict(averaging_constant=1.5), "averaging_constant must be in (0, 1], got 1.5"),
        (dict(histogram_method="kl"), "histogram_method must be one of 'entropy', 'percentile', 'mse', got 'kl'"),
        (dict(percentile=0), "percentile must be in (0, 100], got 0"),
        (dict(percentile=100.5), "percentile must be in (0, 100], got 100.5"),
        (dict(bins=8), "bins must be an integer in 16..2^24, got 8"),
    ],
)
def test_bad_spec(kwargs, message):
    with pytest.raises(ValueError, match=re.escape("QuantSpec: " + message)):
        QuantSpec(**kwargs)


def test_bad_spec_through_replace_and_observer_kwargs():
    with pytest.raises(ValueError, match="bits must be an integer in 1..16, got 20"):
        QuantSpec().replace(bits=20)
    with pytest.raises(ValueError, match="bits must be an integer in 1..16, got 33"):
        MinMaxObserver(bits=33)


def test_qconfig_types():
    assert QConfig() == QConfig(activation=None, weight=None)
    QConfig(activation=QuantSpec(), weight=None)
    with pytest.raises(TypeError, match="QConfig: weight must be a QuantSpec, a KMeansSpec or None, got int"):
        QConfig(activation=None, weight=8)
    with pytest.raises(TypeError, match="QConfig: activation must be a QuantSpec or None, got KMeansSpec"):
        QConfig(activation=KMeansSpec())
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        FakeQuantize({"bits": 8})


def test_make_observer():
    assert type(make_observer(QuantSpec(observer="minmax"))) is MinMaxObserver
    assert type(make_observer(QuantSpec(observer="ema", axis=1))) is MovingAverageMinMaxObserver
    obs = make_observer(QuantSpec(observer="histogram", bins=256, histogram_method="mse"))
    assert type(obs) is HistogramObserver and obs.histogram.shape == (256,)
    # observers built from fields or from a spec of another kind take their own kind
    assert MinMaxObserver(bits=4, axis=0).spec == QuantSpec(bits=4, axis=0)
    assert MovingAverageMinMaxObserver(QuantSpec()).spec.observer == "ema"
    with pytest.raises(TypeError, match="make_observer: spec must be a QuantSpec"):
        make_observer("minmax")

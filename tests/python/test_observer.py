"""Observers against independent references: torch.ao's observers (bit-exact scales and zero points
for min/max and EMA), hand-computed histograms, a loop implementation of TensorRT's KL search,
numerically integrated quantization errors, torch.quantile; determinism and bad input."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch.ao.quantization import (
    HistogramObserver as AOHistogramObserver,
    MinMaxObserver as AOMinMaxObserver,
    MovingAverageMinMaxObserver as AOMovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver as AOMovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver as AOPerChannelMinMaxObserver,
)

import qext
from qext.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    histogram_grid,
    histogram_range,
    kl_costs,
    mse_costs,
    rebin,
)
from qext.qconfig import QuantSpec
from qext_testing import cuda_usable

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")

NAN, INF = float("nan"), float("inf")

# (our spec fields, torch.ao dtype, torch.ao per-tensor qscheme, torch.ao quant range or None)
SCHEMES = [
    (dict(bits=8, signed=True, symmetric=True), torch.qint8, "symmetric", None),
    (dict(bits=8, signed=False, symmetric=False), torch.quint8, "affine", None),
    (dict(bits=8, signed=True, symmetric=False), torch.qint8, "affine", None),
    (dict(bits=8, signed=False, symmetric=True), torch.quint8, "symmetric", None),
    (dict(bits=8, signed=False, symmetric=False, reduce_range=True), torch.quint8, "affine", (0, 127)),
    (dict(bits=4, signed=True, symmetric=True), torch.qint8, "symmetric", (-8, 7)),
    (dict(bits=4, signed=False, symmetric=False), torch.quint8, "affine", (0, 15)),
]
SCHEME_IDS = ["s8sym", "u8aff", "s8aff", "u8sym", "u7aff", "s4sym", "u4aff"]


def ao_kwargs(dtype, scheme, qrange, per_channel=False):
    qscheme = {
        ("symmetric", False): torch.per_tensor_symmetric,
        ("affine", False): torch.per_tensor_affine,
        ("symmetric", True): torch.per_channel_symmetric,
        ("affine", True): torch.per_channel_affine,
    }[(scheme, per_channel)]
    kw = dict(dtype=dtype, qscheme=qscheme)
    if qrange is not None:
        kw.update(quant_min=qrange[0], quant_max=qrange[1])
    return kw


def batches(n=4, shape=(16, 8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def assert_qparams_equal(ours, ref):
    s, z = ours
    rs, rz = ref
    assert s.dtype == torch.float32 and z.dtype == torch.int32
    assert torch.equal(s, rs.reshape(s.shape).float()), (s, rs)
    assert torch.equal(z, rz.reshape(z.shape).to(torch.int32)), (z, rz)


# --------------------------------------------------------------------------------------------------
# Min / max and EMA against torch.ao (bit-exact)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,dtype,scheme,qrange", SCHEMES, ids=SCHEME_IDS)
def test_minmax_matches_torch_ao(fields, dtype, scheme, qrange):
    ours = MinMaxObserver(**fields)
    ref = AOMinMaxObserver(**ao_kwargs(dtype, scheme, qrange))
    for x in batches():
        assert ours(x) is x
        ref(x)
    assert torch.equal(ours.min_val, ref.min_val.reshape(1)) and torch.equal(ours.max_val, ref.max_val.reshape(1))
    assert_qparams_equal(ours.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("fields,dtype,scheme,qrange", SCHEMES[:3] + SCHEMES[5:], ids=SCHEME_IDS[:3] + SCHEME_IDS[5:])
def test_per_channel_minmax_matches_torch_ao(fields, dtype, scheme, qrange, axis):
    ours = MinMaxObserver(axis=axis, **fields)
    ref = AOPerChannelMinMaxObserver(ch_axis=axis, **ao_kwargs(dtype, scheme, qrange, per_channel=True))
    for x in batches():
        ours(x)
        ref(x)
    assert ours.min_val.shape == (batches()[0].shape[axis],)
    assert_qparams_equal(ours.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("c", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("fields,dtype,scheme,qrange", SCHEMES[:2] + SCHEMES[4:6], ids=SCHEME_IDS[:2] + SCHEME_IDS[4:6])
def test_ema_matches_torch_ao(fields, dtype, scheme, qrange, c):
    ours = MovingAverageMinMaxObserver(averaging_constant=c, **fields)
    ref = AOMovingAverageMinMaxObserver(averaging_constant=c, **ao_kwargs(dtype, scheme, qrange))
    for x in batches(6):
        ours(x)
        ref(x)
        assert torch.equal(ours.min_val, ref.min_val.reshape(1))
        assert torch.equal(ours.max_val, ref.max_val.reshape(1))
    assert_qparams_equal(ours.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("fields,dtype,scheme,qrange", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_per_channel_ema_matches_torch_ao(fields, dtype, scheme, qrange, axis):
    ours = MovingAverageMinMaxObserver(averaging_constant=0.1, axis=axis, **fields)
    ref = AOMovingAveragePerChannelMinMaxObserver(averaging_constant=0.1, ch_axis=axis,
                                                  **ao_kwargs(dtype, scheme, qrange, per_channel=True))
    for x in batches(5):
        ours(x)
        ref(x)
    assert torch.equal(ours.min_val, ref.min_val) and torch.equal(ours.max_val, ref.max_val)
    assert_qparams_equal(ours.calculate_qparams(), ref.calculate_qparams())


def test_ema_hand_computed():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.25, signed=False, symmetric=False)
    obs(torch.tensor([-1.0, 3.0]))
    obs(torch.tensor([-5.0, 7.0]))
    assert obs.min_val.item() == -1.0 + 0.25 * (-5.0 + 1.0)  # -2
    assert obs.max_val.item() == 3.0 + 0.25 * (7.0 - 3.0)  # 4
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(6.0 / 255, rel=1e-7) and zp.item() == round(2 / (6 / 255))


def test_minmax_hand_computed_symmetric():
    obs = MinMaxObserver(bits=8, signed=True, symmetric=True)
    obs(torch.tensor([-2.0, 0.5, 1.0]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == np.float32(2.0) / np.float32(127.5) and zp.item() == 0


# --------------------------------------------------------------------------------------------------
# Non-finite values, channels, empty inputs, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
@pytest.mark.parametrize("axis", [None, 1])
def test_non_finite_values_are_skipped(cls, axis):
    a, b = cls(axis=axis), cls(axis=axis)
    for x in batches(3):
        y = x.clone()
        y[0, :, 0] = NAN
        y[1, :, 1] = INF
        y[2, :, 2] = -INF
        x_kept = x.clone()
        x_kept[0, :, 0] = x_kept[3, :, 0]  # the same finite values without the non-finite ones
        x_kept[1, :, 1] = x_kept[3, :, 1]
        x_kept[2, :, 2] = x_kept[3, :, 2]
        a(y)
        b(x_kept)
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)


def test_ema_channel_initialised_when_its_first_finite_values_arrive():
    obs = MovingAverageMinMaxObserver(axis=0, averaging_constant=0.5)
    x = torch.tensor([[1.0, 2.0], [NAN, NAN]])
    obs(x)
    assert obs.min_val[1].item() == INF
    obs(torch.tensor([[3.0, 4.0], [-6.0, 8.0]]))
    assert obs.min_val.tolist() == [2.0, -6.0] and obs.max_val.tolist() == [3.0, 8.0]
    obs(torch.tensor([[NAN, NAN], [-2.0, 4.0]]))  # a batch without finite values in channel 0
    assert obs.min_val.tolist() == [2.0, -4.0] and obs.max_val.tolist() == [3.0, 6.0]


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_all_nan_raises_naming_observer(cls):
    obs = cls()
    obs.module_name = "features.3.activation_post_process"
    obs(torch.full((4, 4), NAN))
    obs(torch.tensor([INF, -INF]))
    with pytest.raises(ValueError, match=rf"{cls.__name__} 'features\.3\.activation_post_process': "
                                         r"no finite values observed \(all NaN/Inf\)$"):
        obs.calculate_qparams()


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_channel_without_finite_values_named(cls):
    obs = cls(axis=1)
    x = torch.randn(5, 6)
    x[:, 3] = NAN
    x[0, 3] = INF
    obs(x)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: no finite values observed \(all NaN/Inf\) in channel 3"):
        obs.calculate_qparams()


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_not_observed(cls):
    obs = cls()
    obs(torch.empty(0, 3))  # empty inputs are skipped
    with pytest.raises(ValueError, match=rf"{cls.__name__}: calculate_qparams called before any data was observed"):
        obs.calculate_qparams()


def test_channel_count_change_and_bad_axis():
    obs = MinMaxObserver(axis=1)
    obs(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"input has 5 channels along axis 1 \(shape \[2, 5\]\) but 4 were observed"):
        obs(torch.randn(2, 5))
    with pytest.raises(IndexError, match=r"MinMaxObserver: axis 1 is out of range for a 1-dimensional input"):
        obs(torch.randn(3))


def test_state_dict_round_trip_into_fresh_observers():
    for make in (lambda: MinMaxObserver(axis=0), lambda: MovingAverageMinMaxObserver(axis=-1),
                 lambda: HistogramObserver(bins=512, histogram_method="mse")):
        a = make()
        for x in batches(3):
            a(x)
        b = make()
        b.load_state_dict(a.state_dict())
        assert_qparams_equal(b.calculate_qparams(), a.calculate_qparams())
        # and it keeps observing from the loaded state
        x = torch.randn(16, 8, 5) * 10
        a(x)
        b(x)
        assert_qparams_equal(b.calculate_qparams(), a.calculate_qparams())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(dtype):
    x = torch.randn(64, 3).to(dtype)
    for obs, ref in ((MinMaxObserver(axis=1), x.float().amin(0)),
                     (MovingAverageMinMaxObserver(axis=1), x.float().amin(0))):
        obs(x)
        assert torch.equal(obs.min_val, ref)
    h = HistogramObserver()
    h(x)
    assert int(h.histogram.sum()) == x.numel()


# --------------------------------------------------------------------------------------------------
# Histogram: grid, exact counts, order independence
# --------------------------------------------------------------------------------------------------


def reference_counts(data, e, s, bins):
    """Counts of the finite values on the grid (2^e, s), computed directly in float64."""
    x = data.double().reshape(-1)
    x = x[torch.isfinite(x)]
    idx = torch.floor(x / 2.0**e).long() - s
    assert idx.min() >= 0 and idx.max() < bins
    return torch.bincount(idx, minlength=bins)


def test_histogram_grid_properties():
    for lo, hi, bins in [(-1.0, 1.0, 2048), (0.0, 5.5, 2048), (1000.0, 1000.5, 64), (-3e-20, 1e-19, 16),
                         (0.0, 0.0, 2048), (7.25, 7.25, 100), (-1e30, 1e30, 2048)]:
        e, s = histogram_grid(lo, hi, bins)
        w = 2.0**e
        assert s * w <= lo and hi < (s + bins) * w  # covers, the top edge excluded
        if hi > lo:
            e1 = e - 1  # the next finer grid does not cover
            finer_covers = math.floor(hi / 2.0**e1) - math.floor(lo / 2.0**e1) <= bins - 1
            assert not finer_covers or e1 < math.frexp(max(abs(lo), abs(hi)))[1] - 40
    assert histogram_grid(-1.0, 1.0, 2048) == (-9, -512)  # 1.0 would sit on the top edge of 2^-10 bins
    assert histogram_grid(-1.0, 0.999, 2048) == (-10, -1024)


def test_rebin_exact():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(5000, generator=g)
    e, s = histogram_grid(float(data.min()), float(data.max()), 256)
    h = reference_counts(data, e, s, 256)
    e2, s2 = histogram_grid(float(data.min()), 40.0, 256)
    assert e2 > e
    assert torch.equal(rebin(h, e, s, e2, s2), reference_counts(data, e2, s2, 256))


def test_histogram_incremental_equals_one_shot_and_is_order_independent():
    parts = [torch.randn(3000) * 0.1, torch.randn(2000) * 3 + 5, torch.rand(1000) * -20, torch.randn(500) * 1e-3]
    parts[1][::17] = NAN
    parts[2][::31] = INF
    union = torch.cat(parts)
    one = HistogramObserver(bins=1024)
    one(union)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        inc = HistogramObserver(bins=1024)
        for i in order:
            inc(parts[i])
        assert inc.grid() == one.grid()
        assert torch.equal(inc.histogram, one.histogram)
        assert torch.equal(inc.min_val, one.min_val) and torch.equal(inc.max_val, one.max_val)
    e, s = one.grid()
    assert torch.equal(one.histogram, reference_counts(union, e, s, 1024))
    assert int(one.histogram.sum()) == int(torch.isfinite(union).sum())
    # the data occupy at least about half of the bins
    nz = torch.nonzero(one.histogram)[:, 0]
    assert int(nz[-1] - nz[0]) + 1 >= 1024 // 2 - 1


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_deterministic(method, symmetric):
    spec = QuantSpec(signed=symmetric, symmetric=symmetric, observer="histogram", histogram_method=method, bins=512)
    results = []
    for order in ([0, 1, 2], [0, 1, 2], [2, 1, 0]):
        data = batches(3, shape=(4000,), seed=3)
        obs = HistogramObserver(spec)
        for i in order:
            obs(data[i])
        results.append(obs.calculate_qparams())
    for s, z in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(z, results[0][1])


# --------------------------------------------------------------------------------------------------
# Histogram: range selection
# --------------------------------------------------------------------------------------------------


def gaussian_with_outliers(n=50000, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) + shift
    x[:5] = torch.tensor([25.0, -18.0, 30.0, 12.0, -22.0])
    return x


def test_percentile_against_torch_quantile():
    x = gaussian_with_outliers()
    for symmetric in (True, False):
        obs = HistogramObserver(symmetric=symmetric, signed=True, histogram_method="percentile", percentile=99.9)
        obs(x)
        e, s = obs.grid()
        w = 2.0**e
        lo, hi = histogram_range(obs.histogram, e, s, float(x.min()), float(x.max()), obs.spec)
        if symmetric:
            ref = torch.quantile(x.abs().double(), 0.999).item()
            assert hi == -lo and abs(hi - ref) <= w
        else:
            assert abs(lo - torch.quantile(x.double(), 0.001).item()) <= w
            assert abs(hi - torch.quantile(x.double(), 0.999).item()) <= w


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_100_and_wide_ranges_equal_minmax(symmetric):
    x = gaussian_with_outliers(shift=0.5)
    fields = dict(signed=symmetric, symmetric=symmetric)
    mm = MinMaxObserver(**fields)
    mm(x)
    h = HistogramObserver(histogram_method="percentile", percentile=100.0, **fields)
    h(x)
    assert_qparams_equal(h.calculate_qparams(), mm.calculate_qparams())
    # 16-bit entropy: more levels than bins, so the full range
    mm16 = MinMaxObserver(bits=16, **fields)
    mm16(x)
    h16 = HistogramObserver(bits=16, histogram_method="entropy", **fields)
    h16(x)
    assert_qparams_equal(h16.calculate_qparams(), mm16.calculate_qparams())


def folded(obs):
    """|x| histogram from a histogram whose grid contains 0 (bins [k w, (k+1) w) of |x|)."""
    e, s = obs.grid()
    h = obs.histogram.clone()
    zero = -s
    assert 0 <= zero <= h.numel()
    pos, neg = h[zero:], h[:zero].flip(0)
    f = torch.zeros(max(pos.numel(), neg.numel()), dtype=torch.int64)
    f[:pos.numel()] += pos
    f[:neg.numel()] += neg
    return f[: int(torch.nonzero(f)[-1, 0]) + 1].numpy(), 2.0**e


def ref_kl(bins, i, nbins):
    """TensorRT / pytorch-quantization's KL divergence for threshold bin i (loop over candidates,
    bincount per candidate: independent of the vectorised cumulative-sum implementation)."""
    bins = bins.astype(np.float64)
    ref = bins[:i].copy()
    ref[i - 1] += bins[i:].sum()
    digit = (np.arange(i) * nbins) // i
    nonzero = bins[:i] > 0
    level_sum = np.bincount(digit, weights=bins[:i], minlength=nbins)
    level_nz = np.bincount(digit, weights=nonzero.astype(np.float64), minlength=nbins)
    q = np.where(nonzero, level_sum[digit] / np.maximum(level_nz[digit], 1), 0.0)
    p = ref / ref.sum()
    q = q / q.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum()


@pytest.mark.parametrize("bits,signed", [(8, True), (6, True), (8, False)])
def test_entropy_matches_loop_reference(bits, signed):
    x = gaussian_with_outliers(seed=5)
    obs = HistogramObserver(bits=bits, signed=signed, symmetric=True, histogram_method="entropy", bins=1024)
    obs(x)
    e, s = obs.grid()
    lo, hi = histogram_range(obs.histogram, e, s, float(x.min()), float(x.max()), obs.spec)
    f, w = folded(obs)
    f = f.copy()
    f[0] = f[1]  # NVIDIA: bins[0] = bins[1]
    nbins = (obs.spec.quant_max - obs.spec.quant_min + 1) // 2
    costs = {i: ref_kl(f, i, nbins) for i in range(nbins, len(f) + 1)}
    best = min(costs.values())
    chosen = round(hi / w)
    assert hi == -lo and hi == chosen * w < float(x.abs().max())  # the outliers are clipped
    assert costs[chosen] <= best + 1e-12
    # the vectorised costs agree with the loop
    cand = torch.arange(nbins, len(f) + 1)
    ours = kl_costs(torch.from_numpy(f), torch.zeros_like(cand), cand, nbins)
    np.testing.assert_allclose(ours.numpy(), [costs[int(i)] for i in cand], rtol=1e-9, atol=1e-15)


def test_entropy_clips_outliers_and_affine_relu_like_data():
    x = gaussian_with_outliers()
    obs = HistogramObserver(histogram_method="entropy")
    obs(x)
    scale, zp = obs.calculate_qparams()
    threshold = scale.item() * 127.5
    assert 3.0 < threshold < 12.0 and zp.item() == 0
    # post-ReLU data with a spike at 0: affine, uint8, the range starts at 0 -> zero point 0
    relu = torch.relu(gaussian_with_outliers(seed=2))
    obs = HistogramObserver(signed=False, symmetric=False, histogram_method="entropy")
    obs(relu)
    scale, zp = obs.calculate_qparams()
    assert zp.item() == 0 and 3.0 < scale.item() * 255 < 12.5  # clips the outliers at 18 .. 30


def numeric_mse(h, zero, lo, hi, qmin, qmax, symmetric, samples=4000):
    """The expected squared error of mse_costs by midpoint integration inside each bin."""
    if symmetric:
        delta = max(-lo, hi) / ((qmax - qmin) / 2.0)
        z = 0.0 if qmin < 0 else float((qmin + qmax + 1) // 2)
    else:
        delta = (hi - lo) / (qmax - qmin)
        z = float(np.clip(qmin - np.round(lo / delta), qmin, qmax))
    total = 0.0
    u = (np.arange(samples) + 0.5) / samples
    for j in np.nonzero(h)[0]:
        xs = j - zero + u
        q = (np.clip(np.round(xs / delta) + z, qmin, qmax) - z) * delta
        total += h[j] * np.mean((xs - q) ** 2)
    return total


@pytest.mark.parametrize("symmetric,qmin,qmax", [(True, -8, 7), (False, 0, 15), (True, 0, 15)])
def test_mse_costs_match_numeric_integration(symmetric, qmin, qmax):
    g = torch.Generator().manual_seed(7)
    h = torch.randint(0, 50, (60,), generator=g)
    h[::5] = 0
    zero = 25
    los = torch.tensor([-25.0, -10.0, -3.5, -17.25])
    his = torch.tensor([35.0, 10.0, 20.5, 3.0])
    if symmetric:
        his = torch.maximum(-los, his)
        los = -his
    ours = mse_costs(h, zero, los, his, qmin, qmax, symmetric)
    ref = [numeric_mse(h.numpy(), zero, float(a), float(b), qmin, qmax, symmetric) for a, b in zip(los, his)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-4)


def quant_error(x, scale, zp, qmin, qmax):
    return ((qext.functional.fake_quantize(x, scale, zp, qmin, qmax) - x) ** 2).mean().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_method_beats_minmax_and_torch_ao(bits, symmetric):
    x = gaussian_with_outliers(shift=0.0 if symmetric else 0.7)
    fields = dict(bits=bits, signed=symmetric, symmetric=symmetric)
    qmin, qmax = QuantSpec(**fields).quant_min, QuantSpec(**fields).quant_max
    ours = HistogramObserver(histogram_method="mse", **fields)
    mm = MinMaxObserver(**fields)
    ours(x)
    mm(x)
    err = quant_error(x, *ours.calculate_qparams(), qmin, qmax)
    err_minmax = quant_error(x, *mm.calculate_qparams(), qmin, qmax)
    # 4 bits: clipping the outliers pays; 8 bits: it hardly does (the outliers' error grows fast)
    assert err < (0.5 if bits == 4 else 1.0) * err_minmax
    if bits == 8:
        dtype = torch.qint8 if symmetric else torch.quint8
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        ao = AOHistogramObserver(dtype=dtype, qscheme=qscheme)
        ao(x)
        err_ao = quant_error(x, *ao.calculate_qparams(), qmin, qmax)
        assert err <= 1.02 * err_ao


def test_symmetric_specs_choose_symmetric_ranges():
    x = gaussian_with_outliers(shift=2.0)
    for method in ("entropy", "percentile", "mse"):
        obs = HistogramObserver(signed=True, symmetric=True, histogram_method=method, bins=512)
        obs(x)
        e, s = obs.grid()
        lo, hi = histogram_range(obs.histogram, e, s, float(x.min()), float(x.max()), obs.spec)
        assert lo == -hi
        assert obs.calculate_qparams()[1].item() == 0
        u = HistogramObserver(signed=False, symmetric=True, histogram_method=method, bins=512)
        u(x)
        assert u.calculate_qparams()[1].item() == 128


def test_data_far_from_zero_and_constant_data():
    for data in (torch.full((100,), 3.0), torch.zeros(10), torch.rand(1000) + 1000.0, -torch.rand(1000) - 50):
        for method in ("entropy", "percentile", "mse"):
            for symmetric in (True, False):
                obs = HistogramObserver(signed=symmetric, symmetric=symmetric, histogram_method=method, bins=256)
                obs(data)
                scale, zp = obs.calculate_qparams()
                assert torch.isfinite(scale).all() and scale.item() > 0
                mm = MinMaxObserver(signed=symmetric, symmetric=symmetric)
                mm(data)
                assert scale.item() <= mm.calculate_qparams()[0].item() * (1 + 1e-6)


# --------------------------------------------------------------------------------------------------
# CUDA: the same scales as on the CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not cuda_usable(), reason="needs CUDA and qext's CUDA kernels")
@pytest.mark.parametrize("make", [
    lambda: MinMaxObserver(axis=1),
    lambda: MovingAverageMinMaxObserver(signed=False, symmetric=False),
    lambda: HistogramObserver(histogram_method="entropy"),
    lambda: HistogramObserver(signed=False, symmetric=False, histogram_method="mse"),
    lambda: HistogramObserver(histogram_method="percentile"),
])
def test_cuda_matches_cpu(make):
    cpu, gpu = make(), make().cuda()
    for x in batches(3, shape=(64, 32, 9)):
        x[0, 0, :3] = torch.tensor([NAN, INF, -INF])
        cpu(x)
        gpu(x.cuda())
    s_c, z_c = cpu.calculate_qparams()
    s_g, z_g = gpu.calculate_qparams()
    assert s_g.device.type == "cuda"
    assert torch.equal(s_c, s_g.cpu()) and torch.equal(z_c, z_g.cpu())
    if isinstance(cpu, HistogramObserver):
        assert torch.equal(cpu.histogram, gpu.histogram.cpu())

"""The observer statistics operators torch.ops.qext.{aminmax, histogram, choose_qparams} against
torch's own reductions, a float64 histogram reference, and torch.ao's qparam formulas."""

import numpy as np
import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from qext_testing import DEVICES, FLOAT_DTYPES, LAYOUTS, make_layout

ops = torch.ops.qext
INF = float("inf")


def with_non_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = INF
    flat[5::13] = -INF
    return x


def ref_aminmax(x: torch.Tensor, axis=None):
    x = x.float()
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, torch.full_like(x, INF))
    hi = torch.where(finite, x, torch.full_like(x, -INF))
    if axis is None:
        return lo.amin().reshape(1), hi.amax().reshape(1)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return lo.amin(dim=dims), hi.amax(dim=dims)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "expanded"] + ["broadcast"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_aminmax_matches_torch(device, dtype, layout, axis):
    x = with_non_finite(torch.randn(6, 5, 4, 9) * 3).to(dtype)
    if layout == "broadcast":  # stride-0 dimension
        x = x[:, :, :1].expand(6, 5, 4, 9)
    else:
        x = make_layout(x, layout)
    x = x.to(device)
    lo, hi = ops.aminmax(x, axis)
    ref_lo, ref_hi = ref_aminmax(x.cpu(), axis)
    assert lo.dtype == torch.float32 and lo.device == x.device
    assert torch.equal(lo.cpu(), ref_lo) and torch.equal(hi.cpu(), ref_hi)


@pytest.mark.parametrize("device", DEVICES)
def test_aminmax_channel_without_finite_values(device):
    x = torch.randn(4, 3, device=device)
    x[:, 1] = float("nan")
    lo, hi = ops.aminmax(x, 1)
    assert lo[1].item() == INF and hi[1].item() == -INF
    assert torch.isfinite(lo[[0, 2]]).all()


def ref_histogram(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    v = x.double().cpu().numpy().ravel()
    v = v[np.isfinite(v) & (v >= lo) & (v <= hi)]
    idx = np.minimum(np.floor((v - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    return torch.from_numpy(np.bincount(idx, minlength=bins))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bins", [1, 7, 256, 2048, 10000])
def test_histogram_matches_float64_reference(device, dtype, bins):
    x = with_non_finite(torch.randn(3000) * 2).to(dtype).to(device)
    x[:4] = torch.tensor([-3.0, 3.0, -3.5, 3.5], dtype=dtype)  # on and beyond the edges
    counts = ops.histogram(x, bins, -3.0, 3.0)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_histogram(x, bins, -3.0, 3.0))


def test_histogram_is_deterministic_across_thread_counts():
    x = torch.randn(1 << 18)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.histogram(x, 2048, -4.0, 4.0)
        torch.set_num_threads(max(2, threads))
        many = ops.histogram(x, 2048, -4.0, 4.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype,qscheme", [
    (torch.quint8, torch.per_tensor_affine),
    (torch.qint8, torch.per_tensor_affine),
    (torch.qint8, torch.per_tensor_symmetric),
    (torch.quint8, torch.per_tensor_symmetric),
])
def test_choose_qparams_matches_torch_ao_per_tensor(dtype, qscheme):
    for trial in range(20):
        x = torch.randn(100) * (trial + 1) + (trial - 10) * 0.3
        obs = MinMaxObserver(dtype=dtype, qscheme=qscheme)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        qmin, qmax = (0, 255) if dtype == torch.quint8 else (-128, 127)
        lo, hi = ops.aminmax(x)
        scale, zp = ops.choose_qparams(lo, hi, qmin, qmax, qscheme == torch.per_tensor_symmetric)
        assert torch.equal(scale, ref_scale.float()), (trial, scale, ref_scale)
        assert torch.equal(zp, ref_zp.int()), (trial, zp, ref_zp)


def test_choose_qparams_matches_torch_ao_per_channel():
    x = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 4
    for qscheme, dtype, (qmin, qmax) in [
        (torch.per_channel_symmetric, torch.qint8, (-128, 127)),
        (torch.per_channel_affine, torch.quint8, (0, 255)),
    ]:
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=qscheme)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        lo, hi = ops.aminmax(x, 0)
        scale, zp = ops.choose_qparams(lo, hi, qmin, qmax, qscheme == torch.per_channel_symmetric)
        assert torch.equal(scale, ref_scale.float())
        assert torch.equal(zp, ref_zp.int())


@pytest.mark.parametrize("device", DEVICES)
def test_choose_qparams_keeps_device_and_shape(device):
    lo = torch.tensor([-1.0, 0.5], device=device)
    hi = torch.tensor([2.0, 0.75], device=device)
    scale, zp = ops.choose_qparams(lo, hi, 0, 127, False)
    assert scale.device == lo.device and zp.dtype == torch.int32 and scale.shape == (2,)


def test_meta_shapes():
    x = torch.empty(4, 6, 5, device="meta")
    lo, hi = ops.aminmax(x, 1)
    assert lo.shape == (6,) and lo.device.type == "meta"
    assert ops.histogram(x, 33, -1.0, 1.0).shape == (33,)
    s, z = ops.choose_qparams(lo, hi, 0, 255, False)
    assert s.shape == (6,) and z.dtype == torch.int32


def test_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"aminmax: input is empty \(shape \[0, 4\]\)"):
        ops.aminmax(torch.empty(0, 4))
    with pytest.raises(IndexError, match=r"aminmax: axis 2 is out of range"):
        ops.aminmax(x, 2)
    with pytest.raises(RuntimeError, match=r"aminmax: input must be a floating-point tensor .*, got Int"):
        ops.aminmax(x.int())
    with pytest.raises(ValueError, match=r"histogram: bins must be at least 1, got 0"):
        ops.histogram(x, 0, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"histogram: the range must be finite with min < max, got \[1, 1\]"):
        ops.histogram(x, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"histogram: the range must be finite with min < max, got \[-inf, 1\]"):
        ops.histogram(x, 4, -INF, 1.0)
    lo, hi = ops.aminmax(torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]]), 1)
    with pytest.raises(ValueError, match=r"choose_qparams: the observed range must be finite, got \[inf, -inf\] for channel 0"):
        ops.choose_qparams(lo, hi, 0, 255, False)
    with pytest.raises(ValueError, match=r"choose_qparams: min_val 2 is greater than max_val 1"):
        ops.choose_qparams(torch.tensor([2.0]), torch.tensor([1.0]), 0, 255, False)
    with pytest.raises(ValueError, match=r"choose_qparams: quant_min must be less than quant_max, got quant_min=5 and quant_max=5"):
        ops.choose_qparams(torch.tensor([0.0]), torch.tensor([1.0]), 5, 5, False)
    with pytest.raises(ValueError, match=r"choose_qparams: eps must be finite and positive, got 0"):
        ops.choose_qparams(torch.tensor([0.0]), torch.tensor([1.0]), 0, 255, False, 0.0)


def fresh_state(channels: int, device="cpu"):
    return (torch.full((channels,), INF, device=device), torch.full((channels,), -INF, device=device),
            torch.ones(channels, device=device), torch.zeros(channels, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("averaging", [None, 0.1])
@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quantize_observe_matches_torch_ao_fake_quantize(device, averaging, axis):
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver
    from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver

    if axis is None:
        observer = MinMaxObserver if averaging is None else MovingAverageMinMaxObserver
        kwargs = dict(qscheme=torch.per_tensor_affine)
    else:
        observer = PerChannelMinMaxObserver if averaging is None else MovingAveragePerChannelMinMaxObserver
        kwargs = dict(qscheme=torch.per_channel_affine, ch_axis=axis)
    if averaging is not None:
        kwargs["averaging_constant"] = averaging
    ref = FakeQuantize(observer=observer, quant_min=0, quant_max=255, dtype=torch.quint8, **kwargs).to(device)
    channels = 6 if axis is not None else 1
    state = fresh_state(channels, device)
    for step in range(4):
        base = (torch.randn(5, 6, 3, device=device) * (step + 1) + step * 0.5)
        x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
        y = ops.fake_quantize_observe(x, *state, averaging, 0, 255, False, axis)
        y_ref = ref(x_ref)
        assert torch.equal(y, y_ref), step
        g = torch.randn_like(base)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)
    scale, zp = ref.calculate_qparams()
    assert torch.equal(state[2].cpu(), scale.cpu().float().reshape(-1))
    assert torch.equal(state[3].cpu(), zp.cpu().int().reshape(-1))


def test_fake_quantize_observe_without_observing_uses_frozen_params():
    state = fresh_state(1)
    x = torch.randn(100)
    ops.fake_quantize_observe(x, *state, None, -128, 127, True)
    frozen = [t.clone() for t in state]
    y = ops.fake_quantize_observe(x * 10, *state, None, -128, 127, True, None, False)
    assert all(torch.equal(a, b) for a, b in zip(state, frozen))
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x * 10, frozen[2].item(), 0, -128, 127))


def test_fake_quantize_observe_non_finite_batches():
    state = fresh_state(2)
    x = torch.randn(4, 2)
    x[:, 1] = float("nan")
    with pytest.raises(ValueError, match=r"observed range must be finite, got \[inf, -inf\] for channel 1"):
        ops.fake_quantize_observe(x, *state, 0.1, 0, 255, False, 1)
    # Nothing the caller had was changed by the failed call.
    assert torch.equal(state[0], torch.full((2,), INF)) and torch.equal(state[2], torch.ones(2))
    # After a finite batch, an all-NaN batch leaves the EMA statistics alone.
    ops.fake_quantize_observe(torch.randn(4, 2), *state, 0.1, 0, 255, False, 1)
    before = [t.clone() for t in state]
    ops.fake_quantize_observe(torch.full((4, 2), float("nan")), *state, 0.1, 0, 255, False, 1)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def test_fake_quantize_observe_bad_state():
    state = list(fresh_state(1))
    state[3] = torch.zeros(1)  # float zero point
    with pytest.raises(RuntimeError, match=r"fake_quantize_observe: zero_point must be a Int tensor of 1 element\(s\), got Float"):
        ops.fake_quantize_observe(torch.randn(3), *state, None, 0, 255, False)
    with pytest.raises(ValueError, match=r"averaging_constant must be in \(0, 1\], got 1.5"):
        ops.fake_quantize_observe(torch.randn(3), *fresh_state(1), 1.5, 0, 255, False)


def test_choose_qparams_rejects_range_overflowing_float32():
    with pytest.raises(ValueError, match=r"choose_qparams: the observed range \[-3e\+38, 3e\+38\] is too wide"):
        ops.choose_qparams(torch.tensor([-3e38]), torch.tensor([3e38]), 0, 255, False)

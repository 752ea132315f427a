"""qext.fake_quantize_learnable (LSQ / LSQ+) against torch._fake_quantize_learnable_per_{tensor,channel}_affine
and against the float64 LSQ formulas.

Notes on torch as a reference for the *backward* (its forward is a plain fake_quantize):
- its learnable backward kernels only take float32;
- they round ``zero_point + x * inv_scale`` as one float sum, while the forward (torch's and qext's)
  rounds ``x * inv_scale`` and then adds the zero point: the two differ at exact ties with an odd
  zero point and, for large zero points, near ties. Inputs compared with torch's backward are
  therefore moved off ties (``avoid_ties``);
- the per-tensor backward takes the zero point as ``int(clamp(zero_point + 0.5))`` (truncation
  towards zero), which is not its forward's ``nearbyint`` for negative zero points (e.g. -3.0 -> -2)
  or for exact .5 values, so per-tensor torch comparisons use zero points >= 0 away from .5.
  Negative and .5 zero points are covered by the comparisons with the formulas.
"""

import pytest
import torch

import qext
from qext_testing import (
    DEVICES,
    FLOAT_DTYPES,
    assert_close_sum,
    avoid_ties,
    lsq_grad_formula,
    lsq_surrogate,
    make_layout,
    normalise_axis,
    quant_range,
    random_input,
    random_scale,
    random_zero_point,
    ref_fake_quantize,
    resolve_zero_point,
)


def run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g=None, scale_grad=True, zp_grad=True, x_grad=True):
    xd = x.detach().to(device).requires_grad_(x_grad and g is not None)
    sd = scale.detach().to(device).requires_grad_(scale_grad and g is not None)
    zd = zp.detach().to(device)
    if zp_grad and zd.is_floating_point() and g is not None:
        zd.requires_grad_()
    y = qext.fake_quantize_learnable(xd, sd, zd, qmin, qmax, grad_factor=gf, axis=axis)
    if g is None:
        return y.detach().cpu(), None, None, None
    y.backward(g.to(device))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return y.detach().cpu(), cpu(xd.grad), cpu(sd.grad), cpu(zd.grad)


def run_torch(x, scale, zp, qmin, qmax, gf, axis, g=None):
    xd = x.detach().clone().requires_grad_(g is not None)
    sd = scale.detach().float().reshape(-1).clone().requires_grad_(g is not None)
    zd = zp.detach().float().reshape(-1).clone().requires_grad_(g is not None)
    if scale.numel() == 1:
        y = torch._fake_quantize_learnable_per_tensor_affine(xd, sd, zd, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xd, sd, zd, normalise_axis(axis, x.dim()), qmin, qmax, gf)
    if g is None:
        return y.detach(), None, None, None
    y.backward(g)
    return y.detach(), xd.grad, sd.grad, zd.grad


def learnable_case(seed, per_channel, bits=None, signed=None, nonneg_zp=False, rank=None, max_bits=8, min_rank=None):
    """A random LSQ case. Per-channel ranks start at 2 by default: torch's per-channel learnable
    backward fails on 1-D inputs ("invalid gradient at index 1 - got [] but expected shape
    compatible with [C]"), so 1-D per-channel is only compared with the formulas."""
    gen = torch.Generator().manual_seed(seed)
    if min_rank is None:
        min_rank = 2 if per_channel else 0
    if rank is None:
        rank = int(torch.randint(min_rank, 5, (), generator=gen))
    if bits is None:
        bits = int(torch.randint(2, max_bits + 1, (), generator=gen))
    if signed is None:
        signed = bool(torch.randint(0, 2, (), generator=gen))
    qmin, qmax = quant_range(bits, signed)
    shape = [int(torch.randint(1, 7, (), generator=gen)) for _ in range(rank)]
    axis = None
    n = 1
    if per_channel:
        axis = int(torch.randint(-rank, rank, (), generator=gen))
        shape[normalise_axis(axis, rank)] = max(2, shape[normalise_axis(axis, rank)])
        n = shape[normalise_axis(axis, rank)]
    scale = random_scale(gen, n)
    zp_int = random_zero_point(gen, n, 0 if nonneg_zp else qmin, qmax, symmetric=False)
    # Real-valued zero points: fractional parts (not .5 when nonneg_zp), some outside the range.
    frac = (torch.rand(n, generator=gen) - 0.5) * (0.8 if nonneg_zp else 1.0)
    zp = zp_int.float() + frac
    if not nonneg_zp:
        zp = torch.where(torch.rand(n, generator=gen) < 0.2, zp_int.float() + 0.5, zp)
        zp = torch.where(torch.rand(n, generator=gen) < 0.1, torch.full_like(zp, qmax + 3.7), zp)
        zp = torch.where(torch.rand(n, generator=gen) < 0.1, torch.full_like(zp, qmin - 2.2), zp)
    zr = resolve_zero_point(zp, qmin, qmax)
    x = random_input(gen, shape, scale, zr, qmin, qmax, normalise_axis(axis, rank))
    g = torch.randn(shape, generator=gen)
    gf = float(torch.rand((), generator=gen)) + 0.1
    return x, scale, zp, qmin, qmax, gf, axis, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_forward_matches_torch(seed, per_channel, device):
    x, scale, zp, qmin, qmax, gf, axis, _ = learnable_case(seed, per_channel)
    y, *_ = run_qext(x, scale, zp, qmin, qmax, gf, axis, device)
    yt, *_ = run_torch(x, scale, zp, qmin, qmax, gf, axis)
    assert y.shape == x.shape
    assert torch.equal(y, yt), (x, scale, zp, qmin, qmax, axis)
    # And the zero point is rounded half to even and clamped, exactly like fake_quantize's.
    zr = resolve_zero_point(zp, qmin, qmax).to(torch.int32)
    assert torch.equal(y, qext.fake_quantize(x, scale, zr, qmin, qmax, axis=axis))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_gradients_match_torch(seed, per_channel, device):
    x, scale, zp, qmin, qmax, gf, axis, g = learnable_case(seed, per_channel, nonneg_zp=not per_channel)
    x = avoid_ties(x, scale, axis)
    y, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g)
    yt, dxt, dst, dzt = run_torch(x, scale, zp, qmin, qmax, gf, axis, g)
    assert torch.equal(y, yt)
    assert torch.equal(dx, dxt)
    assert ds.shape == scale.shape and dz.shape == zp.shape
    _, _, _, mag_s, mag_z = lsq_grad_formula(x, g, scale, zp, qmin, qmax, gf, axis)
    assert_close_sum(ds, dst.double(), mag_s, 1e-5, "dscale vs torch")
    assert_close_sum(dz, dzt.double(), mag_z, 1e-5, "dzero_point vs torch")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_match_formula(dtype, per_channel, device):
    """All dtypes, negative and .5 zero points, exact ties: against the LSQ formulas in float64 and
    against torch.autograd through the straight-through surrogate reference."""
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    for seed in range(10):
        x, scale, zp, qmin, qmax, gf, axis, g = learnable_case(50 + seed, per_channel, max_bits=16, min_rank=1 if per_channel else 0)
        x, g = x.to(dtype), g.to(dtype)
        if dtype == torch.float64:
            # float64 parameters (values exact in float32): float64 gradients.
            scale, zp = scale.double(), zp.double()
        y, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g)
        zr = resolve_zero_point(zp, qmin, qmax)
        assert torch.equal(y, ref_fake_quantize(x, scale, zr, qmin, qmax, axis).y)
        dx_f, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x, g, scale, zp, qmin, qmax, gf, axis)
        assert torch.equal(dx, dx_f)
        assert_close_sum(ds, ds_f, mag_s, rtol, f"dscale {dtype}")
        assert_close_sum(dz, dz_f, mag_z, rtol, f"dzero_point {dtype}")
        # The surrogate through torch.autograd agrees with the formulas (to 1e-6 of the magnitude:
        # the surrogate differentiates x / scale, the kernels multiply by a float32 1 / scale).
        xs = x.detach().clone().requires_grad_()
        ss = scale.detach().double().requires_grad_()
        zs = zp.detach().double().requires_grad_()
        ys = lsq_surrogate(xs, ss, zs, qmin, qmax, gf, axis)
        # Same forward value, up to the rounding of the surrogate's detached corrections and of
        # the output dtype.
        vtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(ys.detach(), y.double(), rtol=vtol, atol=vtol * scale.max().item())
        ys.backward(g.double())
        assert torch.equal(xs.grad, dx_f)
        assert_close_sum(ss.grad, ds_f, mag_s, 1e-6, "surrogate dscale")
        assert_close_sum(zs.grad, dz_f, mag_z, 1e-9, "surrogate dzero_point")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_zero_point_symmetric_lsq(per_channel, device):
    """An integer zero point (symmetric LSQ) is not trainable: it gets no gradient, the scale does."""
    for seed in range(4):
        x, scale, zp, qmin, qmax, gf, axis, g = learnable_case(200 + seed, per_channel, nonneg_zp=True)
        zp_int = torch.zeros(scale.shape, dtype=torch.int32)  # symmetric
        x = avoid_ties(x, scale, axis)
        y, dx, ds, dz = run_qext(x, scale, zp_int, qmin, qmax, gf, axis, device, g)
        assert dz is None
        yt, dxt, dst, _ = run_torch(x, scale, zp_int.float(), qmin, qmax, gf, axis, g)
        assert torch.equal(y, yt) and torch.equal(dx, dxt)
        _, ds_f, _, mag_s, _ = lsq_grad_formula(x, g, scale, zp_int, qmin, qmax, gf, axis)
        assert_close_sum(ds, dst.double(), mag_s, 1e-5, "dscale vs torch")
        assert_close_sum(ds, ds_f, mag_s, 1e-5, "dscale vs formula")
    # Python ints work too.
    x = torch.randn(10, device=device, requires_grad=True)
    s = torch.tensor([0.1], device=device, requires_grad=True)
    qext.fake_quantize_learnable(x, s, 0, -8, 7).sum().backward()
    assert s.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_requires_grad_subsets(per_channel, device):
    x, scale, zp, qmin, qmax, gf, axis, g = learnable_case(300, per_channel)
    _, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g)
    # Float zero point without requires_grad: no zero-point gradient, the others unchanged.
    _, dx2, ds2, dz2 = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g, zp_grad=False)
    assert dz2 is None and torch.equal(dx, dx2) and torch.equal(ds, ds2)
    # Only the scale learns (x is a constant, e.g. a frozen weight).
    _, dx3, ds3, dz3 = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g, x_grad=False)
    assert dx3 is None and torch.equal(ds, ds3) and torch.equal(dz, dz3)
    # Only x.
    _, dx4, ds4, dz4 = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g, scale_grad=False, zp_grad=False)
    assert torch.equal(dx, dx4) and ds4 is None and dz4 is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_grad_factor_scales_parameter_gradients(per_channel, device):
    x, scale, zp, qmin, qmax, _, axis, g = learnable_case(400, per_channel)
    _, dx1, ds1, dz1 = run_qext(x, scale, zp, qmin, qmax, 1.0, axis, device, g)
    for gf in (0.25, 1.0 / (x.numel() * qmax) ** 0.5, 3.0):
        _, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, gf, axis, device, g)
        assert torch.equal(dx, dx1)  # the input gradient is not scaled
        torch.testing.assert_close(ds, ds1 * gf, rtol=1e-6, atol=1e-7 * ds1.abs().max().item())
        torch.testing.assert_close(dz, dz1 * gf, rtol=1e-6, atol=1e-7 * dz1.abs().max().item())
    _, _, ds0, dz0 = run_qext(x, scale, zp, qmin, qmax, 0.0, axis, device, g)
    assert (ds0 == 0).all() and (dz0 == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_zero_point_rounding_and_clamping(per_channel, device):
    qmin, qmax = 0, 15
    values = [2.5, 3.5, -0.5, 0.49, 14.5, 15.5, 300.0, -7.3]
    expected = [2, 4, 0, 0, 14, 15, 15, 0]
    x = torch.linspace(-3, 3, 97)
    for v, e in zip(values, expected):
        if per_channel:
            xx = x.reshape(1, -1).expand(2, -1).contiguous()
            s = torch.tensor([0.25, 0.25])
            z = torch.tensor([v, v])
            ze = torch.tensor([e, e], dtype=torch.int32)
            axis = 0
        else:
            xx, s, z, ze, axis = x, torch.tensor([0.25]), torch.tensor([v]), torch.tensor([e], dtype=torch.int32), None
        y, *_ = run_qext(xx, s, z, qmin, qmax, 1.0, axis, device)
        assert torch.equal(y, qext.fake_quantize(xx, s, ze, qmin, qmax, axis=axis)), v
        assert torch.equal(y, run_torch(xx, s, z, qmin, qmax, 1.0, axis)[0]), v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_nan_and_inf_inputs(per_channel, device):
    qmin, qmax = -8, 7
    axis = 0 if per_channel else None
    scale = torch.tensor([0.1, 0.2]) if per_channel else torch.tensor([0.1])
    zp = torch.tensor([1.0, -2.0]) if per_channel else torch.tensor([1.0])
    x = torch.randn(2, 19) * 2
    x[:, 3] = float("nan")
    x[:, 17] = float("nan")
    x[:, 4] = float("inf")
    x[:, 18] = -float("inf")
    g = torch.randn(2, 19)
    y, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, 1.0, axis, device, g)
    assert torch.isnan(y[:, [3, 17]]).all()
    assert torch.isfinite(y[:, [4, 18]]).all()
    assert (dx[:, [3, 4, 17, 18]] == 0).all()
    assert torch.isfinite(ds).all() and torch.isfinite(dz).all()
    dx_f, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x, g, scale, zp, qmin, qmax, 1.0, axis)
    assert torch.equal(dx, dx_f)
    assert_close_sum(ds, ds_f, mag_s, 1e-5)
    assert_close_sum(dz, dz_f, mag_z, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", [([0], None), ([3, 0], None), ([3, 0], 0), ([0, 4], 1), ([], None)])
def test_empty_and_zero_dim(shape, axis, device):
    n = 1 if axis is None else shape[axis]
    x = torch.randn(shape) * 2
    scale = torch.full((n,), 0.3)
    zp = torch.full((n,), 2.0)
    g = torch.randn(shape)
    y, dx, ds, dz = run_qext(x, scale, zp, -8, 7, 1.0, axis, device, g)
    assert y.shape == x.shape and dx.shape == x.shape
    assert ds.shape == scale.shape and dz.shape == zp.shape
    dx_f, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x, g, scale, zp, -8, 7, 1.0, axis)
    assert torch.equal(y, ref_fake_quantize(x, scale, resolve_zero_point(zp, -8, 7), -8, 7, axis).y)
    assert torch.equal(dx, dx_f)
    assert_close_sum(ds, ds_f, mag_s, 1e-5)
    assert_close_sum(dz, dz_f, mag_z, 1e-5)
    # 0-dim scale and zero point (per-tensor) are accepted as well.
    if axis is None:
        y2, _, ds2, dz2 = run_qext(x, scale.reshape(()), zp.reshape(()), -8, 7, 1.0, None, device, g)
        assert torch.equal(y, y2) and ds2.shape == () and dz2.shape == ()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "offset"])
@pytest.mark.parametrize("axis", [None, 1, 3])
def test_layouts(layout, axis, device):
    gen = torch.Generator().manual_seed(9)
    shape = [3, 4, 5, 6]
    n = 1 if axis is None else shape[axis]
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, -8, 7, symmetric=False).float() + 0.2
    base = random_input(gen, shape, scale, resolve_zero_point(zp, -8, 7), -8, 7, axis)
    g = torch.randn(shape, generator=gen)
    ref = run_qext(base, scale, zp, -8, 7, 0.7, axis, device, g)
    x = make_layout(base, layout)
    got = run_qext(x, scale, zp, -8, 7, 0.7, axis, device, make_layout(g, "transposed"))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # The parameter sums may be accumulated in another order: equal up to rounding.
    torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=1e-6)
    if layout == "channels_last":
        y = qext.fake_quantize_learnable(x.to(device), scale.to(device), zp.to(device), -8, 7, axis=axis)
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,axis", [([3, 50001], None), ([3, 50001], 0), ([30000, 7], 1), ([2001, 45], 1), ([4, 300, 19], 1)]
)
def test_large_tensors(shape, axis, device):
    """Several threads, per-thread partial sums, and per-element channels (axis innermost)."""
    gen = torch.Generator().manual_seed(12)
    n = 1 if axis is None else shape[axis]
    qmin, qmax = 0, 255
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, 0, qmax, symmetric=False).float() + 0.25
    x = avoid_ties(random_input(gen, shape, scale, resolve_zero_point(zp, qmin, qmax), qmin, qmax, axis), scale, axis)
    g = torch.randn(shape, generator=gen)
    y, dx, ds, dz = run_qext(x, scale, zp, qmin, qmax, 0.01, axis, device, g)
    yt, dxt, dst, dzt = run_torch(x, scale, zp, qmin, qmax, 0.01, axis, g)
    assert torch.equal(y, yt) and torch.equal(dx, dxt)
    _, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x, g, scale, zp, qmin, qmax, 0.01, axis)
    assert_close_sum(ds, ds_f, mag_s, 1e-5, "dscale vs formula")
    assert_close_sum(dz, dz_f, mag_z, 1e-5, "dzp vs formula")
    assert_close_sum(ds, dst.double(), mag_s, 1e-5, "dscale vs torch")
    assert_close_sum(dz, dzt.double(), mag_z, 1e-5, "dzp vs torch")

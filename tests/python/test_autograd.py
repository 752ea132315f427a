"""Autograd details, gradcheck where it is mathematically valid, meta tensors and torch.compile.

Why plain gradcheck cannot check everything: fake quantization is piecewise constant in x (and in
the zero point, which the forward rounds), so its true derivative is 0 almost everywhere inside the
range, while the straight-through / LSQ gradients are surrogates (1 for x, (x_fq - x) / s for the
scale, -s for the zero point). Finite differences therefore validate only
  - saturated elements (levels beyond the range): dy/dx = 0 and dy/dscale = q_bound - zp exactly;
and the surrogate gradients are checked against float64 references with explicit straight-through
terms (lsq_surrogate / lsq_grad_formula), here and in test_fake_quantize_learnable.py.
"""

import pytest
import torch

import qext
from qext_testing import (
    DEVICES,
    assert_close_sum,
    lsq_grad_formula,
    lsq_surrogate,
    ref_fake_quantize,
    resolve_zero_point,
)


def fq_args(device, per_channel, dtype=torch.float32):
    if per_channel:
        scale = torch.tensor([0.25, 0.125, 0.5], dtype=dtype, device=device)
        zp = torch.tensor([3, -2, 0], dtype=torch.int32, device=device)
        return scale, zp, 1
    return torch.tensor(0.25, dtype=dtype, device=device), torch.tensor(3, dtype=torch.int32, device=device), None


@pytest.mark.parametrize("device", DEVICES)
def test_output_without_requires_grad(device):
    x = torch.randn(4, 3, device=device)
    s, z, _ = fq_args(device, False)
    y = qext.fake_quantize(x, s, z, -8, 7)
    assert not y.requires_grad and y.grad_fn is None
    y = qext.fake_quantize_learnable(x, s, z.float(), -8, 7)
    assert not y.requires_grad and y.grad_fn is None
    # A learnable scale alone makes the output require grad.
    y = qext.fake_quantize_learnable(x, s.clone().requires_grad_(), z.float(), -8, 7)
    assert y.requires_grad
    # fake_quantize has no gradient for its parameters.
    y = qext.fake_quantize(x, s.clone().requires_grad_(), z, -8, 7)
    assert not y.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_mode(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    s, z, _ = fq_args(device, False)
    with torch.no_grad():
        y = qext.fake_quantize(x, s, z, -8, 7)
        y2 = qext.fake_quantize_learnable(x, s.clone().requires_grad_(), z.float().requires_grad_(), -8, 7)
    assert not y.requires_grad and not y2.requires_grad
    assert torch.equal(y, qext.fake_quantize(x.detach(), s, z, -8, 7))
    assert torch.equal(y, y2)
    with torch.inference_mode():
        y3 = qext.fake_quantize(x, s, z, -8, 7)
    assert torch.equal(y3, y)


def _grad_variants(shape, device):
    """Upstream gradients of `shape` in several layouts (all equal to a dense reference)."""
    g = torch.randn(shape, device=device)
    rev = list(range(len(shape)))[::-1]
    yield "contiguous", g, g
    yield "transposed", g.permute(rev).contiguous().permute(rev), g
    big = torch.zeros(list(shape[:-1]) + [2 * shape[-1]], device=device)
    big[..., ::2] = g
    yield "sliced", big[..., ::2], g
    e = torch.randn([1] * (len(shape) - 1) + [shape[-1]], device=device)
    yield "expanded", e.expand(shape), e.expand(shape).contiguous()
    one = torch.ones((), device=device)
    yield "scalar-expanded", one.expand(shape), one.expand(shape).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_noncontiguous_upstream_gradients(x_layout, per_channel, device):
    shape = [2, 3, 5, 9]
    base = torch.randn(shape) * 3
    if x_layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    elif x_layout == "transposed":
        base = base.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    s, z, axis = fq_args("cpu", per_channel)
    ref = ref_fake_quantize(base, s, z, -8, 7, axis)
    for name, g, g_dense in _grad_variants(shape, device):
        x = base.detach().clone().to(device).requires_grad_()
        y = qext.fake_quantize(x, s.to(device), z.to(device), -8, 7, axis=axis)
        y.backward(g)
        assert torch.equal(x.grad.cpu(), torch.where(ref.in_range, g_dense.cpu(), 0.0)), name
        # Learnable: same input gradient, parameter gradients as with the dense upstream gradient.
        grads = []
        for upstream in (g, g_dense):
            x = base.detach().clone().to(device).requires_grad_()
            sl = s.to(device).clone().requires_grad_()
            zl = z.to(device).float().requires_grad_()
            qext.fake_quantize_learnable(x, sl, zl, -8, 7, axis=axis).backward(upstream)
            grads.append((x.grad.cpu(), sl.grad.cpu(), zl.grad.cpu()))
        assert torch.equal(grads[0][0], grads[1][0]), name
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_backward_and_chain(device):
    x = (torch.randn(6, 7, device=device) * 3).requires_grad_()
    s, z, _ = fq_args(device, False)
    y = qext.fake_quantize(x, s, z, -8, 7)
    (y.sum() + (2 * y).pow(2).sum()).backward()
    mask = ref_fake_quantize(x.detach().cpu(), s.cpu(), z.cpu(), -8, 7).in_range
    expected = torch.where(mask, 1 + 8 * y.detach().cpu(), 0.0)
    torch.testing.assert_close(x.grad.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph_and_accumulation(device):
    x = (torch.randn(10, device=device) * 3).requires_grad_()
    s, z, _ = fq_args(device, False)
    sl = s.clone().requires_grad_()
    y = qext.fake_quantize(x, s, z, -8, 7)
    y2 = qext.fake_quantize_learnable(x, sl, z.float(), -8, 7)
    g = torch.randn(10, device=device)
    y.backward(g, retain_graph=True)
    first = x.grad.clone()
    y.backward(g)
    assert torch.equal(x.grad, 2 * first)
    y2.backward(g, retain_graph=True)
    s1 = sl.grad.clone()
    y2.backward(g)
    torch.testing.assert_close(sl.grad, 2 * s1)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_gradients(device):
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(33, 5) * 3).to(dtype)
        g = torch.randn(33, 5).to(dtype)
        xd = x.detach().clone().to(device).requires_grad_()
        qext.fake_quantize(xd, 0.25, 1, -8, 7).backward(g.to(device))
        assert xd.grad.dtype == dtype
        ref = ref_fake_quantize(x, torch.tensor(0.25), torch.tensor(1), -8, 7)
        assert torch.equal(xd.grad.cpu(), torch.where(ref.in_range, g, torch.zeros((), dtype=dtype)))


# --------------------------------------------------------------------------------------------------
# gradcheck on saturated inputs (float64)
# --------------------------------------------------------------------------------------------------


def saturated_input(shape, scale, zp, qmin, qmax, axis, gen):
    """Levels at least 3 steps beyond the range (so +-eps never brings them back), never near a tie."""
    n = torch.randint(0, 2, shape, generator=gen).bool()
    steps = torch.randint(3, 20, shape, generator=gen).double() + 0.25
    level = torch.where(n, qmin - steps, qmax + steps)
    sh = [1] * len(shape)
    if axis is not None:
        sh[axis] = shape[axis]
    s = scale.double().reshape(sh) if axis is not None else scale.double()
    z = zp.double().reshape(sh) if axis is not None else zp.double()
    return (level - z) * s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck_saturated(per_channel, device):
    gen = torch.Generator().manual_seed(4)
    qmin, qmax = -8, 7
    if per_channel:
        # Scales and scale +- eps exactly representable in float32 (the kernels use float32 scales).
        scale = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64)
        zp = torch.tensor([2, -3, 0], dtype=torch.int32)
        axis = 1
    else:
        scale, zp, axis = torch.tensor([0.25], dtype=torch.float64), torch.tensor([2], dtype=torch.int32), None
    shape = [4, 3, 5]
    x = saturated_input(shape, scale, zp, qmin, qmax, axis, gen).detach().clone().to(device).requires_grad_()
    s = scale.detach().clone().to(device).requires_grad_()
    z_int, z_float = zp.to(device), zp.double().to(device)
    eps = 2.0**-12

    def fq(x):
        return qext.fake_quantize(x, s.detach(), z_int, qmin, qmax, axis=axis)

    assert torch.autograd.gradcheck(fq, (x,), eps=eps, atol=1e-9, rtol=1e-7)

    def lsq(x, s):
        # grad_factor 1: gradients are the true derivatives on saturated inputs. The zero point is
        # not checked here: the forward rounds it, so its finite-difference derivative is 0 while
        # LSQ+ uses -scale (checked against the surrogate reference instead).
        return qext.fake_quantize_learnable(x, s, z_float, qmin, qmax, grad_factor=1.0, axis=axis)

    assert torch.autograd.gradcheck(lsq, (x, s), eps=eps, atol=1e-9, rtol=1e-7)
    # And the analytic values: dscale = sum(g * (q_bound - zp)), dzero_point = -sum(g) * scale.
    zl = z_float.clone().requires_grad_()
    y = qext.fake_quantize_learnable(x, s, zl, qmin, qmax, axis=axis)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    dx, ds, dz = torch.autograd.grad(y, (x, s, zl), g)
    assert (dx == 0).all()
    _, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x.detach().cpu(), g.cpu(), scale, zp.double(), qmin, qmax, 1.0, axis)
    assert_close_sum(ds, ds_f, mag_s, 1e-12)
    assert_close_sum(dz, dz_f, mag_z, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grad_factor", [1.0, 0.3])
def test_float64_in_range_against_surrogate(per_channel, grad_factor, device):
    """float64: in-range inputs only, then saturated only, then mixed; qext's analytic gradients vs
    torch.autograd through the straight-through surrogate and vs the explicit formulas."""
    gen = torch.Generator().manual_seed(8)
    qmin, qmax = -8, 7
    if per_channel:
        scale = torch.tensor([0.25, 0.1, 0.3], dtype=torch.float32).double()
        zp = torch.tensor([2.3, -3.0, 0.5], dtype=torch.float64)
        axis = 1
    else:
        scale, zp, axis = torch.tensor([0.1], dtype=torch.float32).double(), torch.tensor([2.3], dtype=torch.float64), None
    shape = [5, 3, 4]
    zr = resolve_zero_point(zp, qmin, qmax)
    sh = [1, 3, 1] if axis is not None else [1, 1, 1]
    s_b = scale.reshape(sh) if axis is not None else scale
    z_b = zr.reshape(sh) if axis is not None else zr
    inside = (qmin + (qmax - qmin) * torch.rand(shape, generator=gen, dtype=torch.float64) - z_b) * s_b
    outside = saturated_input(shape, scale, zr.to(torch.int32), qmin, qmax, axis, gen)
    mixed = torch.where(torch.rand(shape, generator=gen) < 0.5, inside, outside)
    for name, x0 in (("inside", inside), ("outside", outside), ("mixed", mixed)):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = x0.detach().clone().to(device).requires_grad_()
        s = scale.detach().clone().to(device).requires_grad_()
        z = zp.detach().clone().to(device).requires_grad_()
        y = qext.fake_quantize_learnable(x, s, z, qmin, qmax, grad_factor=grad_factor, axis=axis)
        dx, ds, dz = (t.cpu() for t in torch.autograd.grad(y, (x, s, z), g.to(device)))
        xr, sr, zr_ = x0.clone().requires_grad_(), scale.clone().requires_grad_(), zp.clone().requires_grad_()
        yr = lsq_surrogate(xr, sr, zr_, qmin, qmax, grad_factor, axis)
        torch.testing.assert_close(y.detach().cpu(), yr.detach(), rtol=1e-12, atol=1e-12)
        dxr, dsr, dzr = torch.autograd.grad(yr, (xr, sr, zr_), g)
        dx_f, ds_f, dz_f, mag_s, mag_z = lsq_grad_formula(x0, g, scale, zp, qmin, qmax, grad_factor, axis)
        assert torch.equal(dx, dxr) and torch.equal(dx, dx_f), name
        if name == "inside":
            assert torch.equal(dx, g), (dx - g)[dx != g]
            assert (dz == 0).all(), dz
        assert_close_sum(ds, ds_f, mag_s, 1e-12, f"{name} dscale vs formula")
        assert_close_sum(dz, dz_f, mag_z, 1e-12, f"{name} dzp vs formula")
        # The surrogate divides by the float64 scale, the kernels multiply by float32 1 / scale.
        assert_close_sum(ds, dsr, mag_s, 1e-6, f"{name} dscale vs surrogate")
        assert_close_sum(dz, dzr, mag_z, 1e-12, f"{name} dzp vs surrogate")
        # The straight-through fake_quantize: dx = g where in range.
        xf = x0.detach().clone().to(device).requires_grad_()
        yf = qext.fake_quantize(xf, scale.to(device), zr.to(torch.int32).to(device), qmin, qmax, axis=axis)
        (dxf,) = torch.autograd.grad(yf, (xf,), g.to(device))
        assert torch.equal(dxf.cpu(), dx_f), name


# --------------------------------------------------------------------------------------------------
# Meta tensors and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_meta_tensors(per_channel):
    x = torch.randn(2, 3, 4, 5)
    s, z, axis = fq_args("cpu", per_channel)
    xm, sm, zm = x.to("meta"), s.to("meta"), z.to("meta")
    y = torch.ops.qext.fake_quantize(xm, sm, zm, -8, 7, axis)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    y = torch.ops.qext.fake_quantize(xm.to(torch.float64), sm, zm, -8, 7, axis)
    assert y.dtype == torch.float64
    y = qext.fake_quantize(xm.contiguous(memory_format=torch.channels_last), sm, zm, -8, 7, axis=axis)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    y = torch.ops.qext.fake_quantize_learnable(xm, sm, zm.float(), -8, 7, 0.5, axis)
    assert y.device.type == "meta" and y.shape == x.shape
    q = torch.ops.qext.quantize(xm, sm, zm, -8, 7, axis, None)
    assert q.device.type == "meta" and q.shape == x.shape and q.dtype == torch.int8
    q = torch.ops.qext.quantize(xm, sm, zm, -8, 7, axis, torch.int32)
    assert q.dtype == torch.int32
    d = torch.ops.qext.dequantize(q, sm, zm, axis, None)
    assert d.device.type == "meta" and d.shape == x.shape and d.dtype == torch.float32
    d = qext.dequantize(q, sm, zm, axis=axis, dtype=torch.float16)
    assert d.dtype == torch.float16
    # Autograd through meta tensors (shapes only).
    xg = torch.empty(2, 3, 4, 5, device="meta", requires_grad=True)
    sg = sm.clone().requires_grad_()
    zg = zm.float().requires_grad_()
    qext.fake_quantize(xg, sm, zm, -8, 7, axis=axis).sum().backward()
    assert xg.grad.shape == xg.shape and xg.grad.device.type == "meta"
    xg.grad = None
    qext.fake_quantize_learnable(xg, sg, zg, -8, 7, axis=axis).sum().backward()
    assert xg.grad.shape == xg.shape and sg.grad.shape == sg.shape and zg.grad.shape == zg.shape


def test_meta_checks_signature():
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"scale has 4 elements \(per-channel\) but no axis"):
        torch.ops.qext.fake_quantize(x, torch.ones(4, device="meta"), torch.zeros(4, dtype=torch.int32, device="meta"), 0, 255, None)
    with pytest.raises(ValueError, match=r"scale and zero_point have 4 elements but input has 3 channels along axis 1"):
        torch.ops.qext.fake_quantize(x, torch.ones(4, device="meta"), torch.zeros(4, dtype=torch.int32, device="meta"), 0, 255, 1)
    with pytest.raises(ValueError, match=r"quant_min must be less than quant_max, got quant_min=5 and quant_max=5"):
        torch.ops.qext.fake_quantize(x, torch.ones((), device="meta"), torch.zeros((), dtype=torch.int32, device="meta"), 5, 5, None)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_aot_eager(device, fresh_dynamo):
    """torch.compile (aot_eager backend: dynamo + AOTAutograd over the Meta kernels; inductor's
    C++ compilation is too slow for this suite) gives the eager values and gradients."""
    x = (torch.randn(6, 8, device=device) * 2).requires_grad_()
    s = torch.rand(8, device=device) * 0.2 + 0.05
    z = torch.randint(-8, 8, (8,), dtype=torch.int32, device=device)

    def f(x, s, z):
        return (qext.fake_quantize(x, s, z, -8, 7, axis=1) * 3).sin()

    def g(x, s, z):
        return qext.fake_quantize_learnable(x * 2, s, z, -8, 7, grad_factor=0.5, axis=1).sum(0)

    for fn, params in ((f, (s, z)), (g, (s.clone().requires_grad_(), z.float().requires_grad_()))):
        eager_in = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        comp_in = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        ye = fn(*eager_in)
        yc = torch.compile(fn, backend="aot_eager", fullgraph=True)(*comp_in)
        assert torch.equal(ye, yc)
        gr = torch.randn(ye.shape, device=device)
        ye.backward(gr)
        yc.backward(gr)
        for a, b in zip(eager_in, comp_in):
            if a.requires_grad:
                assert torch.equal(a.grad, b.grad)

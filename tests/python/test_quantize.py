"""qext.quantize / qext.dequantize against torch.quantize_per_{tensor,channel} (int_repr) and
torch's dequantize, and the round trip dequantize(quantize(x)) == fake_quantize(x)."""

import pytest
import torch

import qext
from qext_testing import (
    DEVICES,
    FLOAT_DTYPES,
    LAYOUTS,
    make_expanded,
    make_layout,
    normalise_axis,
    param_view,
    quant_range,
    random_case,
    random_input,
    random_scale,
    random_zero_point,
    ref_fake_quantize,
)


def default_storage(qmin, qmax):
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def torch_quantize(x, scale, zp, qmin, qmax, axis):
    """torch's integer representation, clamped to [qmin, qmax] (torch only knows full 8/32-bit
    ranges; clamping after its own clamp to the wider range is the same as clamping once)."""
    if qmin >= 0 and qmax <= 255:
        qdtype = torch.quint8
    elif qmin >= -128 and qmax <= 127:
        qdtype = torch.qint8
    else:
        qdtype = torch.qint32
    if scale.numel() == 1:
        q = torch.quantize_per_tensor(x, float(scale.reshape(())), int(zp.reshape(())), qdtype)
    else:
        q = torch.quantize_per_channel(
            x, scale.double(), zp.long(), normalise_axis(axis, x.dim()), qdtype
        )
    return q.int_repr().to(torch.int64).clamp(qmin, qmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(100))
def test_random_cases_match_torch(seed, device):
    case = random_case(500 + seed, max_numel=2000)
    axis = normalise_axis(case.axis, len(case.shape))
    gen = torch.Generator().manual_seed(seed)
    x = random_input(gen, case.shape, case.scale, case.zero_point, case.qmin, case.qmax, axis)
    q = qext.quantize(x.to(device), case.scale.to(device), case.zero_point.to(device), case.qmin, case.qmax,
                      axis=case.axis).cpu()
    assert q.dtype == default_storage(case.qmin, case.qmax), case
    assert q.shape == x.shape
    expected = torch_quantize(x, case.scale, case.zero_point, case.qmin, case.qmax, case.axis)
    bad = q.to(torch.int64) != expected
    assert not bad.any(), (
        f"{case}: x={x[bad][:5].tolist()} qext={q[bad][:5].tolist()} torch={expected[bad][:5].tolist()}"
    )
    # Round trip.
    d = qext.dequantize(q.to(device), case.scale.to(device), case.zero_point.to(device), axis=case.axis).cpu()
    assert d.dtype == torch.float32
    assert torch.equal(d, qext.fake_quantize(x, case.scale, case.zero_point, case.qmin, case.qmax, axis=case.axis))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 2, -1])
def test_round_trip_equals_fake_quantize(dtype, axis, device):
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        bits = [2, 4, 8, 12, 16][seed % 5] if seed else 8
        qmin, qmax = quant_range(bits, signed=bool(seed % 2))
        shape = [3, 4, 5]
        n = 1 if axis is None else shape[axis]
        scale = random_scale(gen, n)
        zp = random_zero_point(gen, n, qmin, qmax, symmetric=False)
        x = random_input(gen, shape, scale, zp, qmin, qmax, normalise_axis(axis, 3), dtype=dtype)
        x[0, 0, 0] = float("inf")
        x[1, 1, 1] = -float("inf")
        xd, sd, zd = x.to(device), scale.to(device), zp.to(device)
        q = qext.quantize(xd, sd, zd, qmin, qmax, axis=axis)
        assert q.dtype == default_storage(qmin, qmax)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
        assert int(q[0, 0, 0]) == qmax and int(q[1, 1, 1]) == qmin
        level = ref_fake_quantize(x, scale, zp, qmin, qmax, axis).level
        assert torch.equal(q.cpu().to(torch.float64), level.clamp(qmin, qmax).double())
        d = qext.dequantize(q, sd, zd, axis=axis, dtype=dtype)
        assert d.dtype == dtype
        assert torch.equal(d.cpu(), qext.fake_quantize(x, scale, zp, qmin, qmax, axis=axis)), (dtype, axis, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "qmin,qmax,expected",
    [
        (0, 255, torch.uint8), (0, 15, torch.uint8), (0, 1, torch.uint8), (3, 200, torch.uint8),
        (-128, 127, torch.int8), (-8, 7, torch.int8), (-1, 0, torch.int8), (-128, 0, torch.int8),
        (0, 256, torch.int32), (-129, 127, torch.int32), (-128, 128, torch.int32), (-1, 255, torch.int32),
        (-32768, 32767, torch.int32), (0, 65535, torch.int32), (-65536, -1, torch.int32),
    ],
)
def test_default_storage_dtype(qmin, qmax, expected, device):
    x = torch.linspace(-3, 3, 11, device=device)
    zp = max(qmin, min(qmax, 0))
    q = qext.quantize(x, 0.01, zp, qmin, qmax)
    assert q.dtype == expected
    assert torch.equal(qext.dequantize(q, 0.01, zp), qext.fake_quantize(x, 0.01, zp, qmin, qmax))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "qmin,qmax,dtype",
    [(0, 255, torch.int32), (-8, 7, torch.int32), (0, 15, torch.int8), (-8, 7, torch.int8),
     (0, 100, torch.uint8), (-100, 100, torch.int8)],
)
def test_explicit_storage_dtype(qmin, qmax, dtype, device):
    gen = torch.Generator().manual_seed(qmin + qmax)
    x = torch.randn(50, generator=gen).to(device) * 2
    zp = max(qmin, min(qmax, 3))
    q = qext.quantize(x, 0.05, zp, qmin, qmax, dtype=dtype)
    assert q.dtype == dtype
    q_default = qext.quantize(x, 0.05, zp, qmin, qmax)
    assert torch.equal(q.to(torch.int64), q_default.to(torch.int64))
    assert torch.equal(qext.dequantize(q, 0.05, zp), qext.fake_quantize(x, 0.05, zp, qmin, qmax))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.int32])
def test_dequantize_matches_torch(per_channel, storage, device):
    gen = torch.Generator().manual_seed(21)
    qmin, qmax = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-1000, 1000)}[storage]
    qdtype = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}[storage]
    shape = [4, 6, 33]
    q = torch.randint(qmin, qmax + 1, shape, generator=gen).to(storage)
    if per_channel:
        scale = random_scale(gen, 6)
        zp = random_zero_point(gen, 6, qmin, qmax, symmetric=False)
        tq = torch._make_per_channel_quantized_tensor(q, scale.double(), zp.long(), 1)
        d = qext.dequantize(q.to(device), scale.to(device), zp.to(device), axis=1).cpu()
    else:
        scale = random_scale(gen, 1)
        zp = random_zero_point(gen, 1, qmin, qmax, symmetric=False)
        tq = torch._make_per_tensor_quantized_tensor(q, float(scale), int(zp))
        d = qext.dequantize(q.to(device), scale.to(device), zp.to(device)).cpu()
    assert tq.dtype == qdtype
    expected = tq.dequantize()
    # qext computes (q - zp) * scale in float32, the formula of fake_quantize. torch's vectorised
    # dequantize may fuse it into q * scale + (-zp * scale), so allow one float32 rounding step.
    s = scale.reshape(1, -1, 1) if per_channel else scale
    exact = (q.to(torch.float32) - (zp.reshape(1, -1, 1) if per_channel else zp).to(torch.float32)) * s
    assert torch.equal(d, exact)
    torch.testing.assert_close(d, expected, rtol=2e-7, atol=1e-6 * float(scale.max()))
    for dtype in FLOAT_DTYPES:
        dd = qext.dequantize(q.to(device), scale.to(device), zp.to(device), axis=1 if per_channel else None, dtype=dtype)
        assert dd.dtype == dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        sz = (zp.reshape(1, -1, 1) if per_channel else zp).to(acc)
        assert torch.equal(dd.cpu(), ((q.to(acc) - sz) * s.to(acc)).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [None, 1, 3])
def test_layouts(layout, axis, device):
    gen = torch.Generator().manual_seed(17)
    shape = [3, 5, 4, 6]
    n = 1 if axis is None else shape[axis]
    qmin, qmax = -128, 127
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, qmin, qmax, symmetric=False)
    if layout == "expanded":
        x = make_expanded(gen, shape, 2)
    else:
        x = make_layout(random_input(gen, shape, scale, zp, qmin, qmax, axis), layout)
    q = qext.quantize(x.to(device), scale.to(device), zp.to(device), qmin, qmax, axis=axis)
    expected = torch_quantize(x.contiguous(), scale, zp, qmin, qmax, axis)
    assert torch.equal(q.cpu().to(torch.int64), expected)
    if layout == "channels_last":
        assert q.is_contiguous(memory_format=torch.channels_last)
    qq = make_layout(q.cpu(), "transposed" if layout != "channels_last" else "channels_last").to(device)
    d = qext.dequantize(qq, scale.to(device), zp.to(device), axis=axis)
    assert torch.equal(d.cpu(), qext.fake_quantize(x.contiguous(), scale, zp, qmin, qmax, axis=axis))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [[], [0], [2, 0, 3], [1]])
def test_empty_and_zero_dim(shape, device):
    x = torch.randn(shape, device=device) * 3
    q = qext.quantize(x, 0.1, 5, 0, 15)
    assert q.shape == x.shape and q.dtype == torch.uint8
    d = qext.dequantize(q, 0.1, 5)
    assert d.shape == x.shape
    assert torch.equal(d, qext.fake_quantize(x, 0.1, 5, 0, 15))
    if len(shape) == 3:
        s = torch.full((3,), 0.1, device=device)
        z = torch.zeros(3, dtype=torch.int32, device=device)
        q = qext.quantize(x, s, z, -8, 7, axis=2)
        assert q.shape == x.shape and q.dtype == torch.int8
        assert qext.dequantize(q, s, z, axis=-1).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_nan_raises(dtype, device):
    for n in (1, 7, 70000):  # scalar tail, SIMD body, several threads
        x = torch.randn(n).to(dtype)
        x[n // 2] = float("nan")
        x = x.to(device)
        before = x.clone()
        with pytest.raises(ValueError, match=r"quantize: input contains NaN"):
            qext.quantize(x, 0.1, 0, -8, 7)
        with pytest.raises(ValueError, match=r"quantize: input contains NaN"):
            qext.quantize(x.reshape(1, -1).expand(2, -1), torch.tensor([0.1, 0.2], device=device),
                          torch.tensor([0, 1], device=device), -8, 7, axis=0)
        assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_saturates_infinities_and_huge_values(device):
    x = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, 3.4e38, -3.4e38], device=device)
    q = qext.quantize(x, 0.1, 3, -8, 7)
    assert q.tolist() == [7, -8, 7, -8, 7, -8]
    q = qext.quantize(x, 0.1, 3, -30000, 30000)
    assert q.dtype == torch.int32 and q.tolist() == [30000, -30000] * 3
    # torch agrees on the finite ones.
    xf = x[2:].cpu()
    assert torch.equal(qext.quantize(xf, 0.1, 3, -8, 7).to(torch.int64), torch_quantize(xf, torch.tensor(0.1), torch.tensor(3), -8, 7, None))


@pytest.mark.parametrize("device", DEVICES)
def test_functional_is_the_operator(device):
    x = torch.randn(4, 5, device=device)
    s = torch.rand(5, device=device) + 0.01
    z = torch.randint(-8, 8, (5,), dtype=torch.int32, device=device)
    q = torch.ops.qext.quantize(x, s, z, -8, 7, 1, None)
    assert torch.equal(qext.quantize(x, s, z, -8, 7, axis=1), q)
    assert torch.equal(qext.dequantize(q, s, z, axis=1), torch.ops.qext.dequantize(q, s, z, 1, None))


def formula_quantize(x, scale, zp, qmin, qmax, axis):
    """The documented formula in float64, independent of the kernels: the float32 product
    x * (1 / scale) (exact in float64, then rounded to float32), rounded half to even, plus the zero
    point, clamped; +-inf saturate."""
    inv = (1.0 / scale.to(torch.float32)).to(torch.float64)
    if axis is not None:
        inv, zp = param_view(inv, x, axis), param_view(zp, x, axis)
    product = (x.to(torch.float64) * inv).to(torch.float32).to(torch.float64)
    return (torch.round(product) + zp.to(torch.float64)).clamp(qmin, qmax).to(torch.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [None, -1, 0])
@pytest.mark.parametrize(
    "qmin,qmax", [(0, 255), (-128, 127), (0, 15), (-8, 7), (-32768, 32767), (0, 65535), (-1000, 3000)]
)
def test_float32_matches_float64_formula(qmin, qmax, axis, device):
    """Every storage dtype, lengths around the 8-wide SIMD blocks and over several threads' chunks,
    exact ties (power-of-two scales make x * (1 / scale) = k + 0.5 exact), -0.0, +-inf, values far outside
    the range; per-channel along the innermost axis (one quantizer per element) and the outermost."""
    gen = torch.Generator().manual_seed(qmax - qmin)
    span = qmax - qmin
    for n in (1, 7, 8, 9, 31, 100003):
        shape = [3, n]
        channels = 1 if axis is None else shape[axis]
        scale = 2.0 ** torch.randint(-8, 2, (channels,), generator=gen).to(torch.float32)
        zp = torch.randint(qmin, qmax + 1, (channels,), generator=gen, dtype=torch.int32)
        view_scale = scale if axis is None else param_view(scale, torch.empty(shape), axis)
        levels = torch.randint(-span, span, shape, generator=gen).to(torch.float32)
        x = (levels + 0.5) * view_scale  # ties
        random = torch.randn(shape, generator=gen) * span * view_scale
        pick = torch.rand(shape, generator=gen)
        x = torch.where(pick < 0.5, random, x)
        flat = x.view(-1)
        flat[::97] = -0.0
        flat[5::101] = float("inf")
        flat[7::103] = -float("inf")
        flat[11::89] = 1e30
        q = qext.quantize(x.to(device), scale.to(device), zp.to(device), qmin, qmax, axis=axis).cpu()
        assert q.dtype == default_storage(qmin, qmax)
        expected = formula_quantize(x, scale, zp, qmin, qmax, axis)
        bad = q.to(torch.int64) != expected
        assert not bad.any(), (
            f"n={n}: x={x[bad][:5].tolist()} qext={q[bad][:5].tolist()} ref={expected[bad][:5].tolist()}"
        )
        d = qext.dequantize(q.to(device), scale.to(device), zp.to(device), axis=axis).cpu()
        zv = zp if axis is None else param_view(zp, x, axis)
        assert torch.equal(d, (q.to(torch.float32) - zv.to(torch.float32)) * view_scale)


@pytest.mark.parametrize("shape", [[1, 10], [64, 10], [8, 16, 14, 14]])
@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8, torch.qint32])
def test_quantize_dequantize_modules(shape, qdtype):
    """Quantize / DeQuantize and the helpers behind them are the operators: (small inputs copy the levels,
    large ones view them; non-contiguous inputs too)."""
    from qext.nn import _utils
    from qext.nn.quantized.modules import DeQuantize, Quantize

    gen = torch.Generator().manual_seed(len(shape))
    qmin, qmax = {torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-1000, 1000)}[qdtype]
    x = torch.randn(shape, generator=gen) * 3
    scale, zp = torch.tensor([0.037]), torch.tensor([max(qmin, 5)], dtype=torch.int32)
    xq = Quantize(scale, zp, qmin, qmax)(x)
    assert xq.dtype == qdtype and xq.q_scale() == float(scale) and xq.q_zero_point() == int(zp)
    assert torch.equal(xq.int_repr().to(torch.int64), qext.quantize(x, scale, zp, qmin, qmax).to(torch.int64))
    for y in (xq, xq.transpose(0, -1)):
        expected = qext.dequantize(y.int_repr(), scale, zp)
        assert torch.equal(_utils.dequantize_any(y), expected)
        assert torch.equal(DeQuantize()(y), expected)
    # A quantized input is requantized; a float input passes DeQuantize unchanged.
    assert torch.equal(Quantize(scale * 2, zp, qmin, qmax)(xq).int_repr(),
                       qext.quantize(DeQuantize()(xq), scale * 2, zp, qmin, qmax))
    assert DeQuantize()(x) is x


# ------------------------------------------------------------------------------------------------
# quantize_per_tensor / dequantize_per_tensor: the same numerics, as PyTorch quantized tensors (CPU)
# ------------------------------------------------------------------------------------------------

QTENSOR_OF_STORAGE = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (4, False), (4, True), (7, False), (16, True), (16, False)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_per_tensor_is_quantize_as_a_qtensor(layout, bits, signed, dtype):
    gen = torch.Generator().manual_seed(bits * 10 + signed)
    qmin, qmax = quant_range(bits, signed)
    scale = random_scale(gen, 1)
    zp = random_zero_point(gen, 1, qmin, qmax, symmetric=False)
    if layout == "expanded":
        x = make_expanded(gen, [2, 3, 5, 7], 2).to(dtype)
    else:
        x = make_layout(random_input(gen, [2, 3, 5, 7], scale, zp, qmin, qmax, None).to(dtype), layout)
    before = x.clone()
    q = torch.ops.qext.quantize_per_tensor(x, float(scale), int(zp), qmin, qmax)
    levels = qext.quantize(x, scale, zp, qmin, qmax)
    assert q.is_quantized and q.qscheme() == torch.per_tensor_affine
    assert q.dtype == QTENSOR_OF_STORAGE[default_storage(qmin, qmax)]
    assert q.q_scale() == float(scale.to(torch.float32)) and q.q_zero_point() == int(zp)
    assert torch.equal(q.int_repr(), levels.contiguous())
    assert q.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert torch.equal(x, before)
    # and back: qext.dequantize of the levels, torch's dequantize where torch's arithmetic is the same
    d = torch.ops.qext.dequantize_per_tensor(q)
    assert d.dtype == torch.float32 and d.stride() == q.stride()
    assert torch.equal(d, qext.dequantize(levels, scale, zp))
    assert torch.equal(d, q.dequantize())


@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8])
def test_quantize_per_tensor_matches_torch_on_full_byte_ranges(qdtype):
    gen = torch.Generator().manual_seed(5)
    qmin, qmax = (0, 255) if qdtype == torch.quint8 else (-128, 127)
    for _ in range(20):
        scale = random_scale(gen, 1)
        zp = random_zero_point(gen, 1, qmin, qmax, symmetric=False)
        x = random_input(gen, [4, 33], scale, zp, qmin, qmax, None)
        q = torch.ops.qext.quantize_per_tensor(x, float(scale), int(zp), qmin, qmax)
        want = torch.quantize_per_tensor(x, float(scale), int(zp), qdtype)
        assert torch.equal(q.int_repr(), want.int_repr())


@pytest.mark.parametrize("shape", [[], [0], [2, 0, 3], [1], [70001]])
def test_quantize_per_tensor_shapes(shape):
    x = torch.randn(shape) * 3
    q = torch.ops.qext.quantize_per_tensor(x, 0.1, 5, 0, 15)
    assert q.shape == x.shape and q.dtype == torch.quint8
    assert torch.equal(q.int_repr(), qext.quantize(x, 0.1, 5, 0, 15))
    assert torch.equal(torch.ops.qext.dequantize_per_tensor(q), qext.fake_quantize(x, 0.1, 5, 0, 15))


def test_per_tensor_functionals_are_the_operators():
    x = torch.randn(4, 5)
    q = torch.ops.qext.quantize_per_tensor(x, 0.05, 3, -8, 7)
    got = qext.quantize_per_tensor(x, 0.05, 3, -8, 7)
    assert got.dtype == q.dtype == torch.qint8 and torch.equal(got.int_repr(), q.int_repr())
    assert torch.equal(qext.dequantize_per_tensor(q), torch.ops.qext.dequantize_per_tensor(q))


def test_dequantize_per_tensor_reads_torch_qtensors():
    x = torch.randn(3, 4, 5, 6) * 4
    for q in (torch.quantize_per_tensor(x, 0.05, 100, torch.quint8),
              torch.quantize_per_tensor(x, 0.05, -7, torch.qint8),
              torch.quantize_per_tensor(x, 0.002, 1000, torch.qint32),
              torch.quantize_per_tensor(x, 0.05, 3, torch.quint8).contiguous(memory_format=torch.channels_last),
              torch.quantize_per_tensor(x, 0.05, 3, torch.quint8).transpose(1, 3)):
        d = torch.ops.qext.dequantize_per_tensor(q)
        levels = q.int_repr()
        want = qext.dequantize(levels, torch.tensor([q.q_scale()]), torch.tensor([q.q_zero_point()]))
        assert torch.equal(d, want) and torch.equal(d, q.dequantize())

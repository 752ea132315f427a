"""qext.fake_quantize against torch.fake_quantize_per_{tensor,channel}_affine (bit-exact forward and
straight-through gradient) and against the plain-torch reference of fake_quantize_ref.h."""

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
    quant_range,
    random_case,
    random_input,
    random_scale,
    random_zero_point,
    ref_fake_quantize,
    torch_fake_quantize,
)


def run_qext(x, scale, zp, qmin, qmax, axis, device, grad=None):
    """Forward (and backward with `grad`) of qext.fake_quantize on `device`; results on the CPU."""
    xd = x.detach().to(device).requires_grad_(grad is not None)
    y = qext.fake_quantize(xd, scale.to(device), zp.to(device), qmin, qmax, axis=axis)
    dx = None
    if grad is not None:
        y.backward(grad.to(device))
        dx = xd.grad.cpu()
    return y.detach().cpu(), dx


def run_torch(x, scale, zp, qmin, qmax, axis, grad=None):
    xd = x.detach().clone().requires_grad_(grad is not None)
    y = torch_fake_quantize(xd, scale, zp, qmin, qmax, axis)
    dx = None
    if grad is not None:
        y.backward(grad)
        dx = xd.grad
    return y.detach(), dx


def check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=""):
    """qext on `device` vs the plain-torch reference and torch's own op: bit-exact values and
    straight-through gradients, same shape and dtype."""
    g = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y, dx = run_qext(x, scale, zp, qmin, qmax, axis, device, grad=g)
    assert y.shape == x.shape and y.dtype == x.dtype, what
    ref = ref_fake_quantize(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(y, ref.y), f"{what}: differs from the reference at {(y != ref.y).nonzero()[:5].tolist()}"
    assert torch.equal(dx, torch.where(ref.in_range, g, torch.zeros_like(g))), what
    yt, dxt = run_torch(x, scale, zp, qmin, qmax, axis, grad=g)
    bad = y != yt
    assert not bad.any(), (
        f"{what}: forward differs from torch at {bad.nonzero()[:5].tolist()}: "
        f"x={x[bad][:5].tolist()} qext={y[bad][:5].tolist()} torch={yt[bad][:5].tolist()}"
    )
    assert torch.equal(dx, dxt), f"{what}: gradient differs from torch"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(150))
def test_random_cases_match_torch(seed, device):
    """Random rank (0..5, with empty and size-1 dims), bit width (2..16), signedness, symmetric or
    affine, per-tensor or per-channel along a random (possibly negative) axis, and memory layout."""
    case = random_case(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    x = random_input(gen, case.shape, case.scale, case.zero_point, case.qmin, case.qmax, normalise_axis(case.axis, len(case.shape)))
    layouts = ["contiguous", "transposed", "sliced", "offset"] + (["channels_last"] if x.dim() == 4 else [])
    layout = layouts[seed % len(layouts)]
    x = make_layout(x, layout)
    check_against_torch(x, case.scale, case.zero_point, case.qmin, case.qmax, case.axis, device,
                        what=f"{case} layout={layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_dtypes_match_torch(dtype, per_channel, device):
    for seed in range(8):
        case = random_case(100 + seed, rank=3, per_channel=per_channel)
        gen = torch.Generator().manual_seed(seed)
        x = random_input(gen, case.shape, case.scale, case.zero_point, case.qmin, case.qmax,
                         normalise_axis(case.axis, 3), dtype=dtype)
        check_against_torch(x, case.scale, case.zero_point, case.qmin, case.qmax, case.axis, device,
                            what=f"{dtype} {case}")


AXES = [(rank, axis) for rank in range(1, 6) for axis in range(-rank, rank)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank,axis", AXES)
def test_every_axis(rank, axis, device):
    gen = torch.Generator().manual_seed(rank * 10 + axis)
    shape = [2, 3, 4, 5, 3][:rank]
    ax = normalise_axis(axis, rank)
    for signed in (False, True):
        qmin, qmax = quant_range(8, signed)
        scale = random_scale(gen, shape[ax])
        zp = random_zero_point(gen, shape[ax], qmin, qmax, symmetric=False)
        x = random_input(gen, shape, scale, zp, qmin, qmax, ax)
        check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=f"rank={rank} axis={axis}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bit_widths(bits, signed, symmetric, device):
    gen = torch.Generator().manual_seed(bits * 4 + 2 * signed + symmetric)
    qmin, qmax = quant_range(bits, signed)
    shape = [6, 5, 7]
    for axis in (None, 1, -1):
        n = 1 if axis is None else shape[axis]
        scale = random_scale(gen, n)
        zp = random_zero_point(gen, n, qmin, qmax, symmetric)
        x = random_input(gen, shape, scale, zp, qmin, qmax, normalise_axis(axis, 3))
        check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=f"[{qmin},{qmax}] axis={axis}")


LAYOUT_AXES = [None, 0, 1, 2, 3, -1, -3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "expanded"])
@pytest.mark.parametrize("axis", LAYOUT_AXES)
def test_layouts(layout, axis, device):
    gen = torch.Generator().manual_seed(7)
    shape = [3, 5, 4, 6]
    qmin, qmax = -128, 127
    n = 1 if axis is None else shape[axis]
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, qmin, qmax, symmetric=False)
    base = random_input(gen, shape, scale, zp, qmin, qmax, normalise_axis(axis, 4))
    x = make_layout(base, layout)
    assert torch.equal(x, base)
    check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=f"layout={layout} axis={axis}")
    y, _ = run_qext(x, scale, zp, qmin, qmax, axis, device)
    if layout != "sliced":
        # Dense inputs keep their memory layout (like torch's empty_like with preserve_format).
        assert y.stride() == x.stride(), (layout, y.stride(), x.stride())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("expand_dim", [0, 1, 3])
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_expanded_input(expand_dim, axis, device):
    gen = torch.Generator().manual_seed(expand_dim * 5 + (axis or 0))
    shape = [4, 3, 2, 5]
    n = 1 if axis is None else shape[axis]
    qmin, qmax = 0, 15
    scale = torch.full((n,), 0.1) * torch.linspace(0.5, 1.5, n)
    zp = random_zero_point(gen, n, qmin, qmax, symmetric=False)
    x = make_expanded(gen, shape, expand_dim)
    assert x.stride()[expand_dim] == 0
    check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=f"expanded dim {expand_dim}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3])
def test_channels_last_output(axis, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 3, 5, generator=gen).contiguous(memory_format=torch.channels_last).to(device)
    n = 1 if axis is None else x.shape[axis]
    scale = torch.full((n,), 0.05, device=device)
    zp = torch.zeros(n, dtype=torch.int32, device=device)
    y = qext.fake_quantize(x, scale, zp, -8, 7, axis=axis)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.cpu(), torch_fake_quantize(x.cpu(), scale.cpu(), zp.cpu(), -8, 7, axis))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,axis",
    [([3, 70001], None), ([3, 70001], 0), ([40000, 5], 1), ([5, 300, 67], 1), ([3001, 37], 1), ([1, 7, 4, 77], -1)],
)
def test_large_tensors_threads_and_vector_tails(shape, axis, device):
    """Big enough to be split over threads (chunks of 32768) with odd lengths for SIMD tails."""
    gen = torch.Generator().manual_seed(11)
    qmin, qmax = -8, 7
    n = 1 if axis is None else shape[axis]
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, qmin, qmax, symmetric=False)
    x = random_input(gen, shape, scale, zp, qmin, qmax, axis)
    check_against_torch(x, scale, zp, qmin, qmax, axis, device, what=f"{shape} axis={axis}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ties_round_half_to_even(dtype, device):
    scale = torch.tensor(0.25)
    k = torch.arange(-6, 6, dtype=torch.float64)
    x = ((k + 0.5) * 0.25).to(dtype)
    y = qext.fake_quantize(x.to(device), scale.to(device), torch.tensor(0, dtype=torch.int32, device=device), -100, 100)
    expected = (torch.round(k + 0.5) * 0.25).to(dtype)  # torch.round: half to even
    assert torch.equal(y.cpu(), expected)
    # With an odd zero point the level is round(x / s) + zp, not round(x / s + zp).
    y = qext.fake_quantize(x.to(device), scale.to(device), torch.tensor(3, dtype=torch.int32, device=device), -100, 100)
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_nan_and_inf(dtype, per_channel, device):
    """Documented differences from torch: NaN stays NaN, +-inf saturate to the range ends. The other
    elements still match torch, and no gradient flows through non-finite elements."""
    qmin, qmax = -8, 7
    n = 3 if per_channel else 1
    axis = 0 if per_channel else None
    scale = torch.tensor([0.1, 0.25, 0.5])[:n]
    zp = torch.tensor([3, -2, 0], dtype=torch.int32)[:n]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 21, generator=gen) * 2
    # Non-finite values both in the SIMD body and in the scalar tail (21 = 2 * 8 + 5).
    x[:, 2] = float("nan")
    x[:, 5] = float("inf")
    x[:, 11] = -float("inf")
    x[:, 19] = float("nan")
    x[:, 20] = float("inf")
    x = x.to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    y, dx = run_qext(x, scale, zp, qmin, qmax, axis, device, grad=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.reshape(-1, 1).to(acc)
    z = zp.reshape(-1, 1).to(acc)
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all()
    pos, neg = x == float("inf"), x == -float("inf")
    assert torch.equal(y[pos], ((qmax - z) * s).expand(x.shape)[pos].to(dtype))
    assert torch.equal(y[neg], ((qmin - z) * s).expand(x.shape)[neg].to(dtype))
    finite = torch.isfinite(x)
    assert (dx[~finite] == 0).all()
    ref = ref_fake_quantize(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(y[finite], ref.y[finite])
    assert torch.equal(dx, torch.where(ref.in_range, g, torch.zeros_like(g)))
    yt, _ = run_torch(torch.where(finite, x, torch.zeros_like(x)), scale, zp, qmin, qmax, axis)
    assert torch.equal(y[finite], yt[finite])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [[], [0], [3, 0], [0, 4, 2], [1], [1, 1, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_and_zero_dim(shape, dtype, device):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    for qmin, qmax, zp in ((0, 255, 128), (-8, 7, 0)):
        scale = torch.tensor(0.07)
        check_against_torch(x, scale, torch.tensor(zp), qmin, qmax, None, device, what=f"{shape}")
    if len(shape) >= 2 and shape[1] > 1:
        scale = torch.full((shape[1],), 0.1)
        zp = torch.zeros(shape[1], dtype=torch.int32)
        check_against_torch(x, scale, zp, -8, 7, 1, device, what=f"{shape} per-channel")


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_forms(device):
    """Python numbers, 0-dim and 1-element tensors, int64 zero points, float64 scales, and a
    one-element scale with an axis (per-tensor) all give the same result."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 6, generator=gen) * 2).to(device)
    expected = torch.fake_quantize_per_tensor_affine(x.cpu(), 0.125, 3, -8, 7)
    forms = [
        (0.125, 3, None),
        (torch.tensor(0.125), torch.tensor(3, dtype=torch.int32), None),
        (torch.tensor([0.125]), torch.tensor([3], dtype=torch.int32), None),
        (torch.tensor([0.125], dtype=torch.float64), torch.tensor([3], dtype=torch.int64), None),
        (torch.tensor([0.125]), torch.tensor([3], dtype=torch.int32), 1),
        (torch.tensor([0.125]), torch.tensor([3], dtype=torch.int32), -2),
        (0.125, 3.0, None),  # an integral float zero point is accepted by the Python wrapper
    ]
    for scale, zp, axis in forms:
        s = scale.to(device) if isinstance(scale, torch.Tensor) else scale
        z = zp.to(device) if isinstance(zp, torch.Tensor) else zp
        y = qext.fake_quantize(x, s, z, -8, 7, axis=axis)
        assert torch.equal(y.cpu(), expected), (scale, zp, axis)
    # float16 / bfloat16 scales are accepted too (their values are exact in float32).
    y = qext.fake_quantize(x, torch.tensor(0.125, dtype=torch.bfloat16, device=device),
                           torch.tensor(3, device=device), -8, 7)
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_is_the_operator(device):
    x = torch.randn(5, 7, device=device)
    s = torch.rand(7, device=device) + 0.01
    z = torch.randint(-8, 8, (7,), dtype=torch.int32, device=device)
    assert torch.equal(qext.fake_quantize(x, s, z, -8, 7, axis=1), torch.ops.qext.fake_quantize(x, s, z, -8, 7, 1))
    assert torch.equal(
        qext.fake_quantize(x, 0.3, 2, 0, 15), torch.ops.qext.fake_quantize(x, torch.tensor(0.3, device=device),
                                                                         torch.tensor(2, dtype=torch.int32, device=device), 0, 15)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_scale_not_representable_in_float32(device):
    """A float64 scale is rounded to float32 (as torch does with its Python float scale)."""
    x = torch.randn(100, device=device) * 3
    y = qext.fake_quantize(x, torch.tensor([0.1], dtype=torch.float64, device=device),
                           torch.tensor([1], device=device), -10, 10)
    assert torch.equal(y.cpu(), torch.fake_quantize_per_tensor_affine(x.cpu(), 0.1, 1, -10, 10))


def test_with_cuda_means_cuda_kernels_registered():
    """A build that reports CUDA support registers CUDA kernels for every op (the CUDA tests
    are skipped, not failed, when they are missing, so this is the test that notices)."""
    if not qext.with_cuda():
        pytest.skip("qext built without CUDA")
    missing = [
        op for op in ("fake_quantize", "_fake_quantize_with_mask", "_fake_quantize_mask_backward",
                      "fake_quantize_learnable", "_fake_quantize_learnable_backward", "quantize", "dequantize")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qext::{op}", "CUDA")
    ]
    assert not missing, f"no CUDA kernel for {missing}"

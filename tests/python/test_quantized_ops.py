"""The integer-only layer ops (torch.ops.qext.quantized_*) against independent references:

* exact integer arithmetic in float64 (products of 8-bit levels and their sums are exact there) with the
  real-valued requantization ``floor((acc + bias) * m + 1/2)``: the fixed-point kernels must agree exactly
  except where that is within the fixed-point precision of a .5 tie (then by one step);
* PyTorch's own quantized engines (torch.ao / fbgemm): within one output step;
* every CPU ISA this machine runs bit-identical to the scalar kernels.
"""

import gc
import math

import pytest
import torch
import torch.nn.functional as F

import qext

ops = torch.ops.qext

# A real result this close to a .5 tie may round either way in the fixed-point kernels (31-bit
# multipliers: a relative error of ~2^-31 of results below 2^8 steps, plus the float64 reference's own).
TIE_WINDOW = 1e-6


def qtensor(levels: torch.Tensor, scale: float, zero_point: int, dtype=torch.quint8):
    storage = torch.uint8 if dtype == torch.quint8 else torch.int8
    return torch._make_per_tensor_quantized_tensor(levels.to(storage), scale, zero_point)


def random_qtensor(shape, dtype=torch.quint8, scale=0.05, zero_point=None, gen=None):
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    levels = torch.randint(lo, hi + 1, shape, generator=gen)
    if zero_point is None:
        zero_point = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    return qtensor(levels, scale, zero_point, dtype)


def random_weight(out_features, *rest, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, (out_features, *rest), dtype=torch.int8)


def requantize_reference(acc, m, zero_point, lo, hi):
    """(levels, ambiguous): floor(acc * m + 1/2) + zero_point clamped, and where that is a near tie."""
    real = acc * m
    frac = real - torch.floor(real)
    levels = torch.floor(real + 0.5) + zero_point
    return levels.clamp(lo, hi), (frac - 0.5).abs() < TIE_WINDOW


def assert_matches_reference(out_levels, ref_levels, ambiguous, max_ambiguous=0.02):
    out = out_levels.to(torch.float64)
    diff = (out - ref_levels).abs()
    assert bool((diff[~ambiguous] == 0).all()), f"{int((diff[~ambiguous] != 0).sum())} outputs differ away from ties"
    assert bool((diff <= 1).all())
    # The window is narrow: few outputs of a layer can be near ties (pooling has many exact ones).
    assert float(ambiguous.double().mean()) < max_ambiguous


def epilogue_reference(acc, acc_scale, bias, out_scale, out_zp, lo, hi, relu):
    """The layer output of exact integer sums ``acc`` (acc_scale and bias broadcast against it): float32,
    or (levels, ambiguous) of the requantized output."""
    if bias is not None:  # exact for quantized outputs, rounded to int32 for float ones
        b = bias / acc_scale
        acc = acc + (b if out_scale is not None else torch.round(b))
    if out_scale is None:
        y = (acc * acc_scale).float()
        return F.relu(y) if relu else y
    lo = max(lo, out_zp) if relu else lo
    return requantize_reference(acc, acc_scale / out_scale, out_zp, lo, hi)


def linear_reference(x, w, w_scale, bias, out_scale, out_zp, lo, hi, relu):
    acc = (x.int_repr().double() - x.q_zero_point()) @ w.double().t()
    return epilogue_reference(acc, x.q_scale() * w_scale.double(), None if bias is None else bias.double(),
                              out_scale, out_zp, lo, hi, relu)


def pack(w, groups=1):
    """(packed weight, row sums, weight shape): the weight arguments of quantized_linear / conv2d."""
    return (*ops.pack_quantized_weight(w, groups), list(w.shape))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 64, 16), (3, 7, 5), (17, 65, 33), (64, 300, 40), (130, 1024, 17)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_linear_matches_integer_reference(M, K, N, per_channel):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = random_qtensor((M, K), gen=g, scale=0.02)
    w = random_weight(N, K)
    w_scale = (torch.rand(N if per_channel else 1, generator=g) * 0.01 + 0.001).float()
    bias = torch.randn(N, generator=g)
    out_scale = 0.02 * 0.005 * math.sqrt(K) * 40
    packed, sums, sums_shape = pack(w)
    assert torch.equal(sums, w.int().sum(1, dtype=torch.int32))
    for relu in (False, True):
        y = ops.quantized_linear(x, packed, sums, sums_shape, w_scale, bias, out_scale, 100, 0, 255, relu)
        assert y.dtype == torch.quint8 and y.shape == (M, N) and y.q_scale() == out_scale and y.q_zero_point() == 100
        ref, amb = linear_reference(x, w, w_scale.expand(N), bias, out_scale, 100, 0, 255, relu)
        assert_matches_reference(y.int_repr(), ref, amb)


def test_linear_float_output_and_signed_levels():
    x = random_qtensor((9, 70), dtype=torch.qint8, scale=0.03, zero_point=-5)
    w = random_weight(12, 70)
    w_scale = torch.rand(12) * 0.01 + 0.001
    bias = torch.randn(12)
    packed, sums, sums_shape = pack(w)
    y = ops.quantized_linear(x, packed, sums, sums_shape, w_scale, bias, None, 0, 0, 0, True)
    assert y.dtype == torch.float32
    ref = linear_reference(x, w, w_scale, bias, None, 0, 0, 0, True)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # int8 output range
    yq = ops.quantized_linear(x, packed, sums, sums_shape, w_scale, bias, 0.05, -3, -128, 127, False)
    assert yq.dtype == torch.qint8
    ref, amb = linear_reference(x, w, w_scale, bias, 0.05, -3, -128, 127, False)
    assert_matches_reference(yq.int_repr(), ref, amb)


def test_linear_extreme_levels():
    K, N = 200, 20
    w = torch.cat([torch.full((N // 2, K), -128, dtype=torch.int8), torch.full((N // 2, K), 127, dtype=torch.int8)])
    packed, sums, sums_shape = pack(w)
    for level, zp in ((0, 255), (255, 0), (255, 255), (0, 0)):
        x = qtensor(torch.full((4, K), level), 0.01, zp)
        y = ops.quantized_linear(x, packed, sums, sums_shape, torch.tensor([1e-4]), None, None, 0, 0, 0, False)
        expected = (level - zp) * w[:, 0].double() * K * 0.01 * 1e-4
        torch.testing.assert_close(y, expected.float().expand(4, N), rtol=1e-6, atol=0)


def test_linear_against_torch_ao_fbgemm():
    torch.backends.quantized.engine = "fbgemm"
    g = torch.Generator().manual_seed(3)
    M, K, N = 32, 256, 48
    xf = torch.randn(M, K, generator=g)
    wf = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    w_scale = wf.abs().amax(1) / 127
    qx = torch.quantize_per_tensor(xf, 0.03, 120, torch.quint8)
    qw = torch.quantize_per_channel(wf, w_scale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
    lin = torch.ao.nn.quantized.Linear(K, N)
    lin.set_weight_bias(qw, bias)
    lin.scale, lin.zero_point = 0.15, 64
    expected = lin(qx).int_repr().int()
    packed, sums, sums_shape = pack(qw.int_repr())
    ours = ops.quantized_linear(qx, packed, sums, sums_shape, w_scale.float(), bias, 0.15, 64, 0, 255, False).int_repr().int()
    assert int((ours - expected).abs().max()) <= 1
    assert float((ours != expected).double().mean()) < 0.01


CONV_CASES = [
    # (batch, C, H, W, OC, k, stride, padding, dilation, groups)
    (1, 1, 8, 8, 4, 3, 1, 1, 1, 1),
    (2, 3, 9, 7, 5, 3, 2, 0, 1, 1),
    (2, 8, 10, 10, 16, 3, 1, 2, 2, 1),
    (1, 6, 7, 7, 9, 1, 1, 0, 1, 3),
    (2, 16, 6, 6, 16, 3, 1, 1, 1, 16),  # depthwise
    (1, 24, 9, 9, 24, 5, 2, 2, 1, 24),  # depthwise 5x5 stride 2
    (1, 32, 5, 5, 64, 1, 1, 0, 1, 1),  # 1x1
    # stride 1 on AMX: the implicit GEMM reading A rows from the padded input, from per-pixel patches,
    # from per-pixel kernel-row spans
    (2, 64, 9, 11, 40, 3, 1, 1, 1, 1),
    (1, 32, 12, 12, 64, 3, 1, 0, 1, 1),
    (1, 100, 6, 6, 20, 3, 1, 1, 1, 1),
    # strided on AMX: the implicit GEMM reading A rows from phase planes, from per-pixel patches (a
    # 7x7 stride-2 stem)
    (2, 64, 15, 13, 48, 3, 2, 1, 1, 1),
    (1, 3, 30, 30, 16, 7, 2, 3, 1, 1),
    # grouped, on AMX (enough output pixels): the implicit GEMM group by group (16 channels per
    # group), the one-group convolution with a block-diagonal weight (2 channels per group), and
    # im2col (dilation 2)
    (2, 64, 12, 12, 64, 3, 1, 1, 1, 4),
    (1, 64, 24, 24, 96, 3, 2, 1, 1, 32),
    (1, 96, 14, 13, 48, 3, 2, 1, 1, 3),
    (1, 30, 16, 16, 20, 3, 1, 2, 2, 10),
]


def conv_reference(x, w, w_scale, bias, out_scale, out_zp, lo, hi, relu, stride, padding, dilation, groups):
    xc = x.int_repr().double() - x.q_zero_point()  # zero padding of (q - z) is padding q with its zero point
    acc = F.conv2d(xc, w.double(), None, stride, padding, dilation, groups)
    channel = (1, -1, 1, 1)
    return epilogue_reference(acc, (x.q_scale() * w_scale.double()).reshape(channel),
                              None if bias is None else bias.double().reshape(channel),
                              out_scale, out_zp, lo, hi, relu)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_matches_integer_reference(case, channels_last):
    B, C, H, W, OC, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(sum(case))
    x = random_qtensor((B, C, H, W), gen=g, scale=0.04)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = random_weight(OC, C // groups, k, k)
    w_scale = torch.rand(OC, generator=g) * 0.01 + 0.002
    bias = torch.randn(OC, generator=g)
    out_scale = 0.04 * 0.007 * math.sqrt(C // groups * k * k) * 30
    packed, sums, sums_shape = pack(w, groups)
    for relu in (False, True):
        y = ops.quantized_conv2d(x, packed, sums, sums_shape, w_scale, bias, [s, s], [p, p], [d, d], groups,
                                 out_scale, 128, 0, 255, relu)
        ref, amb = conv_reference(x, w, w_scale, bias, out_scale, 128, 0, 255, relu, s, p, d, groups)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert_matches_reference(y.int_repr(), ref, amb)


def test_conv2d_signed_input_and_float_output():
    x = random_qtensor((2, 4, 6, 6), dtype=torch.qint8, scale=0.05, zero_point=3)
    w = random_weight(6, 4, 3, 3)
    w_scale = torch.rand(6) * 0.01 + 0.002
    packed, sums, sums_shape = pack(w)
    y = ops.quantized_conv2d(x, packed, sums, sums_shape, w_scale, None, [1, 1], [1, 1], [1, 1], 1, None, 0, 0, 0, False)
    ref = conv_reference(x, w, w_scale, None, None, 0, 0, 0, False, 1, 1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_every_isa_is_bit_identical_to_scalar():
    isas = qext._C.supported_int8_isas()
    assert "scalar" in isas
    g = torch.Generator().manual_seed(11)
    x_lin = random_qtensor((70, 333), gen=g)
    w_lin = random_weight(45, 333)
    x_conv = random_qtensor((3, 16, 12, 12), gen=g).contiguous(memory_format=torch.channels_last)
    w_conv = random_weight(32, 16, 3, 3)
    x_dw = random_qtensor((2, 40, 9, 9), gen=g)
    w_dw = random_weight(40, 1, 3, 3)

    def run():
        pl, sl, sl_shape = pack(w_lin)
        pc, sc, sc_shape = pack(w_conv)
        pd, sd, sd_shape = pack(w_dw, 40)
        return [
            ops.quantized_linear(x_lin, pl, sl, sl_shape, torch.full((45,), 0.003), torch.randn(45, generator=torch.Generator().manual_seed(1)), 0.9, 7, 0, 255, False).int_repr(),
            ops.quantized_linear(x_lin, pl, sl, sl_shape, torch.full((45,), 0.003), None, None, 0, 0, 0, True),
            ops.quantized_conv2d(x_conv, pc, sc, sc_shape, torch.full((32,), 0.004), None, [1, 1], [1, 1], [1, 1], 1, 0.7, 30, 0, 255, True).int_repr(),
            ops.quantized_conv2d(x_dw, pd, sd, sd_shape, torch.full((40,), 0.01), None, [2, 2], [1, 1], [1, 1], 40, 0.3, 128, 0, 255, False).int_repr(),
        ]

    try:
        qext._C.set_int8_isa("scalar")
        expected = run()
        for isa in isas:
            qext._C.set_int8_isa(isa)
            for got, want in zip(run(), expected):
                assert torch.equal(got, want), isa
    finally:
        qext._C.set_int8_isa("auto")
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        qext._C.set_int8_isa("sse9")


def random_conv_geometry(g):
    """A random convolution (every path: implicit one-group, phase planes, patches, group by group,
    block-diagonal, im2col, depthwise), per-axis stride, padding and dilation."""
    def pick(*values):
        return values[int(torch.randint(len(values), (1,), generator=g))]

    groups = pick(1, 1, 1, 2, 3, 4, 8, "depthwise")
    per_group = pick(1, 3, 4, 16, 32) if groups != "depthwise" else 1
    channels = per_group * (1 if groups == "depthwise" else groups)
    if groups == "depthwise":
        channels = pick(8, 24, 40, 64)
        groups, out_channels = channels, channels
    else:
        out_channels = groups * pick(1, 5, 16, 24, 40)
    kh, kw = pick(1, 2, 3, 3, 5, 7), pick(1, 3, 3, 4)
    stride = [pick(1, 1, 2, 3), pick(1, 1, 2, 3)]
    padding = [pick(0, 1, 2), pick(0, 1, 3)]
    dilation = [pick(1, 1, 2), pick(1, 1, 1, 2)]
    height = max(pick(6, 9, 14, 23), dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    width = max(pick(5, 11, 16, 29), dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    return (pick(1, 2), channels, height, width, out_channels, (kh, kw), stride, padding, dilation, groups)


@pytest.mark.parametrize("seed", range(40))
def test_random_conv2d_bit_identical_to_scalar_and_matches_reference(seed):
    """Whatever path a geometry takes on this CPU, bit for bit the scalar im2col + GEMM, and the
    integer reference."""
    g = torch.Generator().manual_seed(1000 + seed)
    B, C, H, W, OC, (kh, kw), stride, padding, dilation, groups = random_conv_geometry(g)
    dtype = torch.quint8 if seed % 3 else torch.qint8
    x = random_qtensor((B, C, H, W), dtype=dtype, gen=g, scale=0.04)
    if seed % 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w = random_weight(OC, C // groups, kh, kw)
    w_scale = torch.rand(OC, generator=g) * 0.01 + 0.002
    bias = torch.randn(OC, generator=g) if seed % 2 else None
    out_scale = 0.04 * 0.007 * math.sqrt(C // groups * kh * kw) * 30
    float_out = seed % 5 == 0 and not (groups == C == OC)  # depthwise writes quantized outputs
    packed, sums, sums_shape = pack(w, groups)

    def run():
        return ops.quantized_conv2d(x, packed, sums, sums_shape, w_scale, bias, stride, padding, dilation, groups,
                                    None if float_out else out_scale, 128, 0, 255, seed % 7 == 1)

    y = run()
    try:
        qext._C.set_int8_isa("scalar")
        expected = run()
    finally:
        qext._C.set_int8_isa("auto")
    if float_out:
        assert torch.equal(y, expected)
        ref = conv_reference(x, w, w_scale, bias, None, 0, 0, 0, seed % 7 == 1, stride, padding, dilation, groups)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(y.int_repr(), expected.int_repr())
        ref, amb = conv_reference(x, w, w_scale, bias, out_scale, 128, 0, 255, seed % 7 == 1, stride, padding,
                                  dilation, groups)
        assert_matches_reference(y.int_repr(), ref, amb)


def test_derived_conv_weights_follow_in_place_changes_and_go_with_their_weight():
    """On AMX a stride-2 3x3 convolution over 64 channels runs on its weight rearranged into segments,
    derived once per packed weight: a packed weight changed in place must not meet the old layout, and
    the layout goes once its packed weight is freed."""
    g = torch.Generator().manual_seed(21)
    x = random_qtensor((2, 64, 15, 15), gen=g).contiguous(memory_format=torch.channels_last)
    w_scale = torch.rand(32, generator=g) * 0.01 + 0.002
    out_scale = 0.04 * 0.007 * math.sqrt(64 * 9) * 30

    def run(packed, sums, shape):
        return ops.quantized_conv2d(x, packed, sums, shape, w_scale, None, [2, 2], [1, 1], [1, 1], 1, out_scale,
                                    128, 0, 255, False).int_repr()

    w1, w2 = random_weight(32, 64, 3, 3), random_weight(32, 64, 3, 3)
    p1, s1, shape = pack(w1)
    p2, s2, _ = pack(w2)
    y1, y2 = run(p1, s1, shape), run(p2, s2, shape)
    assert torch.equal(run(p1, s1, shape), y1) and not torch.equal(y1, y2)
    for want, w in ((y1, w1), (y2, w2)):
        ref, amb = conv_reference(x, w, w_scale, None, out_scale, 128, 0, 255, False, 2, 1, 1, 1)
        assert_matches_reference(want, ref, amb)
    p1.copy_(p2)
    s1.copy_(s2)
    assert torch.equal(run(p1, s1, shape), y2)
    if "amx" in qext._C.supported_int8_isas():
        gc.collect()
        run(p2, s2, shape)  # a lookup: drops the layouts of weights freed before
        held = qext._C.derived_weight_entries()
        assert held >= 2
        del p1, s1
        p3, s3, _ = pack(random_weight(32, 64, 3, 3))
        run(p3, s3, shape)  # prunes p1's layout, adds p3's
        assert qext._C.derived_weight_entries() == held


def add_reference(a, b, out_scale, out_zp, lo, hi, relu):
    real = ((a.int_repr().double() - a.q_zero_point()) * a.q_scale()
            + (b.int_repr().double() - b.q_zero_point()) * b.q_scale()) / out_scale
    levels = torch.floor(real + 0.5) + out_zp
    lo = max(lo, out_zp) if relu else lo
    frac = real - torch.floor(real)
    return levels.clamp(lo, hi), (frac - 0.5).abs() < 1e-6


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
def test_add_matches_reference_and_torch(dtype):
    g = torch.Generator().manual_seed(5)
    a = random_qtensor((3, 8, 11, 13), dtype=dtype, scale=0.07, gen=g)
    b = random_qtensor((3, 8, 11, 13), dtype=dtype, scale=0.03, gen=g)
    lo, hi, zp = (0, 255, 90) if dtype == torch.quint8 else (-128, 127, -10)
    for relu in (False, True):
        y = ops.quantized_add(a, b, 0.09, zp, lo, hi, relu)
        ref, amb = add_reference(a, b, 0.09, zp, lo, hi, relu)
        assert_matches_reference(y.int_repr(), ref, amb)
    if dtype == torch.quint8:
        theirs = torch.ops.quantized.add(a, b, 0.09, zp).int_repr().int()
        assert int((ops.quantized_add(a, b, 0.09, zp, 0, 255, False).int_repr().int() - theirs).abs().max()) <= 1
    # mixed memory formats
    y_cl = ops.quantized_add(a.contiguous(memory_format=torch.channels_last), b, 0.09, zp, lo, hi, False)
    assert torch.equal(y_cl.int_repr(), ops.quantized_add(a, b, 0.09, zp, lo, hi, False).int_repr())


@pytest.mark.parametrize(
    "kernel,stride,padding,ceil_mode,count_include_pad,divisor",
    [(2, 2, 0, False, True, None), (3, 2, 1, False, True, None), (3, 2, 1, True, False, None), (3, 1, 1, False, True, 5)],
)
def test_avg_pool_matches_float_pool(kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    x = random_qtensor((2, 5, 9, 10), scale=0.05, zero_point=20)
    y = ops.quantized_avg_pool2d(x, [kernel] * 2, [stride] * 2, [padding] * 2, ceil_mode, count_include_pad, divisor, 0.04, 10, 0, 255)
    real = F.avg_pool2d(x.int_repr().double() - 20, kernel, stride, padding, ceil_mode, count_include_pad, divisor) * (0.05 / 0.04)
    frac = real - torch.floor(real)
    ref = (torch.floor(real + 0.5) + 10).clamp(0, 255)
    assert_matches_reference(y.int_repr(), ref, (frac - 0.5).abs() < 1e-6, max_ambiguous=0.5)


def test_adaptive_avg_pool_matches_float_pool():
    x = random_qtensor((2, 3, 10, 7), dtype=torch.qint8, scale=0.05, zero_point=-4)
    y = ops.quantized_adaptive_avg_pool2d(x, [3, 4], 0.05, -4, -128, 127)
    real = F.adaptive_avg_pool2d(x.int_repr().double() + 4, (3, 4))
    frac = real - torch.floor(real)
    ref = (torch.floor(real + 0.5) - 4).clamp(-128, 127)
    assert_matches_reference(y.int_repr(), ref, (frac - 0.5).abs() < 1e-6, max_ambiguous=0.5)


# ------------------------------------------------------------------------------------------ max pool


def assert_same_qtensor(y, ref):
    """Bit for bit: levels, dtype, scale, zero point, shape and memory format (strides)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert y.q_scale() == ref.q_scale() and y.q_zero_point() == ref.q_zero_point()
    assert y.stride() == ref.stride(), (y.stride(), ref.stride())
    assert torch.equal(y.int_repr(), ref.int_repr())


def max_pool_input(shape, dtype, channels_last, gen):
    """Random levels with the dtype's extremes frequent, as a quantized tensor in the given layout."""
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    levels = torch.randint(lo, hi + 1, shape, generator=gen)
    pick = torch.randint(0, 4, shape, generator=gen)
    levels = torch.where(pick == 0, lo, torch.where(pick == 1, hi, levels))
    x = qtensor(levels, 0.07, 5 if dtype == torch.quint8 else -3, dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _two(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,ceil_mode",
    [(2, None, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 1, 1, 2, False), (3, 3, 1, 2, True),
     ((3, 2), (1, 2), (1, 0), (2, 1), True), (1, 2, 0, 1, True), (2, 3, 1, 1, True)],
)
def test_max_pool_matches_torch(dtype, channels_last, kernel, stride, padding, dilation, ceil_mode):
    """Against torch's own quantized max_pool2d on the same tensor (an independent implementation)."""
    gen = torch.Generator().manual_seed(0)
    for channels in (1, 3, 16, 17, 64):
        x = max_pool_input((2, channels, 11, 8), dtype, channels_last, gen)
        y = ops.quantized_max_pool2d(x, _two(kernel), [] if stride is None else _two(stride), _two(padding),
                                     _two(dilation), ceil_mode)
        assert_same_qtensor(y, F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode))


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_max_pool_batch_zero_and_3d_input(dtype, channels_last):
    gen = torch.Generator().manual_seed(1)
    x = max_pool_input((0, 8, 6, 6), dtype, channels_last, gen)
    y = ops.quantized_max_pool2d(x, [2, 2], [], [0, 0], [1, 1], False)
    assert y.shape == (0, 8, 3, 3)
    assert_same_qtensor(y, F.max_pool2d(x, 2))
    x3 = max_pool_input((1, 8, 7, 5), dtype, False, gen)[0]  # [C, H, W]
    assert_same_qtensor(ops.quantized_max_pool2d(x3, [3, 3], [2, 2], [1, 1], [1, 1], True),
                        F.max_pool2d(x3, 3, 2, 1, ceil_mode=True))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_max_pool_parallel_tasks(channels_last):
    """Inputs large enough to be split into several parallel tasks (rows / planes) on two threads."""
    gen = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.quint8, torch.qint8):
            x = max_pool_input((9, 40, 33, 30), dtype, channels_last, gen)
            y = ops.quantized_max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True)
            assert_same_qtensor(y, F.max_pool2d(x, 3, 2, 1, ceil_mode=True))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_max_pool_strided_input_and_module():
    """A view (a sliced channels-last tensor) gives torch's levels (in channels-last memory, its suggested format,
    where torch writes NCHW for a non-contiguous input); qext.nn.quantized.MaxPool2d runs the op on quantized
    CPU inputs, torch's pool on float ones, and traces and scripts."""
    from qext.nn import quantized as nnq

    gen = torch.Generator().manual_seed(2)
    x = max_pool_input((2, 12, 9, 10), torch.quint8, True, gen)[:, 2:9, :, 1:]
    y = ops.quantized_max_pool2d(x, [2, 2], [], [0, 0], [1, 1], False)
    assert torch.equal(y.int_repr(), F.max_pool2d(x, 2).int_repr())
    assert y.is_contiguous(memory_format=torch.channels_last)
    pool = nnq.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True)
    xq = max_pool_input((2, 16, 9, 10), torch.qint8, True, gen)
    assert_same_qtensor(pool(xq), F.max_pool2d(xq, (3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True))
    assert "qext::quantized_max_pool2d" in str(torch.jit.trace(pool, xq).graph)
    xf = torch.randn(2, 3, 9, 10)
    assert torch.equal(pool(xf), F.max_pool2d(xf, (3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True))
    scripted = torch.jit.script(pool)
    assert_same_qtensor(scripted(xq), pool(xq))
    assert torch.equal(scripted(xf), pool(xf))
    back = nnq.MaxPool2d.from_float(torch.nn.MaxPool2d(3, 2, 1, 2, ceil_mode=True))
    assert (back.kernel_size, back.stride, back.padding, back.dilation, back.ceil_mode) == (3, 2, 1, 2, True)


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
def test_quantized_flatten_matches_torch(dtype):
    """quantized_flatten against torch.flatten (whose copy of a channels-last quantized tensor moves one byte at
    a time: an independent implementation): channels-last inputs with whole and ragged 16 x 16 transpose blocks
    and below 16, every dimension range (those torch views stay views), a sliced view, NCHW, per-channel and
    qint32 inputs; qext.nn.quantized.Flatten against nn.Flatten, traced, scripted and on float input."""
    from qext.nn import quantized as nnq

    gen = torch.Generator().manual_seed(5)
    for shape in [(2, 64, 5, 5), (3, 7, 5, 6), (1, 32, 4, 4), (2, 17, 9, 3), (2, 40, 7, 7), (0, 8, 2, 2)]:
        x = max_pool_input(shape, dtype, True, gen)
        for start, end in [(1, -1), (0, -1), (0, 1), (1, 2), (2, 3), (1, 1), (-3, -2)]:
            assert_same_qtensor(ops.quantized_flatten(x, start, end), torch.flatten(x, start, end))
    view = max_pool_input((2, 12, 9, 10), dtype, True, gen)[:, 2:9, :, 1:]
    assert_same_qtensor(ops.quantized_flatten(view, 1, -1), torch.flatten(view, 1))
    nchw = max_pool_input((2, 5, 3, 3), dtype, False, gen)
    assert_same_qtensor(ops.quantized_flatten(nchw, 1, -1), torch.flatten(nchw, 1))
    per_channel = torch.quantize_per_channel(torch.randn(2, 3, 4, 5), torch.full((3,), 0.1, dtype=torch.double),
                                             torch.zeros(3, dtype=torch.long), 1, dtype)
    qint32 = torch.quantize_per_tensor(torch.randn(2, 3, 4, 5), 0.1, 0, torch.qint32)
    for other in [per_channel, qint32]:  # not transposed: torch's flatten
        other = other.contiguous(memory_format=torch.channels_last)
        y, ref = ops.quantized_flatten(other, 1, -1), torch.flatten(other, 1)
        assert y.qscheme() == ref.qscheme() and y.stride() == ref.stride() and torch.equal(y.int_repr(), ref.int_repr())
    flatten, reference = nnq.Flatten.from_float(torch.nn.Flatten(1, 2)), torch.nn.Flatten(1, 2)
    x = max_pool_input((3, 16, 5, 5), dtype, True, gen)
    assert_same_qtensor(flatten(x), reference(x))
    assert "qext::quantized_flatten" in str(torch.jit.trace(flatten, x).graph)
    assert_same_qtensor(torch.jit.script(flatten)(x), reference(x))
    xf = torch.randn(2, 3, 4, 5)
    assert torch.equal(flatten(xf), reference(xf))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_gives_clear_errors():
    x = random_qtensor((4, 16))
    w = random_weight(8, 16)
    packed, sums, sums_shape = pack(w)
    ws = torch.full((8,), 0.01)
    with pytest.raises(RuntimeError, match="input must be a per-tensor quantized tensor.*Float"):
        ops.quantized_linear(torch.randn(4, 16), packed, sums, sums_shape, ws, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="packed_weight has .* bytes"):
        ops.quantized_linear(x, packed[:-1], sums, sums_shape, ws, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="does not end in the weight's 16 in_features"):
        ops.quantized_linear(random_qtensor((4, 15)), packed, sums, sums_shape, ws, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match=r"row_sums must be int32 of shape \[9\]"):
        ops.quantized_linear(x, packed, sums, [9, 16], ws, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="row_sums must be"):
        ops.quantized_linear(x, packed, sums.long(), sums_shape, ws, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match=r"weight_scale\[2\] = -1"):
        bad = ws.clone()
        bad[2] = -1
        ops.quantized_linear(x, packed, sums, sums_shape, bad, None, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="output_scale must be finite and > 0, got nan"):
        ops.quantized_linear(x, packed, sums, sums_shape, ws, None, float("nan"), 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="output_zero_point 300"):
        ops.quantized_linear(x, packed, sums, sums_shape, ws, None, 0.1, 300, 0, 255, False)
    with pytest.raises(RuntimeError, match="fits neither uint8 nor int8"):
        ops.quantized_linear(x, packed, sums, sums_shape, ws, None, 0.1, 0, 0, 1000, False)
    with pytest.raises(RuntimeError, match=r"bias\[0\] = inf"):
        b = torch.zeros(8)
        b[0] = float("inf")
        ops.quantized_linear(x, packed, sums, sums_shape, ws, b, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="weight must be int8"):
        ops.pack_quantized_weight(w.float(), 1)
    with pytest.raises(RuntimeError, match="weight is empty"):
        ops.pack_quantized_weight(torch.empty(0, 4, dtype=torch.int8), 1)
    with pytest.raises(RuntimeError, match="per tensor"):
        qw = torch.quantize_per_channel(torch.randn(4, 16), torch.ones(4, dtype=torch.double), torch.zeros(4, dtype=torch.long), 0, torch.quint8)
        ops.quantized_linear(qw, packed, sums, sums_shape, ws, None, 0.1, 0, 0, 255, False)
    # K too large for exact int32 accumulation
    K = 70000
    wk = torch.ones(1, K, dtype=torch.int8)
    pk, sk, sk_shape = pack(wk)
    with pytest.raises(RuntimeError, match="overflow the exact int32 accumulation"):
        ops.quantized_linear(random_qtensor((1, K)), pk, sk, sk_shape, torch.tensor([0.01]), None, 0.1, 0, 0, 255, False)
    # conv shapes
    xc = random_qtensor((1, 4, 5, 5))
    pc, sc, sc_shape = pack(random_weight(6, 4, 3, 3))
    with pytest.raises(RuntimeError, match="input must be 4-D"):
        ops.quantized_conv2d(random_qtensor((4, 5, 5)), pc, sc, sc_shape, torch.tensor([0.01]), None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="too small"):
        ops.quantized_conv2d(random_qtensor((1, 4, 2, 2)), pc, sc, sc_shape, torch.tensor([0.01]), None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="packed_weight has"):
        ops.quantized_conv2d(xc, pc, sc, [6, 4, 5, 5], torch.tensor([0.01]), None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="input has 4 channels where the weight"):
        ops.quantized_conv2d(xc, pc, sc, sc_shape, torch.tensor([0.01]), None, [1, 1], [0, 0], [1, 1], 3, 0.1, 0, 0, 255, False)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.quantized_add(random_qtensor((2, 3)), random_qtensor((3, 2)), 0.1, 0, 0, 255)

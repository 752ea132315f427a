"""CUDA kernels of the integer-only layers (qext.quantized_linear / quantized_conv2d) against the
CPU kernels: bit-identical outputs (8-bit levels, or float32 values), same dtype, quantization
parameters and memory format, and the same error messages. The packed weight is the CPU's
(pack_quantized_weight), moved to the GPU with .cuda().

Skipped without a CUDA device (or a qext built without its CUDA kernels)."""

import zlib

import pytest
import torch

import qext  # noqa: F401  (registers torch.ops.qext)

pytestmark = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and torch._C._dispatch_has_kernel_for_dispatch_key("qext::quantized_linear", "QuantizedCUDA")
    ),
    reason="needs a CUDA device and qext's CUDA kernels",
)

ops = torch.ops.qext

# Output kinds: (output_min, output_max) of an 8-bit output, or None for float32.
OUTPUTS = [(0, 255), (-128, 127), (10, 200), None]


def seed_of(*parts):
    """A seed from a test's parameters, the same in every process."""
    return zlib.crc32(repr(parts).encode())


def quantized_input(gen, shape, dtype, scale=0.05, zero_point=None, memory_format=None):
    """A per-tensor quantized CPU tensor with random levels (and a random zero point)."""
    if dtype == torch.quint8:
        levels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        zp = int(torch.randint(0, 256, (), generator=gen)) if zero_point is None else zero_point
    else:
        levels = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
        zp = int(torch.randint(-128, 128, (), generator=gen)) if zero_point is None else zero_point
    q = torch._make_per_tensor_quantized_tensor(levels, scale, zp)
    if memory_format is not None:
        q = q.contiguous(memory_format=memory_format)
    return q


def to_cuda(q):
    """The same quantized tensor (levels, parameters, memory format) on the GPU."""
    levels = q.int_repr().cuda()
    out = torch._make_per_tensor_quantized_tensor(levels, q.q_scale(), q.q_zero_point())
    if q.dim() == 4 and q.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def random_weight(gen, shape, per_channel=True):
    w = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    n = shape[0] if per_channel else 1
    scale = torch.rand(n, generator=gen) * 0.02 + 0.001
    return w, scale


def output_args(y_float, out_range, gen, relu):
    """output_scale / zero point / range covering most of the float result (some clamping)."""
    if out_range is None:
        return dict(output_scale=None, output_zero_point=0, output_min=0, output_max=255, relu=relu)
    lo, hi = out_range
    span = float(y_float.max() - y_float.min()) if y_float.numel() else 1.0
    scale = max(span, 1e-3) / (hi - lo) * 0.8
    zp = int(torch.randint(lo, hi + 1, (), generator=gen))
    return dict(output_scale=scale, output_zero_point=zp, output_min=lo, output_max=hi, relu=relu)


def assert_same(y_cuda, y_cpu):
    assert y_cuda.device.type == "cuda"
    assert y_cuda.dtype == y_cpu.dtype
    assert y_cuda.shape == y_cpu.shape
    if y_cpu.is_quantized:
        assert y_cuda.q_scale() == y_cpu.q_scale()
        assert y_cuda.q_zero_point() == y_cpu.q_zero_point()
        got, want = y_cuda.int_repr().cpu(), y_cpu.int_repr()
    else:
        got, want = y_cuda.cpu(), y_cpu
    if not torch.equal(got, want):
        diff = (got.to(torch.float64) - want.to(torch.float64)).abs()
        raise AssertionError(
            f"CUDA differs from CPU at {int((diff != 0).sum())} of {diff.numel()} elements "
            f"(max |diff| {float(diff.max())})"
        )


def run_linear(x, w, w_scale, bias, out_range, relu, gen):
    packed, row_sums = ops.pack_quantized_weight(w)
    y_float = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, bias, None, 0, 0, 255, False)
    kwargs = output_args(y_float, out_range, gen, relu)
    args = (kwargs["output_scale"], kwargs["output_zero_point"], kwargs["output_min"],
            kwargs["output_max"], kwargs["relu"])
    y_cpu = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, bias, *args)
    bias_cuda = None if bias is None else bias.cuda()
    y_cuda = ops.quantized_linear(to_cuda(x), packed.cuda(), row_sums.cuda(), w.shape, w_scale.cuda(),
                                  bias_cuda, *args)
    assert_same(y_cuda, y_cpu)
    return y_cuda


LINEAR_SHAPES = [
    # (input shape, N)
    ((1, 1), 1),
    ((1, 17), 5),
    ((1, 4096), 300),  # M = 1 (tiny-tile config), long K
    ((3, 64), 16),
    ((16, 16), 16),
    ((17, 100), 33),  # first M above the tiny config
    ((37, 129), 70),
    ((128, 256), 128),
    ((130, 1000), 300),
    ((257, 323), 129),
    ((2, 5, 48), 40),  # 3-D input
    ((1536, 200), 1536),  # enough tiles for the large (128 x 128) config
]


@pytest.mark.parametrize("shape,N", LINEAR_SHAPES)
@pytest.mark.parametrize("in_dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("out_range", OUTPUTS)
def test_linear_matches_cpu(shape, N, in_dtype, out_range):
    gen = torch.Generator().manual_seed(seed_of(shape, N, in_dtype, out_range))
    K = shape[-1]
    x = quantized_input(gen, shape, in_dtype)
    w, w_scale = random_weight(gen, (N, K), per_channel=N % 2 == 1)
    bias = torch.randn(N, generator=gen) if K % 2 == 1 else None
    run_linear(x, w, w_scale, bias, out_range, relu=N % 3 == 0, gen=gen)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("out_range", OUTPUTS)
def test_linear_relu_and_bias(relu, out_range):
    gen = torch.Generator().manual_seed(7)
    x = quantized_input(gen, (45, 77), torch.quint8)
    w, w_scale = random_weight(gen, (50, 77))
    bias = torch.randn(50, generator=gen) * 3
    run_linear(x, w, w_scale, bias, out_range, relu, gen)


def test_linear_noncontiguous_input():
    gen = torch.Generator().manual_seed(3)
    base = quantized_input(gen, (64, 48), torch.qint8)
    x = base.t()  # [48, 64], not contiguous
    w, w_scale = random_weight(gen, (24, 64))
    packed, row_sums = ops.pack_quantized_weight(w)
    args = (0.5, 3, -128, 127, False)
    y_cpu = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, None, *args)
    x_cuda = to_cuda(base).t()
    y_cuda = ops.quantized_linear(x_cuda, packed.cuda(), row_sums.cuda(), w.shape, w_scale, None, *args)
    assert_same(y_cuda, y_cpu)


@pytest.mark.parametrize("in_dtype", [torch.quint8, torch.qint8])
def test_linear_extreme_values(in_dtype):
    """Largest products (|x - z| = 255, |w| = 128), the longest exact K, saturating and tiny
    requantization multipliers."""
    gen = torch.Generator().manual_seed(11)
    for K, N in [(4099, 17), (65792, 3)]:
        if in_dtype == torch.quint8:
            x = torch._make_per_tensor_quantized_tensor(
                torch.tensor([[255] * K, [0] * K], dtype=torch.uint8), 0.01, 0)
        else:
            x = torch._make_per_tensor_quantized_tensor(
                torch.tensor([[127] * K, [-128] * K], dtype=torch.int8), 0.01, -128)
        w = torch.full((N, K), -128, dtype=torch.int8)
        w[1::2] = 127
        w_scale = torch.full((N,), 0.01)
        packed, row_sums = ops.pack_quantized_weight(w)
        for out_scale in [1e-8, 1e-3, 0.3, 1e3, 1e4]:
            m = 0.01 * 0.01 / out_scale
            if not (2.0**-32 <= m <= 2.0**30):
                continue
            for lo, hi in [(0, 255), (-128, 127)]:
                args = (out_scale, (lo + hi) // 2, lo, hi, False)
                y_cpu = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, None, *args)
                y_cuda = ops.quantized_linear(to_cuda(x), packed.cuda(), row_sums.cuda(), w.shape, w_scale,
                                              None, *args)
                assert_same(y_cuda, y_cpu)
        y_cpu = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, None, None, 0, 0, 255, True)
        y_cuda = ops.quantized_linear(to_cuda(x), packed.cuda(), row_sums.cuda(), w.shape, w_scale, None,
                                      None, 0, 0, 255, True)
        assert_same(y_cuda, y_cpu)


def test_linear_random_multipliers():
    """Per-channel weight scales over eight decades: every requantization exponent range."""
    gen = torch.Generator().manual_seed(5)
    x = quantized_input(gen, (33, 96), torch.quint8)
    w = torch.randint(-128, 128, (64, 96), generator=gen, dtype=torch.int8)
    w_scale = 10.0 ** (torch.rand(64, generator=gen) * 8 - 6)
    bias = torch.randn(64, generator=gen) * 1e-3
    packed, row_sums = ops.pack_quantized_weight(w)
    args = (0.02, 128, 0, 255, False)
    y_cpu = ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, bias, *args)
    y_cuda = ops.quantized_linear(to_cuda(x), packed.cuda(), row_sums.cuda(), w.shape, w_scale.cuda(),
                                  bias.cuda(), *args)
    assert_same(y_cuda, y_cpu)


# --------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, OC, (kh, kw), stride, padding, dilation, groups)
    (1, 3, 8, 8, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 8, 11, 9, 16, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (3, 4, 6, 10, 6, (2, 3), (2, 1), (0, 2), (1, 2), 2),
    (1, 32, 5, 5, 64, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1: direct GEMM on channels_last
    (1, 64, 5, 7, 32, (1, 1), (1, 1), (0, 0), (1, 1), 4),  # 1x1 grouped, C/g = 16: direct
    (1, 32, 5, 5, 32, (1, 1), (1, 1), (0, 0), (1, 1), 4),  # 1x1 grouped, C/g = 8: im2col
    (2, 16, 7, 7, 16, (3, 3), (1, 1), (2, 2), (2, 2), 16),  # depthwise, dilated
    (1, 24, 13, 11, 24, (5, 5), (2, 2), (2, 2), (1, 1), 24),  # depthwise 5x5 stride 2
    (1, 8, 6, 6, 16, (3, 3), (1, 1), (1, 1), (1, 1), 8),  # channel multiplier 2: grouped GEMM
    (1, 1, 9, 9, 1, (3, 3), (1, 1), (0, 0), (1, 1), 1),  # single channel (not depthwise)
    (4, 64, 14, 14, 96, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 3, 33, 31, 20, (7, 7), (2, 2), (3, 3), (1, 1), 1),
]


def run_conv(case, in_dtype, out_range, memory_format, relu, gen, with_bias=True):
    n, c, h, w_, oc, k, s, p, d, g = case
    depthwise = g > 1 and g == c == oc
    if depthwise and out_range is None:
        out_range = (0, 255)  # depthwise writes quantized outputs only (as on the CPU)
    x = quantized_input(gen, (n, c, h, w_), in_dtype, memory_format=memory_format)
    w, w_scale = random_weight(gen, (oc, c // g, k[0], k[1]))
    bias = torch.randn(oc, generator=gen) if with_bias else None
    packed, row_sums = ops.pack_quantized_weight(w, g)
    geo = (list(s), list(p), list(d), g)
    if out_range is None:
        args = (None, 0, 0, 255, relu)
    else:
        probe = (1.0, 0, -128, 127, False)  # a rough output range from a wide quantized probe
        y_probe = ops.quantized_conv2d(x, packed, row_sums, w.shape, w_scale, bias, *geo, *probe)
        lo, hi = out_range
        span = float(y_probe.dequantize().max() - y_probe.dequantize().min())
        args = (max(span, 1.0) / (hi - lo), (lo + hi) // 2, lo, hi, relu)
    y_cpu = ops.quantized_conv2d(x, packed, row_sums, w.shape, w_scale, bias, *geo, *args)
    y_cuda = ops.quantized_conv2d(to_cuda(x), packed.cuda(), row_sums.cuda(), w.shape, w_scale,
                                  None if bias is None else bias.cuda(), *geo, *args)
    assert_same(y_cuda, y_cpu)
    assert y_cuda.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("in_dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("out_range", [(0, 255), (-128, 127), None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv2d_matches_cpu(case, in_dtype, out_range, memory_format):
    gen = torch.Generator().manual_seed(seed_of(case, in_dtype, out_range))
    run_conv(case, in_dtype, out_range, memory_format, relu=case[0] % 2 == 1, gen=gen,
             with_bias=case[1] % 2 == 0)


# --------------------------------------------------------------------------------------------------
# Errors: the same checks (int8_args.h) and messages on either device
# --------------------------------------------------------------------------------------------------


def error_of(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).split("\n")[0]


def test_errors_match_cpu():
    gen = torch.Generator().manual_seed(0)
    x = quantized_input(gen, (4, 32), torch.quint8)
    w, w_scale = random_weight(gen, (8, 32))
    packed, row_sums = ops.pack_quantized_weight(w)
    xc, pc, rc = to_cuda(x), packed.cuda(), row_sums.cuda()
    good = (None, 0.1, 0, 0, 255, False)
    cases = [
        # float input
        (lambda: ops.quantized_linear(x.dequantize(), packed, row_sums, w.shape, w_scale, *good),
         lambda: ops.quantized_linear(xc.dequantize(), pc, rc, w.shape, w_scale, *good)),
        # packed weight of the wrong size
        (lambda: ops.quantized_linear(x, packed[:-1], row_sums, w.shape, w_scale, *good),
         lambda: ops.quantized_linear(xc, pc[:-1], rc, w.shape, w_scale, *good)),
        # bad output range
        (lambda: ops.quantized_linear(x, packed, row_sums, w.shape, w_scale, None, 0.1, 0, 5, 5, False),
         lambda: ops.quantized_linear(xc, pc, rc, w.shape, w_scale, None, 0.1, 0, 5, 5, False)),
    ]
    for cpu_fn, cuda_fn in cases:
        assert error_of(cuda_fn) == error_of(cpu_fn)
    # weights left on the CPU
    msg = error_of(lambda: ops.quantized_linear(xc, packed, row_sums, w.shape, w_scale, *good))
    assert "the weights are on cpu" in msg

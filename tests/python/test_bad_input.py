"""Argument checking: each bad input raises the documented exception type with a message naming the
argument and the value seen, before anything is written."""

import re

import pytest
import torch

import qext
from qext_testing import DEVICES, cuda_usable

I32 = torch.int32


def fq(x, scale, zp, qmin=0, qmax=255, axis=None):
    return qext.fake_quantize(x, scale, zp, qmin, qmax, axis=axis)


def lsq(x, scale, zp, qmin=0, qmax=255, axis=None):
    return qext.fake_quantize_learnable(x, scale, zp, qmin, qmax, axis=axis)


def qz(x, scale, zp, qmin=0, qmax=255, axis=None):
    return qext.quantize(x, scale, zp, qmin, qmax, axis=axis)


OPS = {"fake_quantize": fq, "fake_quantize_learnable": lsq, "quantize": qz}


def zp_for(op, values, device):
    dtype = torch.float32 if op == "fake_quantize_learnable" else I32
    return torch.tensor(values, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value,shown", [(0.0, "0"), (-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf"),
                                         (-float("inf"), "-inf"), (1e-45, "1.4013e-45")])
def test_scale_not_finite_positive(op, value, shown, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=rf"{op}: scale must be finite and positive.*got {re.escape(shown)}$"):
        OPS[op](x, torch.tensor(value, device=device), zp_for(op, 0, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_scale_per_channel_names_channel(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"scale must be finite and positive.*got -0\.2 for channel 1"):
        OPS[op](x, torch.tensor([0.1, -0.2, 0.3], device=device), zp_for(op, [0, 0, 0], device), axis=1)
    with pytest.raises(ValueError, match=r"scale must be finite and positive.*got nan for channel 2"):
        OPS[op](x, torch.tensor([0.1, 0.2, float("nan")], device=device), zp_for(op, [0, 0, 0], device), axis=-1)


@pytest.mark.parametrize("op", list(OPS) + ["dequantize"])
def test_scale_overflowing_float32(op):
    scale = torch.tensor(1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scale must be finite and positive.*got 1e\+39"):
        if op == "dequantize":
            qext.dequantize(torch.ones(5, dtype=torch.uint8), scale, torch.tensor(0))
        else:
            OPS[op](torch.randn(5), scale, zp_for(op, 0, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_not_floating(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match=r"fake_quantize: scale must be a floating-point tensor, got Long"):
        fq(x, torch.tensor(1, device=device), torch.tensor(0, dtype=I32, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_scale_empty(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"scale must be a scalar or a one-dimensional tensor with at least one "
                                         r"element, got shape \[0\]"):
        OPS[op](x, torch.tensor([], device=device), zp_for(op, [], device))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_two_dimensional(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"scale must be a scalar or a one-dimensional tensor.*got shape \[1, 3\]"):
        fq(x, torch.full((1, 3), 0.1, device=device), torch.zeros(1, 3, dtype=I32, device=device), axis=1)


def test_python_argument_types():
    x = torch.randn(3)
    with pytest.raises(TypeError, match=r"scale must be a float or a tensor, got str"):
        qext.fake_quantize(x, "0.1", 0, 0, 255)
    with pytest.raises(TypeError, match=r"zero_point must be a number or a tensor, got bool"):
        qext.fake_quantize(x, 0.1, True, 0, 255)


# --------------------------------------------------------------------------------------------------
# zero point
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["fake_quantize", "quantize"])
@pytest.mark.parametrize("value", [300, -1, 256])
def test_zero_point_outside_range(op, value, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=rf"{op}: zero_point must lie in \[quant_min, quant_max\] = \[0, 255\], got {value}$"):
        OPS[op](x, torch.tensor(0.1, device=device), torch.tensor(value, dtype=I32, device=device))
    with pytest.raises(ValueError, match=rf"zero_point must lie in .*got {value} for channel 2"):
        OPS[op](x, torch.full((3,), 0.1, device=device), torch.tensor([0, 1, value], dtype=I32, device=device), axis=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_learnable_zero_point_not_finite(value, shown, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=rf"fake_quantize_learnable: zero_point must be finite, got {shown}$"):
        lsq(x, torch.tensor([0.1], device=device), torch.tensor([value], device=device))
    with pytest.raises(ValueError, match=rf"zero_point must be finite, got {shown} for channel 0"):
        lsq(x, torch.full((2,), 0.1, device=device), torch.tensor([value, 0.0], device=device), axis=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["fake_quantize", "quantize"])
def test_zero_point_float_tensor(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match=rf"{op}: zero_point must be an integer tensor \(int32 or int64\), got Float"):
        OPS[op](x, torch.tensor(0.1, device=device), torch.tensor(1.0, device=device))


def test_zero_point_fractional_python_float():
    with pytest.raises(ValueError, match=r"zero_point must be an integer, got 1\.5"):
        qext.fake_quantize(torch.randn(3), 0.1, 1.5, 0, 255)
    with pytest.raises(ValueError, match=r"zero_point must be an integer, got 2\.25"):
        qext.quantize(torch.randn(3), 0.1, 2.25, 0, 255)


def test_learnable_zero_point_complex():
    with pytest.raises(RuntimeError, match=r"fake_quantize_learnable: zero_point must be a real tensor, got ComplexFloat"):
        lsq(torch.randn(3), torch.tensor([0.1]), torch.tensor([0j], dtype=torch.complex64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_zero_point_shape_differs_from_scale(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"zero_point must have the shape of scale \[3\], got \[2\]"):
        OPS[op](x, torch.full((3,), 0.1, device=device), zp_for(op, [0, 0], device), axis=1)


# --------------------------------------------------------------------------------------------------
# quant_min / quant_max
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("qmin,qmax", [(5, 5), (7, -8), (255, 0)])
def test_quant_min_not_below_quant_max(op, qmin, qmax):
    with pytest.raises(ValueError, match=rf"{op}: quant_min must be less than quant_max, got quant_min={qmin} and quant_max={qmax}"):
        OPS[op](torch.randn(3), torch.tensor(0.1), zp_for(op, 0, "cpu"), qmin, qmax)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "qmin,qmax,message",
    [
        (0, 65536, r"quant_min and quant_max must lie in \[-65536, 65535\], got quant_min=0 and quant_max=65536"),
        (-65537, 0, r"quant_min and quant_max must lie in \[-65536, 65535\], got quant_min=-65537 and quant_max=0"),
        (-32768, 32768, r"the range \[quant_min, quant_max\] may hold at most 2\^16 levels \(16 bits\), got \[-32768, 32768\] \(65537 levels\)"),
        (-65536, 65535, r"the range \[quant_min, quant_max\] may hold at most 2\^16 levels \(16 bits\), got \[-65536, 65535\] \(131072 levels\)"),
        (-2**40, 2**40, r"quant_min and quant_max must lie in .*got quant_min=-1099511627776 and quant_max=1099511627776"),
    ],
)
def test_range_wider_than_16_bits(op, qmin, qmax, message):
    with pytest.raises(ValueError, match=rf"{op}: {message}"):
        OPS[op](torch.randn(3), torch.tensor(0.1), zp_for(op, 0, "cpu"), qmin, qmax)


@pytest.mark.parametrize("op", OPS)
def test_widest_ranges_accepted(op):
    x = torch.randn(50) * 100
    for qmin, qmax in ((0, 65535), (-32768, 32767), (-65536, -1)):
        zp = zp_for(op, max(qmin, min(qmax, 0)), "cpu")
        OPS[op](x, torch.tensor(0.01), zp, qmin, qmax)


# --------------------------------------------------------------------------------------------------
# axis and channels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axis", [2, -3, 10])
def test_axis_out_of_range(op, axis, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(IndexError, match=rf"{op}: axis {axis} is out of range for an input with 2 dimensions \(shape \[2, 3\]\)"):
        OPS[op](x, torch.full((3,), 0.1, device=device), zp_for(op, [0, 0, 0], device), axis=axis)
    # Even with a one-element (per-tensor) scale, a given axis must exist.
    with pytest.raises(IndexError, match=rf"axis {axis} is out of range"):
        OPS[op](x, torch.full((1,), 0.1, device=device), zp_for(op, [0], device), axis=axis)


@pytest.mark.parametrize("op", OPS)
def test_axis_on_zero_dim_input(op):
    with pytest.raises(IndexError, match=r"axis 0 is out of range for an input with 0 dimensions \(shape \[\]\)"):
        OPS[op](torch.tensor(1.0), torch.tensor([0.1]), zp_for(op, [0], "cpu"), axis=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_channel_count_mismatch(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"scale and zero_point have 4 elements but input has 3 channels along axis 1 \(shape \[2, 3\]\)"):
        OPS[op](x, torch.full((4,), 0.1, device=device), zp_for(op, [0] * 4, device), axis=1)
    with pytest.raises(ValueError, match=r"scale and zero_point have 3 elements but input has 2 channels along axis 0"):
        OPS[op](x, torch.full((3,), 0.1, device=device), zp_for(op, [0] * 3, device), axis=-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_per_channel_without_axis(op, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=rf"{op}: scale has 3 elements \(per-channel\) but no axis was given"):
        OPS[op](x, torch.full((3,), 0.1, device=device), zp_for(op, [0] * 3, device))


# --------------------------------------------------------------------------------------------------
# input dtype and device
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,shown", [(torch.int32, "Int"), (torch.int64, "Long"), (torch.uint8, "Byte"),
                                         (torch.bool, "Bool"), (torch.complex64, "ComplexFloat"),
                                         (torch.complex128, "ComplexDouble")])
def test_input_not_real_floating(op, dtype, shown, device):
    x = torch.ones(2, 3, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match=rf"{op}: input must be a floating-point tensor \(float32, float64, float16 or bfloat16\), got {shown}$"):
        OPS[op](x, torch.tensor(0.1, device=device), zp_for(op, 0, device))


@pytest.mark.parametrize("op", OPS)
def test_parameters_on_another_device_meta(op):
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"input, scale and zero_point must be on the same device, got input on cpu, "
                                           r"scale on meta and zero_point on cpu"):
        OPS[op](x, torch.tensor(0.1, device="meta"), zp_for(op, 0, "cpu"))
    with pytest.raises(RuntimeError, match=r"got input on cpu, scale on cpu and zero_point on meta"):
        OPS[op](x, torch.tensor(0.1), zp_for(op, 0, "meta"))
    with pytest.raises(RuntimeError, match=r"got input on meta, scale on cpu and zero_point on cpu"):
        OPS[op](x.to("meta"), torch.tensor(0.1), zp_for(op, 0, "cpu"))


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA device and qext CUDA kernels")
@pytest.mark.parametrize("op", OPS)
def test_parameters_on_another_device_cuda(op):
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"got input on cuda:0, scale on cpu and zero_point on cuda:0"):
        OPS[op](x, torch.tensor(0.1), zp_for(op, 0, "cuda"))
    with pytest.raises(RuntimeError, match=r"got input on cpu, scale on cuda:0 and zero_point on cpu"):
        OPS[op](x.cpu(), torch.tensor(0.1, device="cuda"), zp_for(op, 0, "cpu"))
    with pytest.raises(RuntimeError, match=r"got input on cuda:0, scale on cuda:0 and zero_point on cpu"):
        OPS[op](x, torch.tensor(0.1, device="cuda"), zp_for(op, 0, "cpu"))


# --------------------------------------------------------------------------------------------------
# quantize / dequantize specifics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_storage_dtype(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"quantize: dtype Char cannot hold the range \[0, 255\]"):
        qext.quantize(x, 0.1, 0, 0, 255, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"quantize: dtype Byte cannot hold the range \[-8, 7\]"):
        qext.quantize(x, 0.1, 0, -8, 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"quantize: dtype Char cannot hold the range \[-129, 0\]"):
        qext.quantize(x, 0.1, 0, -129, 0, dtype=torch.int8)
    for dtype, shown in ((torch.int16, "Short"), (torch.int64, "Long"), (torch.float32, "Float")):
        with pytest.raises(RuntimeError, match=rf"quantize: integer storage must be int8, uint8 or int32, got {shown}"):
            qext.quantize(x, 0.1, 0, 0, 255, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_bad_input(device):
    with pytest.raises(RuntimeError, match=r"dequantize: integer storage must be int8, uint8 or int32, got Float"):
        qext.dequantize(torch.randn(3, device=device), 0.1, 0)
    with pytest.raises(RuntimeError, match=r"dequantize: integer storage must be int8, uint8 or int32, got Short"):
        qext.dequantize(torch.ones(3, dtype=torch.int16, device=device), 0.1, 0)
    with pytest.raises(RuntimeError, match=r"dequantize: dtype must be a floating-point type, got Int"):
        qext.dequantize(torch.ones(3, dtype=torch.uint8, device=device), 0.1, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dequantize: zero_point must lie in .*\[0, 255\], got 300"):
        qext.dequantize(torch.ones(3, dtype=torch.uint8, device=device), 0.1, 300)
    with pytest.raises(ValueError, match=r"dequantize: zero_point must lie in .*\[-128, 127\], got 128"):
        qext.dequantize(torch.ones(3, dtype=torch.int8, device=device), 0.1, 128)
    with pytest.raises(ValueError, match=r"dequantize: scale must be finite and positive.*got -0\.1"):
        qext.dequantize(torch.ones(3, dtype=torch.uint8, device=device), -0.1, 0)
    with pytest.raises(ValueError, match=r"dequantize: scale must be finite and positive.*got nan"):
        qext.dequantize(torch.ones(3, dtype=torch.uint8, device=device), float("nan"), 0)
    with pytest.raises(RuntimeError, match=r"dequantize: zero_point must be an integer tensor \(int32 or int64\), got Float"):
        qext.dequantize(torch.ones(3, dtype=torch.uint8, device=device), torch.tensor(0.1, device=device),
                        torch.tensor(1.0, device=device))
    q = torch.ones(2, 3, dtype=torch.uint8, device=device)
    s, z = torch.full((3,), 0.1, device=device), torch.zeros(3, dtype=I32, device=device)
    with pytest.raises(ValueError, match=r"dequantize: scale has 3 elements \(per-channel\) but no axis was given"):
        qext.dequantize(q, s, z)
    with pytest.raises(IndexError, match=r"dequantize: axis 5 is out of range for an input with 2 dimensions"):
        qext.dequantize(q, s, z, axis=5)
    with pytest.raises(ValueError, match=r"dequantize: scale and zero_point have 3 elements but input has 2 channels along axis 0"):
        qext.dequantize(q, s, z, axis=0)


# --------------------------------------------------------------------------------------------------
# quantized_max_pool2d
# --------------------------------------------------------------------------------------------------


def _qx(shape=(1, 2, 4, 4), dtype=torch.quint8):
    return torch.quantize_per_tensor(torch.rand(shape), 0.1, 0, dtype)


def _per_channel():
    return torch.quantize_per_channel(torch.rand(1, 2, 4, 4), torch.tensor([0.1, 0.2], dtype=torch.double),
                                      torch.tensor([0, 0]), 1, torch.quint8)


MAX_POOL_BAD = {
    "float input": ((torch.rand(1, 2, 4, 4), [2, 2], [], [0, 0], [1, 1]),
                    r"input must be a per-tensor quantized tensor .*got a Float tensor"),
    "per-channel input": ((_per_channel(), [2, 2], [], [0, 0], [1, 1]),
                          r"input must be quantized per tensor \(affine\), got qscheme per_channel_affine"),
    "qint32 input": ((_qx(dtype=torch.qint32), [2, 2], [], [0, 0], [1, 1]),
                     r"input must be torch.quint8 or torch.qint8, got QInt32"),
    "2-D input": ((_qx((4, 4)), [2, 2], [], [0, 0], [1, 1]),
                  r"input must be 3-D \[C, H, W\] or 4-D \[N, C, H, W\], got shape \[4, 4\]"),
    "5-D input": ((_qx((1, 1, 2, 4, 4)), [2, 2], [], [0, 0], [1, 1]),
                  r"input must be 3-D .* got shape \[1, 1, 2, 4, 4\]"),
    "kernel_size length": ((_qx(), [2, 2, 2], [], [0, 0], [1, 1]),
                           r"kernel_size must have two values, got \[2, 2, 2\]"),
    "stride length": ((_qx(), [2, 2], [1], [0, 0], [1, 1]),
                      r"stride must have two values \(or none: the kernel_size\), got \[1\]"),
    "padding length": ((_qx(), [2, 2], [], [0, 0, 0], [1, 1]),
                       r"padding must have two values, got \[0, 0, 0\]"),
    "dilation length": ((_qx(), [2, 2], [], [0, 0], [1]),
                        r"dilation must have two values, got \[1\]"),
    "kernel_size 0": ((_qx(), [0, 2], [1, 1], [0, 0], [1, 1]),
                      r"kernel_size must be in \[1, 2\^31\); got kernel_size \[0, 2\]"),
    "stride 0": ((_qx(), [2, 2], [2, 0], [0, 0], [1, 1]),
                 r"stride must be in \[1, 2\^31\); got kernel_size \[2, 2\], stride \[2, 0\]"),
    "negative stride": ((_qx(), [2, 2], [-1, 1], [0, 0], [1, 1]),
                        r"stride must be in .*stride \[-1, 1\]"),
    "dilation 0": ((_qx(), [2, 2], [], [0, 0], [0, 1]),
                   r"dilation must be in \[1, 2\^31\);.* dilation \[0, 1\]"),
    "padding above half the kernel": ((_qx(), [3, 3], [], [2, 1], [1, 1]),
                                      r"padding must be >= 0 and at most half the kernel_size;.* padding \[2, 1\]"),
    "negative padding": ((_qx(), [3, 3], [], [0, -1], [1, 1]),
                         r"padding must be >= 0 .* padding \[0, -1\]"),
    "output size 0": ((_qx(), [5, 5], [], [0, 0], [1, 1]),
                      r"the output would be empty .*kernel_size \[5, 5\].* input of shape \[1, 2, 4, 4\]"),
    "output size 0 by dilation": ((_qx(), [3, 3], [], [1, 1], [3, 3]),
                                  r"the output would be empty .*dilation \[3, 3\]"),
    "empty planes": ((_qx((1, 2, 0, 4)), [1, 1], [], [0, 0], [1, 1]),
                     r"the input planes are empty.* input of shape \[1, 2, 0, 4\]"),
}


@pytest.mark.parametrize("case", MAX_POOL_BAD)
def test_max_pool_bad_input_names_argument(case):
    args, message = MAX_POOL_BAD[case]
    with pytest.raises(RuntimeError, match=r"qext\.quantized_max_pool2d: .*" + message):
        torch.ops.qext.quantized_max_pool2d(*args, False)


@pytest.mark.parametrize("value", [torch.rand(1, 2, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.uint8)],
                         ids=["float", "uint8"])
def test_quantized_flatten_rejects_unquantized_input(value):
    with pytest.raises(RuntimeError, match=r"qext\.quantized_flatten: input must be a quantized tensor, got a"):
        torch.ops.qext.quantized_flatten(value, 1, -1)


def test_quantized_flatten_bad_dims_name_the_value():
    with pytest.raises(IndexError, match=r"Dimension out of range .* got 4"):
        torch.ops.qext.quantized_flatten(_qx().contiguous(memory_format=torch.channels_last), 4, -1)


def test_max_pool_module_bad_arguments():
    from qext.nn import quantized as nnq

    with pytest.raises(ValueError, match="return_indices=True is not supported"):
        nnq.MaxPool2d(2, return_indices=True)
    # A bad geometry reaches the op's check on quantized input (and torch's on float input).
    with pytest.raises(RuntimeError, match=r"padding must be >= 0 and at most half the kernel_size"):
        nnq.MaxPool2d(2, padding=2)(_qx())


# --------------------------------------------------------------------------------------------------
# A failed call changes nothing
# --------------------------------------------------------------------------------------------------


BAD_CALLS = {
    "zero_point out of range": lambda x: fq(x, torch.tensor(0.1), torch.tensor(300, dtype=I32)),
    "per-channel zero point out of range": lambda x: fq(x, torch.full((7,), 0.1), torch.tensor([0] * 6 + [999], dtype=I32), axis=1),
    "negative scale": lambda x: fq(x, torch.tensor(-1.0), torch.tensor(0, dtype=I32)),
    "learnable nan zero point": lambda x: lsq(x, torch.tensor([0.1]), torch.tensor([float("nan")])),
    "quantize last channel scale nan": lambda x: qz(x, torch.tensor([0.1] * 6 + [float("nan")]), torch.zeros(7, dtype=I32), axis=1),
    "quantize nan input": lambda x: qz(torch.where(x > 1, float("nan"), x), torch.tensor(0.1), torch.tensor(0, dtype=I32)),
    "axis": lambda x: fq(x, torch.full((7,), 0.1), torch.zeros(7, dtype=I32), axis=4),
}


@pytest.mark.parametrize("call", BAD_CALLS)
def test_failed_call_leaves_input_unchanged(call):
    x = torch.randn(5, 7) * 3
    x_grad = x.clone().requires_grad_()
    before = x.clone()
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        BAD_CALLS[call](x)
    assert torch.equal(x, before)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        BAD_CALLS[call](x_grad)
    assert torch.equal(x_grad.detach(), before) and x_grad.grad is None


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(3, dtype=torch.int32), 0.1, 0, 0, 255), RuntimeError, r"quantize_per_tensor: input must be a floating-point tensor .* got Int"),
        ((torch.ones(3), 0.0, 0, 0, 255), ValueError, r"quantize_per_tensor: scale must be finite and positive .* got 0"),
        ((torch.ones(3), -1.0, 0, 0, 255), ValueError, r"scale must be finite and positive .* got -1"),
        ((torch.ones(3), float("nan"), 0, 0, 255), ValueError, r"scale must be finite and positive .* got nan"),
        ((torch.ones(3), float("inf"), 0, 0, 255), ValueError, r"scale must be finite and positive .* got inf"),
        ((torch.ones(3), 0.1, 256, 0, 255), ValueError, r"zero_point must lie in \[quant_min, quant_max\] = \[0, 255\], got 256"),
        ((torch.ones(3), 0.1, 0, 5, 5), ValueError, r"quant_min must be less than quant_max, got quant_min=5 and quant_max=5"),
        ((torch.ones(3), 0.1, 0, 0, 70000), ValueError, r"quant_min and quant_max must lie in"),
        ((torch.tensor([1.0, float("nan")]), 0.1, 0, 0, 255), ValueError, r"quantize_per_tensor: input contains NaN"),
    ],
)
def test_quantize_per_tensor_rejects(args, error, match):
    before = args[0].clone()
    with pytest.raises(error, match=match):
        torch.ops.qext.quantize_per_tensor(*args)
    assert torch.equal(args[0].nan_to_num(), before.nan_to_num())


def test_dequantize_per_tensor_rejects():
    with pytest.raises(RuntimeError, match=r"dequantize_per_tensor: input must be a quantized tensor, got Float"):
        torch.ops.qext.dequantize_per_tensor(torch.ones(3))
    q = torch.quantize_per_channel(torch.ones(2, 3), torch.tensor([0.1, 0.2], dtype=torch.double),
                                   torch.tensor([0, 1]), 0, torch.quint8)
    with pytest.raises(RuntimeError, match=r"dequantize_per_tensor: input must be quantized per tensor, got qscheme per_channel_affine"):
        torch.ops.qext.dequantize_per_tensor(q)

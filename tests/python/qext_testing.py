"""Shared helpers of the qext Python tests: random cases, input layouts and plain-torch references.

The references mirror csrc/qext/kernels/fake_quantize_ref.h operation by operation:
``level = round(x * (1 / scale)) + zero_point`` with ``1 / scale`` computed in float32, rounding half
to even, and arithmetic in float32 for float32 / float16 / bfloat16 inputs and in float64 for float64
inputs. NaN levels stay NaN, +-inf levels clamp to the range ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import qext  # noqa: F401  (registers torch.ops.qext, queried by cuda_usable)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def cuda_usable() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "qext::fake_quantize", "CUDA"
    )


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return "qext has no CUDA kernel registered for qext::fake_quantize (see test_with_cuda_means_cuda_kernels_registered)"


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_usable(), reason=_cuda_skip_reason())),
]


# --------------------------------------------------------------------------------------------------
# Quantization parameters
# --------------------------------------------------------------------------------------------------


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def normalise_axis(axis: Optional[int], dim: int) -> Optional[int]:
    if axis is None:
        return None
    return axis + dim if axis < 0 else axis


def random_scale(gen: torch.Generator, n: int) -> torch.Tensor:
    """float32 scales, log-uniform in [1e-3, 1]; about a third are powers of two, so that inputs
    built as (k + 0.5) * scale are exact ties of x * (1 / scale)."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    s = torch.exp(math.log(1e-3) + u * (math.log(1.0) - math.log(1e-3)))
    pow2 = torch.rand(n, generator=gen) < 0.33
    s = torch.where(pow2, torch.exp2(torch.round(torch.log2(s))), s)
    return s.float()


def random_zero_point(gen: torch.Generator, n: int, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    if symmetric:
        return torch.zeros(n, dtype=torch.int32)
    return torch.randint(qmin, qmax + 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)


def bshape(x: torch.Tensor, axis: Optional[int]) -> list[int]:
    """Shape that broadcasts a per-channel parameter vector along axis of x."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = x.shape[axis]
    return shape


def param_view(p: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """One-element parameters broadcast as scalars; per-channel ones along axis."""
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape(bshape(x, axis))


def random_input(
    gen: torch.Generator,
    shape: list[int],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    dtype: torch.dtype = torch.float32,
    outside: float = 0.25,
) -> torch.Tensor:
    """Values whose levels span [qmin, qmax] widened by `outside` of the span on both ends, plus
    a sprinkling of exact grid points and exact half-way points (ties) and zeros."""
    numel = math.prod(shape)
    span = qmax - qmin
    lo, hi = qmin - outside * span - 2, qmax + outside * span + 2
    levels = lo + (hi - lo) * torch.rand(numel, generator=gen, dtype=torch.float64)
    # ~10% exact integer levels and ~10% exact ties k + 0.5.
    pick = torch.rand(numel, generator=gen, dtype=torch.float64)
    levels = torch.where(pick < 0.1, levels.round(), levels)
    levels = torch.where((pick >= 0.1) & (pick < 0.2), levels.floor() + 0.5, levels)
    levels = levels.reshape(shape)
    xdummy = torch.empty(shape)
    s = param_view(scale.double(), xdummy, axis)
    z = param_view(zero_point.double(), xdummy, axis)
    x = (levels - z) * s
    x = torch.where(torch.rand(shape, generator=gen) < 0.05, torch.zeros((), dtype=x.dtype), x)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "sliced", "channels_last", "expanded", "offset")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x (same shape and values) with the given memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        # Dense but permuted: reversed dimension order in memory.
        perm = list(range(x.dim()))[::-1]
        return x.permute(perm).contiguous().permute(perm)
    if layout == "sliced":
        if x.dim() == 0:
            return x.clone()
        big = torch.zeros(list(x.shape[:-1]) + [2 * x.shape[-1] + 1], dtype=x.dtype)
        big[..., 1::2] = x
        out = big[..., 1::2]
        assert out.shape == x.shape
        return out
    if layout == "channels_last":
        assert x.dim() == 4
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":
        raise ValueError("use make_expanded")
    if layout == "offset":
        flat = torch.zeros(x.numel() + 3, dtype=x.dtype)
        flat[3:] = x.reshape(-1)
        return flat[3:].view(x.shape)
    raise ValueError(layout)


def make_expanded(gen: torch.Generator, shape: list[int], dim: int, dtype=torch.float32, scale=1.0):
    """A stride-0 (expanded) tensor of the given shape, broadcast along dim."""
    base_shape = list(shape)
    base_shape[dim] = 1
    base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return base.expand(shape)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_zero_point(zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Learnable zero point: round half to even, clamp (integers pass through)."""
    return torch.clamp(torch.round(zero_point.double()), qmin, qmax)


@dataclass
class RefResult:
    y: torch.Tensor
    level: torch.Tensor  # unclamped level (acc dtype)
    in_range: torch.Tensor


def ref_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
) -> RefResult:
    """fake_quantize_ref.h in plain torch (zero point already integer-valued)."""
    acc = acc_dtype(x.dtype)
    axis = normalise_axis(axis, x.dim())
    s32 = param_view(scale.to(torch.float32), x, axis)
    inv32 = 1.0 / s32
    z = param_view(zero_point.to(torch.float32), x, axis).to(acc)
    level = torch.round(x.to(acc) * inv32.to(acc)) + z
    in_range = (level >= qmin) & (level <= qmax)
    clamped = torch.clamp(level, qmin, qmax)  # NaN stays NaN
    y = ((clamped - z) * s32.to(acc)).to(x.dtype)
    return RefResult(y=y, level=level, in_range=in_range)


def torch_fake_quantize(x, scale, zero_point, qmin, qmax, axis=None):
    """torch's own fake quantization (per-tensor or per-channel), with the qext argument convention.

    float64 per-tensor goes through torch's per-channel op with a single channel: torch's per-tensor
    kernel multiplies by the scale in float32 even for float64 inputs, its per-channel kernel (like
    qext) in float64.
    """
    if scale.numel() == 1:
        if x.dtype == torch.float64:
            xr = x.reshape(1, -1)
            y = torch.fake_quantize_per_channel_affine(
                xr,
                scale.reshape(1).float(),
                zero_point.reshape(1).to(torch.int32),
                0,
                qmin,
                qmax,
            )
            return y.reshape(x.shape)
        return torch.fake_quantize_per_tensor_affine(x, float(scale.reshape(())), int(zero_point.reshape(())), qmin, qmax)
    axis = normalise_axis(axis, x.dim())
    return torch.fake_quantize_per_channel_affine(
        x, scale.float(), zero_point.to(torch.int32), axis, qmin, qmax
    )


def lsq_surrogate(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Differentiable float64 LSQ / LSQ+ reference with explicit straight-through surrogates.

    Forward value equals fake_quantize_learnable up to float64 rounding (levels and the in-range
    decision are the kernel's own, from float32 1 / scale); autograd then gives
      dx = g in range, 0 outside
      dscale = grad_factor * sum(g * (x_fq - x) / s in range, g * (q_bound - zp) outside)
      dzp = grad_factor * sum(-g * s outside).
    Arguments may require grad; x may be any float dtype (promoted to float64). Finite x only.
    """
    axis = normalise_axis(axis, x.dim())
    xd = x.double()
    s = param_view(scale, x, axis).double()
    zp = param_view(zero_point, x, axis).double()
    # grad_factor: value unchanged, gradient scaled.
    s = s * grad_factor + (s - s * grad_factor).detach()
    zp = zp * grad_factor + (zp - zp * grad_factor).detach()
    # Rounded / clamped zero point with an identity (straight-through) gradient.
    z = zp + (torch.clamp(torch.round(zp), qmin, qmax) - zp).detach()
    # The exact level of the kernel (float32 arithmetic for non-float64 inputs).
    ref = ref_fake_quantize(
        x.detach(), scale.detach().float(), resolve_zero_point(zero_point.detach(), qmin, qmax), qmin, qmax, axis
    )
    level = ref.level.double()  # the kernel's exact level (float32 arithmetic for non-float64 x)
    # In range: y = (level - z) * s written as x + (round(x / s) - x / s) * s with the bracket
    # detached, so dy/dx = 1, dy/ds = round(x / s) - x / s = (x_fq - x) / s and dy/dz = 0.
    frac = (level - z - xd / s).detach()
    y_in = xd + frac * s
    # Outside: y = (q_bound - z) * s, so dy/dx = 0, dy/ds = q_bound - z and dy/dz = -s.
    bound = torch.where(level < qmin, torch.full_like(level, qmin), torch.full_like(level, qmax))
    y_out = (bound - z) * s
    return torch.where(ref.in_range, y_in, y_out)


def lsq_grad_formula(x, g, scale, zero_point, qmin, qmax, grad_factor=1.0, axis=None):
    """The LSQ / LSQ+ gradient formulas evaluated elementwise in float64, then reduced. Like the
    kernels (and torch's), the in-range scale term is (x_fq - x) * (1 / scale) with 1 / scale
    computed in float32.

    Returns (dx, dscale, dzp, mag_scale, mag_zp): the mags are sum(|term|) per parameter entry (plus,
    for the scale, 0.1 * sum(|g * level|), which bounds the rounding of x_fq - x in float32 with a
    wide margin): the natural scale for comparing sums whose terms cancel.
    """
    axis = normalise_axis(axis, x.dim())
    zr = resolve_zero_point(zero_point, qmin, qmax)
    ref = ref_fake_quantize(x, scale.float(), zr, qmin, qmax, axis)
    level, inside = ref.level.double(), ref.in_range
    s = param_view(scale.float().double(), x, axis)
    z = param_view(zr, x, axis)
    gd = g.double()
    inv = param_view(1.0 / scale.float(), x, axis).double()  # the kernels' float32 1 / scale
    x_fq = (level - z) * s
    bound = torch.where(level < qmin, torch.full_like(level, qmin), torch.full_like(level, qmax))
    finite = ~torch.isnan(level)
    zero = torch.zeros_like(gd)
    dscale_el = torch.where(inside, gd * (x_fq - x.double()) * inv, torch.where(finite, gd * (bound - z), zero))
    dzp_el = torch.where(inside | ~finite, zero, -gd * s.expand_as(gd))
    dx = torch.where(inside, g, torch.zeros_like(g))
    mag_s_el = dscale_el.abs() + 0.1 * (gd * (level - z)).abs().nan_to_num(0)
    mag_z_el = dzp_el.abs()
    parts = [dscale_el, dzp_el, mag_s_el, mag_z_el]
    if scale.numel() == 1:
        red = [p.sum() for p in parts]
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        red = [p.sum(dims) if dims else p for p in parts]
    dscale, dzp, mag_s, mag_z = red
    gf = abs(grad_factor)
    return dx, dscale * grad_factor, dzp * grad_factor, mag_s * gf, mag_z * gf


def avoid_ties(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], margin: float = 1e-2) -> torch.Tensor:
    """Moves elements whose x / scale lies within `margin` of a half-way point k + 0.5 by 2*margin.

    Needed only to compare with torch's *learnable* backward kernels, which round
    ``zero_point + x * inv_scale`` as one float sum (so ties and large zero points round differently
    from torch's own forward ``round(x * inv_scale) + zero_point``). float32 inputs only.
    """
    axis = normalise_axis(axis, x.dim())
    s = param_view(scale.float(), x, axis)
    t = x.float() * (1.0 / s)
    frac = t - torch.floor(t)
    near = (frac - 0.5).abs() < margin
    moved = (t + 2 * margin) * s
    return torch.where(near, moved, x.float()).to(x.dtype)


def assert_close_sum(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, rtol: float, msg=""):
    """|actual - expected| <= rtol * magnitude + tiny, elementwise (sums whose terms cancel)."""
    actual = actual.detach().double().cpu().reshape(expected.shape)
    expected = expected.detach().double().cpu()
    magnitude = magnitude.detach().double().cpu().reshape(expected.shape)
    err = (actual - expected).abs()
    bound = rtol * magnitude + 1e-30
    bad = err > bound
    assert not bad.any(), (
        f"{msg} sums differ: actual={actual[bad].tolist()[:5]} expected={expected[bad].tolist()[:5]} "
        f"err={err[bad].tolist()[:5]} bound={bound[bad].tolist()[:5]}"
    )


# --------------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    shape: list[int]
    qmin: int
    qmax: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: Optional[int]  # as passed to qext (may be negative); None for per-tensor
    bits: int
    signed: bool
    symmetric: bool

    def __repr__(self):
        kind = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return (
            f"Case(shape={self.shape}, [{self.qmin},{self.qmax}] bits={self.bits} signed={self.signed} "
            f"symmetric={self.symmetric} {kind})"
        )


def random_shape(gen: torch.Generator, rank: int, max_numel: int = 4000) -> list[int]:
    while True:
        shape = []
        for _ in range(rank):
            r = torch.rand((), generator=gen).item()
            if r < 0.05:
                shape.append(0)
            elif r < 0.25:
                shape.append(1)
            else:
                shape.append(int(torch.randint(2, 12, (), generator=gen)))
        if math.prod(shape) <= max_numel:
            return shape


def random_case(
    seed: int, rank: Optional[int] = None, per_channel: Optional[bool] = None, max_numel: int = 4000
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        rank = int(torch.randint(0, 6, (), generator=gen))
    shape = random_shape(gen, rank, max_numel)
    bits = int(torch.randint(2, 17, (), generator=gen))
    signed = bool(torch.randint(0, 2, (), generator=gen))
    symmetric = bool(torch.randint(0, 2, (), generator=gen))
    qmin, qmax = quant_range(bits, signed)
    if per_channel is None:
        per_channel = rank > 0 and bool(torch.randint(0, 2, (), generator=gen))
    axis = None
    n = 1
    if per_channel:
        axis = int(torch.randint(-rank, rank, (), generator=gen))
        if shape[normalise_axis(axis, rank)] == 0:
            shape[normalise_axis(axis, rank)] = 2
        n = shape[normalise_axis(axis, rank)]
    scale = random_scale(gen, n)
    zp = random_zero_point(gen, n, qmin, qmax, symmetric)
    if n == 1 and not per_channel and bool(torch.randint(0, 2, (), generator=gen)):
        scale, zp = scale.reshape(()), zp.reshape(())
    return Case(shape, qmin, qmax, scale, zp, axis, bits, signed, symmetric)

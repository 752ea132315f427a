"""Observers: modules that record statistics of the tensors passing through them and derive a
scale and zero point from them.

* :class:`MinMaxObserver` - running min / max, per-tensor or per-channel (``axis``).
* :class:`MovingAverageMinMaxObserver` - exponential moving average of the batch min / max
  (first batch initialises, then ``min = min + c * (batch_min - min)``), per-tensor or per-channel.
* :class:`HistogramObserver` - per-tensor int64 histogram; the clipping range is chosen by KL
  entropy (TensorRT), a percentile, or minimum expected squared error.

The statistics come from the C++ operators ``torch.ops.qext.aminmax`` / ``histogram`` /
``choose_qparams`` (CPU and CUDA kernels, non-finite values skipped, integer counts). Everything is
deterministic: the same data gives bit-identical scales on every run and on either device.

State lives in buffers (``min_val``, ``max_val``; ``histogram``, ``grid_exp``, ``grid_start``), so
``state_dict`` round-trips, also into a fresh observer (buffers are resized on load). Buffers are
updated in place, so references held by DistributedDataParallel stay valid.

Histogram grid. The histogram has ``bins`` bins of width ``2^grid_exp`` (a power of two), aligned
to multiples of the width: bin ``j`` covers ``[(grid_start + j) * w, (grid_start + j + 1) * w)``.
The grid is a function of the observed (min, max) only: the finest power-of-two width whose aligned
grid of ``bins`` bins covers them. When new data widens the range the width doubles (once or more)
and every old bin falls wholly inside one new bin, so the counts are re-binned exactly (integer
adds). The histogram is therefore exactly the histogram of all observed data on the final grid,
whatever the batch order or split; this is what makes merging across DDP ranks exact. The data
occupy at least about half of the bins.

Distributed. :meth:`synchronize` all-reduces the statistics when ``torch.distributed`` is
initialised (MIN/MAX for min/max, mean over the ranks that saw finite values for the EMA, SUM of
counts on the common grid for histograms); :meth:`calculate_qparams` calls it, so every rank
derives identical scales. It is a collective: every rank must call it. The histogram keeps, besides
the persistent counts, the counts observed locally since the last synchronisation (not in the
state dict), so repeated synchronisation never counts data twice. Calibrate histogram observers on
the bare module (or DDP with ``broadcast_buffers=False``): DDP's buffer broadcast would overwrite
every rank's counts with rank 0's.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .qconfig import QuantSpec, SpecShortcuts

__all__ = [
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "make_observer",
    "histogram_range",
]

_INF = float("inf")


def _ops():
    return torch.ops.qext


def _dist_world() -> int:
    """World size when torch.distributed is usable and initialised, else 1."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op])
    return t


def normalize_axis(axis: Optional[int], dim: int, label: str, shape=None) -> Optional[int]:
    if axis is None:
        return None
    if not -dim <= axis < dim:
        shown = f" (shape {list(shape)})" if shape is not None else ""
        raise IndexError(f"{label}: axis {axis} is out of range for a {dim}-dimensional input{shown}")
    return axis + dim if axis < 0 else axis


def _set_(buf: torch.Tensor, value: torch.Tensor) -> None:
    """In-place assignment (resizing when needed) so that the buffer object stays the same."""
    with torch.no_grad():
        if buf.shape != value.shape:
            buf.resize_(value.shape)
        buf.copy_(value)


class ObserverBase(SpecShortcuts, nn.Module):
    """Common interface: ``forward(x)`` records statistics and returns ``x``;
    ``calculate_qparams()`` returns ``(scale float32, zero_point int32)`` of shape ``[1]`` or ``[C]``.

    Construct from a :class:`QuantSpec` or from its fields: ``MinMaxObserver(spec)``,
    ``MinMaxObserver(bits=8, signed=False, symmetric=False, axis=0)``.
    ``module_name`` (set by ``qext.fake_quant.set_module_names`` / prepare) names the module in
    error messages.
    """

    kind: str = ""
    _resizable: Tuple[str, ...] = ()

    def __init__(self, spec: Optional[QuantSpec] = None, **fields):
        super().__init__()
        if spec is None:
            spec = QuantSpec(observer=self.kind, **fields)
        elif not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: spec must be a QuantSpec, got {type(spec).__name__}")
        elif fields or spec.observer != self.kind:
            spec = spec.replace(**{"observer": self.kind, **fields})
        self.spec = spec
        self.module_name = ""

    def _label(self) -> str:
        name = type(self).__name__
        return f"{name} '{self.module_name}'" if self.module_name else name

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"bits={s.bits}", f"signed={s.signed}", f"symmetric={s.symmetric}",
                 f"quant_min={s.quant_min}", f"quant_max={s.quant_max}"]
        if s.axis is not None:
            parts.append(f"axis={s.axis}")
        return ", ".join(parts)

    # -- interface --------------------------------------------------------------------------------
    def has_data(self) -> bool:
        """Whether any (non-empty) input was observed (finite or not)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def calculate_qparams(self, sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _not_observed_error(self) -> ValueError:
        return ValueError(f"{self._label()}: calculate_qparams called before any data was observed")

    def _choose(self, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            return _ops().choose_qparams(lo, hi, self.quant_min, self.quant_max, self.symmetric)
        except ValueError as e:
            bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
            if bool(bad.any()):
                where = f" in channel {int(bad.nonzero()[0, 0])}" if self.axis is not None else ""
                raise ValueError(
                    f"{self._label()}: no finite values observed (all NaN/Inf){where}"
                ) from e
            raise ValueError(f"{self._label()}: {e}") from e

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._resizable:
            key = prefix + name
            cur = getattr(self, name, None)
            if key in state_dict and isinstance(cur, torch.Tensor) and cur.shape != state_dict[key].shape:
                with torch.no_grad():
                    cur.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------------------------------
# Min / max observers
# --------------------------------------------------------------------------------------------------


class _MinMaxBase(ObserverBase):
    _resizable = ("min_val", "max_val")

    def __init__(self, spec: Optional[QuantSpec] = None, **fields):
        super().__init__(spec, **fields)
        # Empty until the first (non-empty) input: [1] per-tensor, [C] per-channel.
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def has_data(self) -> bool:
        return self.min_val.numel() > 0

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: expected a tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return x  # nothing to observe (as torch.ao does)
        axis = normalize_axis(self.axis, x.dim(), self._label(), x.shape)
        lo, hi = _ops().aminmax(x.detach(), axis)
        if self.min_val.numel() == 0:
            _set_(self.min_val, lo)
            _set_(self.max_val, hi)
            return x
        if self.min_val.shape != lo.shape:
            raise ValueError(
                f"{self._label()}: input has {lo.numel()} channels along axis {self.axis} "
                f"(shape {list(x.shape)}) but {self.min_val.numel()} were observed before"
            )
        self._update(lo.to(self.min_val.device), hi.to(self.min_val.device))
        return x

    def calculate_qparams(self, sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        if sync:
            self.synchronize()
        if not self.has_data():
            raise self._not_observed_error()
        return self._choose(self.min_val, self.max_val)

    def _sync_channels(self) -> bool:
        """Agree on the channel count across ranks; ranks without data take it with +-inf
        statistics. Returns False when no rank observed anything."""
        dev = self.min_val.device
        if self.axis is None:
            has = 1.0 if self.has_data() else 0.0
            n = 1
        else:
            has = float(self.min_val.numel())
            n = self.min_val.numel()
        head = torch.tensor([has, -(n if n > 0 else 2.0**60)], dtype=torch.float64, device=dev)
        _all_reduce(head, "max")
        most, fewest = int(head[0].item()), int(-head[1].item())
        if most == 0:
            return False
        if self.axis is not None and fewest != most:
            raise ValueError(
                f"{self._label()}: ranks observed different channel counts ({fewest} and {most})"
            )
        if not self.has_data():
            c = most if self.axis is not None else 1
            _set_(self.min_val, torch.full((c,), _INF, device=dev))
            _set_(self.max_val, torch.full((c,), -_INF, device=dev))
        return True


class MinMaxObserver(_MinMaxBase):
    """Running minimum and maximum of the finite values seen (per-tensor, or per channel along
    ``axis``). Scale and zero point follow torch.ao's ``MinMaxObserver`` /
    ``PerChannelMinMaxObserver`` formulas exactly (``torch.ops.qext.choose_qparams``)."""

    kind = "minmax"

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    @torch.no_grad()
    def synchronize(self) -> None:
        if _dist_world() == 1 or not self._sync_channels():
            return
        packed = torch.cat([-self.min_val, self.max_val]).to(torch.float64)
        _all_reduce(packed, "max")
        c = self.min_val.numel()
        self.min_val.copy_(-packed[:c])
        self.max_val.copy_(packed[c:])


class MovingAverageMinMaxObserver(_MinMaxBase):
    """Exponential moving average of the per-batch min / max: the first batch initialises, then
    ``min = min + c * (batch_min - min)`` (float32, as torch.ao's
    ``MovingAverage(PerChannel)MinMaxObserver``). A batch (or a channel of it) without finite values
    leaves the average unchanged; a channel whose first finite values come later is initialised
    then."""

    kind = "ema"

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        c = self.spec.averaging_constant
        cur_ok = torch.isfinite(self.min_val) & torch.isfinite(self.max_val)
        new_ok = torch.isfinite(lo) & torch.isfinite(hi)
        both = cur_ok & new_ok
        ema_lo = self.min_val + c * (lo - self.min_val)
        ema_hi = self.max_val + c * (hi - self.max_val)
        self.min_val.copy_(torch.where(both, ema_lo, torch.where(new_ok, lo, self.min_val)))
        self.max_val.copy_(torch.where(both, ema_hi, torch.where(new_ok, hi, self.max_val)))

    @torch.no_grad()
    def synchronize(self) -> None:
        """Every rank's average becomes the mean of the ranks' averages (over the ranks with a
        finite value for that channel)."""
        world = _dist_world()
        if world == 1 or not self._sync_channels():
            return
        ok = torch.isfinite(self.min_val) & torch.isfinite(self.max_val)
        zero = torch.zeros_like(self.min_val)
        packed = torch.cat([ok.to(self.min_val.dtype), torch.where(ok, self.min_val, zero),
                            torch.where(ok, self.max_val, zero)]).to(torch.float64)
        _all_reduce(packed, "sum")
        c = self.min_val.numel()
        count, lo_sum, hi_sum = packed[:c], packed[c:2 * c], packed[2 * c:]
        seen = count > 0
        div = count.clamp(min=1)
        self.min_val.copy_(torch.where(seen, lo_sum / div, torch.full_like(lo_sum, _INF)).float())
        self.max_val.copy_(torch.where(seen, hi_sum / div, torch.full_like(hi_sum, -_INF)).float())


# --------------------------------------------------------------------------------------------------
# Histogram observer
# --------------------------------------------------------------------------------------------------


def _floor_pow2(v: float, e: int) -> int:
    """floor(v / 2^e), exact (also when v / 2^e underflows)."""
    q = math.ldexp(v, -e)
    f = math.floor(q)
    if v < 0 and q == 0.0:
        f = -1
    return int(f)


def histogram_grid(lo: float, hi: float, bins: int) -> Tuple[int, int]:
    """(exponent e, start s) of the histogram grid for the finite range [lo, hi]: the smallest
    power-of-two width ``w = 2^e`` (not below the float32 resolution of the data, about
    ``2^-40 * max|x|``) such that ``floor(hi / w) - floor(lo / w) <= bins - 1``; ``s = floor(lo / w)``.
    It only grows as [lo, hi] widens, and a grid of width ``2^e`` refines every coarser one."""
    m = max(abs(lo), abs(hi))
    e_floor = (math.frexp(m)[1] - 40) if m > 0 else -190
    span = hi - lo
    if span > 0:
        e = max(e_floor, math.frexp(span / bins)[1] - 2)
    else:
        e = e_floor
    while _floor_pow2(hi, e) - _floor_pow2(lo, e) > bins - 1:
        e += 1
    while e - 1 >= e_floor and _floor_pow2(hi, e - 1) - _floor_pow2(lo, e - 1) <= bins - 1:
        e -= 1
    return e, _floor_pow2(lo, e)


def rebin(hist: torch.Tensor, e_old: int, s_old: int, e_new: int, s_new: int, bins_new: Optional[int] = None
          ) -> torch.Tensor:
    """Exact re-binning of counts on grid (e_old, s_old) onto the coarser aligned grid (e_new, s_new)."""
    if bins_new is None:
        bins_new = hist.numel()
    if e_old == e_new and s_old == s_new and bins_new == hist.numel():
        return hist.clone()
    m = e_new - e_old
    if m < 0:
        raise RuntimeError(f"rebin: the new grid (2^{e_new}) is finer than the old one (2^{e_old})")
    absolute = torch.arange(hist.numel(), device=hist.device, dtype=torch.int64) + s_old
    target = torch.div(absolute, 2 ** min(m, 62), rounding_mode="floor") - s_new
    inside = (target >= 0) & (target < bins_new)
    if bool(((~inside) & (hist != 0)).any()):
        raise RuntimeError("rebin: the new grid does not cover the observed counts")
    out = torch.zeros(bins_new, dtype=hist.dtype, device=hist.device)
    out.index_add_(0, target[inside], hist[inside])
    return out


class HistogramObserver(ObserverBase):
    """Per-tensor int64 histogram (``spec.bins`` bins on a power-of-two aligned grid, see the module
    docstring) and the observed min / max. :meth:`calculate_qparams` chooses the clipping range by
    ``spec.histogram_method``:

    * ``"entropy"``: TensorRT's calibration: the threshold (symmetric: on |x|) whose clipped
      reference distribution P (outliers folded into the edge bins) has the smallest KL divergence
      to its quantized version Q (bins merged into the number of levels and expanded over the
      nonzero bins), searched exhaustively over bin edges, ties to the largest threshold; the bin at
      zero takes its neighbour's count (as NVIDIA's pytorch-quantization does, so a ReLU spike does
      not dominate). Affine specs search (lo, hi) pairs with ``quant_max - quant_min + 1`` levels
      (coarse-to-fine on a grid of bin edges).
    * ``"percentile"``: symmetric: the ``percentile`` of |x|; affine: the ``100 - percentile`` and
      ``percentile`` percentiles of x (linear inside a bin).
    * ``"mse"``: the range minimising the expected squared quantization error of the histogram
      (uniform density inside each bin, exact rounding / clipping integrals for the scale and zero
      point that range gives).

    The chosen range never exceeds the observed one, so a full-range choice equals the min/max
    observer's result. The search runs on the CPU in float64 on the integer counts, so CPU and CUDA
    observers give identical scales.
    """

    kind = "histogram"
    _resizable = ("min_val", "max_val")

    def __init__(self, spec: Optional[QuantSpec] = None, **fields):
        super().__init__(spec, **fields)
        if self.spec.axis is not None:
            raise ValueError(f"{self._label()}: per-channel histograms are not supported (axis={self.spec.axis})")
        b = self.spec.bins
        self.register_buffer("histogram", torch.zeros(b, dtype=torch.int64))
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("grid_exp", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("grid_start", torch.tensor(0, dtype=torch.int64))
        # Counts observed here since the last synchronisation (not persistent, not a buffer, so
        # that DDP does not broadcast it).
        self._local: Optional[torch.Tensor] = None

    @property
    def bins(self) -> int:
        return self.spec.bins

    def has_data(self) -> bool:
        return self.min_val.numel() > 0

    def _has_grid(self) -> bool:
        return self.has_data() and math.isfinite(float(self.min_val[0]))

    def _local_counts(self) -> torch.Tensor:
        if self._local is None:
            self._local = torch.zeros_like(self.histogram)
        elif self._local.device != self.histogram.device:
            self._local = self._local.to(self.histogram.device)
        return self._local

    def grid(self) -> Tuple[int, int]:
        return int(self.grid_exp), int(self.grid_start)

    def bin_edges(self) -> torch.Tensor:
        """float64 edges of the current histogram bins ([bins + 1])."""
        e, s = self.grid()
        return (torch.arange(self.bins + 1, dtype=torch.float64) + s) * (2.0 ** e)

    def _regrid(self, lo: float, hi: float) -> None:
        """Move the counts to the grid of [lo, hi] (finite)."""
        e_new, s_new = histogram_grid(lo, hi, self.bins)
        local = self._local_counts()
        if self._has_grid():
            e_old, s_old = self.grid()
            if (e_new, s_new) != (e_old, s_old):
                _set_(self.histogram, rebin(self.histogram, e_old, s_old, e_new, s_new))
                local.copy_(rebin(local, e_old, s_old, e_new, s_new))
        else:
            self.histogram.zero_()
            local.zero_()
        self.grid_exp.fill_(e_new)
        self.grid_start.fill_(s_new)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: expected a tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return x
        xd = x.detach()
        lo_b, hi_b = _ops().aminmax(xd, None)
        dev = self.histogram.device
        if not self.has_data():
            _set_(self.min_val, torch.full((1,), _INF, device=dev))
            _set_(self.max_val, torch.full((1,), -_INF, device=dev))
        lo = min(float(self.min_val[0]), float(lo_b[0]))
        hi = max(float(self.max_val[0]), float(hi_b[0]))
        if not math.isfinite(lo):
            return x  # no finite value so far
        self._regrid(lo, hi)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        e, s = self.grid()
        w = 2.0 ** e
        counts = _ops().histogram(xd, self.bins, s * w, (s + self.bins) * w).to(dev)
        self.histogram.add_(counts)
        self._local_counts().add_(counts)
        return x

    @torch.no_grad()
    def synchronize(self) -> None:
        if _dist_world() == 1:
            return
        dev = self.histogram.device
        finite = self._has_grid()
        head = torch.tensor(
            [1.0 if self.has_data() else 0.0,
             -float(self.min_val[0]) if finite else -_INF,
             float(self.max_val[0]) if finite else -_INF],
            dtype=torch.float64, device=dev)
        _all_reduce(head, "max")
        if head[0].item() == 0:
            return
        lo, hi = -head[1].item(), head[2].item()
        if not math.isfinite(lo):
            _set_(self.min_val, torch.full((1,), _INF, device=dev))
            _set_(self.max_val, torch.full((1,), -_INF, device=dev))
            return
        if not self.has_data():
            _set_(self.min_val, torch.full((1,), _INF, device=dev))
            _set_(self.max_val, torch.full((1,), -_INF, device=dev))
        self._regrid(lo, hi)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        local = self._local_counts()
        total = local.clone()
        _all_reduce(total, "sum")
        self.histogram.sub_(local).add_(total)
        local.zero_()

    def calculate_qparams(self, sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        if sync:
            self.synchronize()
        if not self.has_data():
            raise self._not_observed_error()
        if not self._has_grid():
            raise ValueError(f"{self._label()}: no finite values observed (all NaN/Inf)")
        e, s = self.grid()
        lo, hi = histogram_range(
            self.histogram.cpu(), e, s, float(self.min_val[0]), float(self.max_val[0]), self.spec)
        dev = self.histogram.device
        scale, zp = self._choose(torch.tensor([lo], dtype=torch.float32),
                                 torch.tensor([hi], dtype=torch.float32))
        return scale.to(dev), zp.to(dev)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._local = None  # the loaded counts count as synchronised


# --------------------------------------------------------------------------------------------------
# Range selection on a histogram (all in float64 on the CPU, in units of one bin)
# --------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # elements per candidate x bin block


def _chunked(cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor,
             b: torch.Tensor, width: int) -> torch.Tensor:
    step = max(1, _CHUNK // max(width, 1))
    out = [cost(a[i:i + step], b[i:i + step]) for i in range(0, a.numel(), step)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _pick(costs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the smallest cost; ties go to the widest range, then the smallest a."""
    best = costs.min()
    if not torch.isfinite(best):
        tied = torch.ones_like(costs, dtype=torch.bool)
    else:
        tied = costs == best
    width = torch.where(tied, b - a, torch.full_like(a, -(1 << 62)))
    wmax = width.max()
    idx = torch.nonzero(tied & (width == wmax))[:, 0]
    return int(idx[torch.argmin(a[idx])])


def kl_costs(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: int) -> torch.Tensor:
    """TensorRT KL divergence for candidate ranges [a_i, b_i) (bin indices) of histogram h (int64):
    P = h[a:b] with the counts below a added to bin a and those from b on to bin b - 1; Q = h[a:b]
    merged into ``levels`` equal groups of bins (bin j in group floor((j - a) * levels / (b - a))),
    each group's total spread evenly over its nonzero bins. Returns KL(P || Q) (inf where Q = 0 < P)."""
    K = h.numel()
    a = a.to(torch.int64)
    b = b.to(torch.int64)
    c = a.numel()
    cum = torch.zeros(K + 1, dtype=torch.int64)
    cum[1:] = torch.cumsum(h, 0)
    nz = (h > 0).to(torch.int64)
    cnz = torch.zeros(K + 1, dtype=torch.int64)
    cnz[1:] = torch.cumsum(nz, 0)
    total = float(cum[K])
    n = (b - a)[:, None]
    j = torch.arange(K, dtype=torch.int64)[None, :]
    inside = (j >= a[:, None]) & (j < b[:, None])
    group = torch.div((j - a[:, None]).clamp(min=0) * levels, n, rounding_mode="floor").clamp(max=levels - 1)
    lvl = torch.arange(levels + 1, dtype=torch.int64)[None, :]
    edges = a[:, None] + torch.div(lvl * n + levels - 1, levels, rounding_mode="floor")
    gsum = cum[edges[:, 1:]] - cum[edges[:, :-1]]
    gnz = cnz[edges[:, 1:]] - cnz[edges[:, :-1]]
    hj = h[None, :]
    q = torch.where(inside & (hj > 0),
                    gsum.gather(1, group).double() / gnz.gather(1, group).clamp(min=1).double(),
                    torch.zeros((), dtype=torch.float64))
    p = torch.where(inside, hj, torch.zeros((), dtype=torch.int64))
    rows = torch.arange(c)
    p[rows, a] += cum[a]
    p[rows, b - 1] += cum[K] - cum[b]
    p = p.double() / total
    qsum = q.sum(1, keepdim=True)
    q = q / torch.where(qsum > 0, qsum, torch.ones_like(qsum))
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros((), dtype=torch.float64))
    return terms.sum(1)


def _G(u: torch.Tensor) -> torch.Tensor:
    """Integral from 0 to u of (v - round(v))^2 dv."""
    n = torch.floor(u + 0.5)
    r = u - n
    return n / 12.0 + r * r * r / 3.0


def mse_costs(h: torch.Tensor, zero: int, lo: torch.Tensor, hi: torch.Tensor, quant_min: int,
              quant_max: int, symmetric: bool) -> torch.Tensor:
    """Expected squared error (sum over the histogram, in squared bin widths) of quantizing the data
    of histogram h (bin j = [j - zero, j - zero + 1) in bin units, uniform inside each bin) with the
    scale / zero point that choose_qparams gives for each candidate range [lo_i, hi_i]."""
    nzi = torch.nonzero(h)[:, 0]
    cnt = h[nzi].double()[None, :]
    x0 = (nzi - zero).double()[None, :]
    x1 = x0 + 1.0
    lo = lo.double()[:, None]
    hi = hi.double()[:, None]
    if symmetric:
        delta = torch.maximum(-lo, hi) / ((quant_max - quant_min) / 2.0)
        z = torch.full_like(delta, 0.0 if quant_min < 0 else float((quant_min + quant_max + 1) // 2))
    else:
        delta = (hi - lo) / float(quant_max - quant_min)
        delta = delta.clamp(min=1e-12)
        z = (quant_min - torch.round(lo / delta)).clamp(quant_min, quant_max)
    delta = delta.clamp(min=1e-12)
    lq = (quant_min - z) * delta
    hq = (quant_max - z) * delta
    r0 = torch.minimum(torch.maximum(x0, lq), hq)
    r1 = torch.minimum(torch.maximum(x1, lq), hq)
    rounding = delta ** 3 * (_G(r1 / delta) - _G(r0 / delta))
    a_hi = torch.maximum(x0, hq)
    clip_hi = torch.where(x1 > hq, ((x1 - hq) ** 3 - (a_hi - hq) ** 3) / 3.0, torch.zeros((), dtype=torch.float64))
    b_lo = torch.minimum(x1, lq)
    clip_lo = torch.where(x0 < lq, ((lq - x0) ** 3 - (lq - b_lo) ** 3) / 3.0, torch.zeros((), dtype=torch.float64))
    return (cnt * (rounding + clip_hi + clip_lo)).sum(1)


def _quantile_position(h: torch.Tensor, q: float) -> float:
    """Position (in bins, from the start of h) of quantile q of the counts, linear inside a bin."""
    cum = torch.cumsum(h, 0)
    total = int(cum[-1])
    target = q * total
    k = int(torch.searchsorted(cum.double(), torch.tensor([target], dtype=torch.float64))[0])
    k = min(k, h.numel() - 1)
    below = int(cum[k - 1]) if k > 0 else 0
    return k + (target - below) / max(int(h[k]), 1)


def _search_1d(cost: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, width: int) -> int:
    """argmin of cost over the sorted candidate values (ties to the largest value): exhaustive up
    to 2048 candidates, else a 512-point scan and an exhaustive pass around its best."""

    def run(ts: torch.Tensor) -> int:
        costs = _chunked(lambda t, _: cost(t), ts, ts, width)
        best = costs.min()
        tied = (costs == best) if torch.isfinite(best) else torch.ones_like(costs, dtype=torch.bool)
        return int(torch.nonzero(tied)[-1, 0])

    n = values.numel()
    if n <= 2048:
        return int(values[run(values)])
    stride = -(-n // 512)
    idx = torch.unique(torch.cat([torch.arange(0, n, stride), torch.tensor([n - 1])]))
    i = int(idx[run(values[idx])])
    window = torch.arange(max(0, i - stride), min(n - 1, i + stride) + 1)
    return int(values[window[run(values[window])]])


def _search_2d(cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a_values: torch.Tensor,
               b_values: torch.Tensor, valid: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               width: int, points: int = 16) -> Tuple[int, int]:
    """Coarse-to-fine argmin over pairs (a, b) of the sorted candidate values: a grid of about
    ``points`` x ``points`` candidate indices, narrowed around the best pair until the index step is
    1. Ties go to the widest range."""
    na, nb = a_values.numel(), b_values.numel()
    (a0, a1), (b0, b1) = (0, na - 1), (0, nb - 1)
    best: Optional[Tuple[int, int]] = None
    while True:
        sa = max(1, -(-(a1 - a0) // (points - 1)))
        sb = max(1, -(-(b1 - b0) // (points - 1)))
        ai = torch.unique(torch.cat([torch.arange(a0, a1 + 1, sa), torch.tensor([a1])]))
        bi = torch.unique(torch.cat([torch.arange(b0, b1 + 1, sb), torch.tensor([b1])]))
        IA = ai[:, None].expand(-1, bi.numel()).reshape(-1)
        IB = bi[None, :].expand(ai.numel(), -1).reshape(-1)
        if best is not None:
            IA = torch.cat([IA, torch.tensor([best[0]])])
            IB = torch.cat([IB, torch.tensor([best[1]])])
        A, B = a_values[IA], b_values[IB]
        keep = valid(A, B)
        IA, IB, A, B = IA[keep], IB[keep], A[keep], B[keep]
        i = _pick(_chunked(cost, A, B, width), A, B)
        best = (int(IA[i]), int(IB[i]))
        if sa == 1 and sb == 1:
            return int(a_values[best[0]]), int(b_values[best[1]])
        a0, a1 = max(0, best[0] - sa), min(na - 1, best[0] + sa)
        b0, b1 = max(0, best[1] - sb), min(nb - 1, best[1] + sb)


def histogram_range(hist: torch.Tensor, grid_exp: int, grid_start: int, min_val: float, max_val: float,
                    spec: QuantSpec) -> Tuple[float, float]:
    """The clipping range (lo, hi) that spec.histogram_method chooses for the counts ``hist``
    (int64, CPU) on the grid (grid_exp, grid_start) of data with observed range [min_val, max_val].
    Symmetric specs get ``(-T, T)``."""
    bins = hist.numel()
    lo0, hi0 = min(min_val, 0.0), max(max_val, 0.0)
    max_abs = max(-lo0, hi0)
    # A grid that contains 0 (a bin edge): exact re-binning.
    e, s = histogram_grid(lo0, hi0, bins)
    h = rebin(hist.to(torch.int64), grid_exp, grid_start, e, s)
    w = 2.0 ** e
    zero = -s  # index of the bin [0, w)
    qmin, qmax = spec.quant_min, spec.quant_max
    method = spec.histogram_method
    nzi = torch.nonzero(h)[:, 0]
    first_nz, last_nz = int(nzi[0]), int(nzi[-1])

    if spec.symmetric:
        K = max(bins - zero, zero)
        f = torch.zeros(K, dtype=torch.int64)
        pos = h[zero:]
        f[:pos.numel()] += pos
        neg = h[:zero].flip(0)
        f[:neg.numel()] += neg
        K = int(torch.nonzero(f)[-1, 0]) + 1
        f = f[:K]
        if method == "percentile":
            t = _quantile_position(f, spec.percentile / 100.0)
        elif method == "entropy":
            levels = (qmax - qmin + 1) // 2
            f2 = f.clone()
            if K > 1:
                f2[0] = f2[1]
            if K <= levels or int(f2.sum()) == 0:
                t = K
            else:
                # Thresholds whose last bin is empty get an infinite divergence whenever counts lie
                # beyond them, and equal a smaller threshold otherwise: only nonzero bins' right edges.
                ts = torch.nonzero(f2[levels - 1:])[:, 0] + levels
                t = _search_1d(lambda t_: kl_costs(f2, torch.zeros_like(t_), t_, levels), ts, K)
        else:  # mse
            pad = K
            hs = torch.zeros(2 * pad, dtype=torch.int64)
            lo_i, hi_i = max(0, zero - pad), min(bins, zero + pad)
            hs[lo_i - zero + pad:hi_i - zero + pad] = h[lo_i:hi_i]
            t = _search_1d(lambda ts: mse_costs(hs, pad, -ts.double(), ts.double(), qmin, qmax, True),
                           torch.arange(1, K + 1), int((hs > 0).sum()))
        T = min(t * w, max_abs)
        return -T, T

    # affine
    if method == "percentile":
        p = spec.percentile / 100.0
        lo = (_quantile_position(h, 1.0 - p) - zero) * w if p < 1.0 else min_val
        hi = (_quantile_position(h, p) - zero) * w
        hi = min(max(hi, min_val), max_val)
        return min(max(lo, min_val), hi), hi
    a_first, b_last = min(first_nz, zero), max(last_nz + 1, zero)
    if method == "entropy":
        levels = qmax - qmin + 1
        h2 = h.clone()
        if zero + 1 < bins:
            h2[zero] = h2[zero + 1]
        if b_last - a_first <= levels or int(h2.sum()) == 0:
            return lo0, hi0
        # As in the symmetric case, only edges next to nonzero bins (and 0) are candidates.
        nz2 = torch.nonzero(h2)[:, 0]
        a_values = torch.unique(torch.cat([nz2[nz2 < zero], torch.tensor([zero])]))
        b_values = torch.unique(torch.cat([torch.tensor([zero]), nz2[nz2 >= zero] + 1]))
        h2 = h2[a_first:b_last]  # the bins outside are empty
        a, b = _search_2d(lambda A, B: kl_costs(h2, A - a_first, B - a_first, levels), a_values, b_values,
                          lambda A, B: (B - A) >= levels, h2.numel())
    else:  # mse
        a, b = _search_2d(
            lambda A, B: mse_costs(h, zero, (A - zero).double(), (B - zero).double(), qmin, qmax, False),
            torch.arange(a_first, zero + 1), torch.arange(zero, b_last + 1), lambda A, B: B > A,
            int(nzi.numel()))
    return max((a - zero) * w, lo0), min((b - zero) * w, hi0)


# --------------------------------------------------------------------------------------------------


def make_observer(spec: QuantSpec) -> ObserverBase:
    """The observer that ``spec.observer`` names, configured by spec."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"make_observer: spec must be a QuantSpec, got {type(spec).__name__}")
    cls = {"minmax": MinMaxObserver, "ema": MovingAverageMinMaxObserver, "histogram": HistogramObserver}[spec.observer]
    return cls(spec)

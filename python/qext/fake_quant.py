"""FakeQuantize: an observer followed by fake quantization, the unit that QAT modules put on their
weights (``weight_fake_quant``) and outputs (``activation_post_process``).

Straight-through mode (``spec.learnable`` False): each forward with the observer enabled records
statistics and, with fake quantization enabled, refreshes the ``scale`` / ``zero_point`` buffers
from the observer (``calculate_qparams``) and applies ``qext.fake_quantize`` (clipped
straight-through gradient). With fake quantization disabled the observer only records (no
qparams are derived, which matters for the histogram observer); the buffers are refreshed by
:meth:`FakeQuantize.calculate_qparams`, by re-enabling fake quantization, and before
``state_dict()`` is taken.

Learnable mode (LSQ / LSQ+, ``spec.learnable`` True): ``scale`` is a Parameter (``zero_point`` too
when the spec is affine; a float buffer when symmetric) trained through
``qext.fake_quantize_learnable``. They are initialised on the first batch seen with the observer
enabled:

* symmetric (LSQ): ``scale = 2 * mean(|x|) / sqrt(quant_max)`` per tensor or per channel (finite
  values only), zero point fixed (0 for signed ranges);
* affine (LSQ+): scale and zero point from the observer's statistics of that batch (min/max).

After that the observer is not run any more in learnable mode. The gradient scale is
``grad_factor = 1 / sqrt(numel_per_scale * quant_max)`` (LSQ). The forward pass uses
``max(scale, eps)`` with a straight-through gradient (``s + (clamp(s, eps) - s).detach()``), so a
step that drives a scale negative is still differentiable and recoverable.

Distributed: in training mode the forward synchronises the observer statistics (a collective; all
ranks run the forward in DDP), and the LSQ initialisation is averaged over the ranks. In eval mode
the forward does not communicate (rank-0-only evaluation must not deadlock);
:meth:`FakeQuantize.calculate_qparams` always synchronises.

This module is ``qext.fake_quant`` (not ``fake_quantize``) so that importing it never shadows the
function ``qext.fake_quantize``.

Per-channel parameters are created with one element and take their channel count from the first
batch (pass ``num_channels`` to create them at full size, e.g. before building an optimizer or
wrapping the model in DDP).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .functional import fake_quantize, fake_quantize_learnable
from .observer import ObserverBase, _all_reduce, _dist_world, _set_, make_observer, normalize_axis
from .qconfig import QuantSpec, SpecShortcuts

__all__ = [
    "FakeQuantize",
    "set_module_names",
    "enable_observer",
    "disable_observer",
    "enable_fake_quant",
    "disable_fake_quant",
]

_EPS = float(torch.finfo(torch.float32).eps)


def _symmetric_zero_point(spec: QuantSpec) -> int:
    return 0 if spec.quant_min < 0 else (spec.quant_min + spec.quant_max + 1) // 2


class FakeQuantize(SpecShortcuts, nn.Module):
    """Observer + fake quantization for one tensor, configured by a :class:`QuantSpec`.

    State (all in ``state_dict``): ``scale`` (float32, ``[1]`` or ``[C]``; a Parameter in learnable
    mode), ``zero_point`` (int32 buffer; float32 in learnable mode, a Parameter when affine),
    ``fake_quant_enabled`` / ``observer_enabled`` (uint8 flags), ``initialized`` (learnable mode),
    and the observer's buffers under ``observer.``.
    """

    _resizable = ("scale", "zero_point")

    def __init__(self, spec: QuantSpec, num_channels: Optional[int] = None):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"FakeQuantize: spec must be a QuantSpec, got {type(spec).__name__}")
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"FakeQuantize: num_channels must be a positive integer, got {num_channels!r}")
        self.spec = spec
        self.observer: ObserverBase = make_observer(spec)
        n = num_channels if (spec.axis is not None and num_channels) else 1
        zp0 = _symmetric_zero_point(spec) if spec.symmetric else 0
        if spec.learnable:
            self.scale = nn.Parameter(torch.ones(n))
            if spec.symmetric:
                self.register_buffer("zero_point", torch.full((n,), float(zp0)))
            else:
                self.zero_point = nn.Parameter(torch.full((n,), float(zp0)))
            self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8))
        else:
            self.register_buffer("scale", torch.ones(n))
            self.register_buffer("zero_point", torch.full((n,), zp0, dtype=torch.int32))
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        # Python mirrors of the flags: no device sync per forward.
        self._fake_quant_on = True
        self._observer_on = True
        self._initialized = False
        self._stale = False
        self._module_name = ""

    # -- configuration ----------------------------------------------------------------------------
    @property
    def module_name(self) -> str:
        return self._module_name

    @module_name.setter
    def module_name(self, name: str) -> None:
        self._module_name = name
        self.observer.module_name = name

    def _label(self) -> str:
        return f"FakeQuantize '{self._module_name}'" if self._module_name else "FakeQuantize"

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self._observer_on = bool(enabled)
        self.observer_enabled.fill_(int(self._observer_on))
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self._fake_quant_on = bool(enabled)
        self.fake_quant_enabled.fill_(int(self._fake_quant_on))
        if self._fake_quant_on and self._stale:
            self._refresh()
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"bits={s.bits}", f"quant_min={s.quant_min}", f"quant_max={s.quant_max}",
                 f"symmetric={s.symmetric}", f"observer={s.observer!r}"]
        if s.axis is not None:
            parts.append(f"axis={s.axis}")
        if s.learnable:
            parts.append("learnable=True")
        parts.append(f"fake_quant_enabled={self._fake_quant_on}, observer_enabled={self._observer_on}")
        return ", ".join(parts)

    # -- parameters -------------------------------------------------------------------------------
    def _set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            if isinstance(self.scale, nn.Parameter):
                if self.scale.shape != scale.shape:
                    self.scale.data = torch.empty(scale.shape, dtype=self.scale.dtype, device=self.scale.device)
                self.scale.data.copy_(scale)
            else:
                _set_(self.scale, scale.to(self.scale.dtype))
            if isinstance(self.zero_point, nn.Parameter):
                if self.zero_point.shape != zero_point.shape:
                    self.zero_point.data = torch.empty(zero_point.shape, dtype=self.zero_point.dtype,
                                                       device=self.zero_point.device)
                self.zero_point.data.copy_(zero_point)
            else:
                _set_(self.zero_point, zero_point.to(self.zero_point.dtype))

    def _refresh(self, sync: bool = True) -> None:
        scale, zp = self.observer.calculate_qparams(sync=sync)
        self._set_qparams(scale, zp)
        self._stale = False

    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The current ``(scale float32, zero_point int32)``, as an integer model uses them.
        Straight-through mode: derived from the observer (synchronised across ranks) and stored in
        the buffers. Learnable mode: ``max(scale, eps)`` and the zero point rounded half to even and
        clamped to the range, as ``fake_quantize_learnable`` uses them."""
        if self.spec.learnable:
            if not self._initialized:
                raise ValueError(f"{self._label()}: calculate_qparams called before the learnable "
                                 "scale was initialised (no data was observed)")
            with torch.no_grad():
                scale = self.scale.detach().float().clamp(min=_EPS).clone()
                zp = torch.round(self.zero_point.detach().double()).clamp(self.quant_min, self.quant_max)
                return scale, zp.to(torch.int32)
        self._refresh(sync=True)
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = normalize_axis(self.axis, x.dim(), self._label(), x.shape)
        if self.spec.learnable:
            return self._forward_learnable(x, axis)
        if self._observer_on and self._fake_quant_on and self._can_fuse_observe(x):
            return self._observe_and_fake_quantize(x, axis)
        if self._observer_on:
            self.observer(x.detach())
            if self._fake_quant_on:
                self._refresh(sync=self.training)
            else:
                self._stale = True
        if self._fake_quant_on:
            return fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max, axis=axis)
        return x

    def _can_fuse_observe(self, x: torch.Tensor) -> bool:
        """Whether one torch.ops.qext.fake_quantize_observe call can do this step: a min/max or EMA
        observer that already holds statistics of the right size (the first batch sizes them in
        Python), on one process (several ranks synchronise in Python), with the buffers' dtypes."""
        obs = self.observer
        return (
            obs.kind in ("minmax", "ema")
            and obs.has_data()
            and x.numel() > 0
            and _dist_world() == 1
            and self.scale.shape == obs.min_val.shape
            and self.zero_point.dtype == torch.int32
            and obs.min_val.device == x.device
        )

    def _observe_and_fake_quantize(self, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
        averaging = self.spec.averaging_constant if self.observer.kind == "ema" else None
        try:
            return torch.ops.qext.fake_quantize_observe(
                x, self.observer.min_val, self.observer.max_val, self.scale, self.zero_point, averaging,
                self.quant_min, self.quant_max, self.spec.symmetric, axis, True)
        except ValueError as error:  # name the module (nothing was changed by the failed call)
            raise ValueError(f"{self._label()}: {error}") from None

    def _forward_learnable(self, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
        if self._observer_on and not self._initialized and x.numel() > 0:
            self._initialize_learnable(x.detach(), axis)
        if not self._fake_quant_on:
            return x
        s = self.scale
        s = s + (s.clamp(min=_EPS) - s).detach()  # value max(s, eps), gradient straight through
        per_scale = x.numel() / max(self.scale.numel(), 1)
        grad_factor = 1.0 / math.sqrt(max(per_scale, 1.0) * max(self.quant_max, 1))
        return fake_quantize_learnable(x, s, self.zero_point, self.quant_min, self.quant_max,
                                       grad_factor=grad_factor, axis=axis)

    @torch.no_grad()
    def _initialize_learnable(self, x: torch.Tensor, axis: Optional[int]) -> None:
        sync = self.training and _dist_world() > 1
        if self.spec.symmetric:
            scale = self._lsq_init_scale(x, axis)
            if sync:
                scale = scale.double()
                _all_reduce(scale, "sum")
                scale = (scale / _dist_world()).float()
            zp = torch.full_like(scale, float(_symmetric_zero_point(self.spec)))
        else:
            self.observer(x)
            scale, zp = self.observer.calculate_qparams(sync=self.training)
            zp = zp.float()
        self._set_qparams(scale.clamp(min=_EPS), zp)
        self.initialized.fill_(1)
        self._initialized = True

    def _lsq_init_scale(self, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
        """2 * mean(|x|) / sqrt(quant_max) over the finite values, per tensor or per channel."""
        a = x.abs()
        finite = torch.isfinite(a)
        a = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device))
        if axis is None:
            total = a.sum(dtype=torch.float64).reshape(1)
            count = finite.sum().reshape(1)
        else:
            dims = [d for d in range(x.dim()) if d != axis]
            total = a.sum(dim=dims, dtype=torch.float64) if dims else a.double()
            count = finite.sum(dim=dims) if dims else finite.long()
        if bool((count == 0).any()):
            c = int((count == 0).nonzero()[0, 0])
            where = f" in channel {c}" if axis is not None else ""
            raise ValueError(f"{self._label()}: no finite values observed (all NaN/Inf){where}; "
                             "cannot initialise the learnable scale")
        mean = total / count.double()
        return (2.0 * mean / math.sqrt(max(self.quant_max, 1))).float().to(self.scale.device)

    # -- state dict -------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._stale and not self.spec.learnable and self.observer.has_data():
            try:
                self._refresh(sync=False)
            except ValueError:
                pass  # nothing finite observed yet: keep the previous parameters
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._resizable:
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and cur.shape != state_dict[key].shape:
                with torch.no_grad():
                    if isinstance(cur, nn.Parameter):
                        cur.data = torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
                    else:
                        cur.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.observer_enabled[0])
        if self.spec.learnable:
            self._initialized = bool(self.initialized[0])
        self._stale = False


# --------------------------------------------------------------------------------------------------
# Helpers over whole models (use with model.apply or directly)
# --------------------------------------------------------------------------------------------------


def set_module_names(model: nn.Module, prefix: str = "") -> nn.Module:
    """Give every FakeQuantize / observer in model its qualified name, used in error messages."""
    owned = set()
    for name, mod in model.named_modules(prefix=prefix):
        if isinstance(mod, FakeQuantize):
            mod.module_name = name  # also names its observer
            owned.add(id(mod.observer))
        elif isinstance(mod, ObserverBase) and id(mod) not in owned:
            mod.module_name = name
    return model


def _each_fake_quantize(module: nn.Module):
    for m in module.modules():
        if isinstance(m, FakeQuantize):
            yield m


def enable_observer(module: nn.Module) -> nn.Module:
    for m in _each_fake_quantize(module):
        m.enable_observer(True)
    return module


def disable_observer(module: nn.Module) -> nn.Module:
    for m in _each_fake_quantize(module):
        m.enable_observer(False)
    return module


def enable_fake_quant(module: nn.Module) -> nn.Module:
    for m in _each_fake_quantize(module):
        m.enable_fake_quant(True)
    return module


def disable_fake_quant(module: nn.Module) -> nn.Module:
    for m in _each_fake_quantize(module):
        m.enable_fake_quant(False)
    return module


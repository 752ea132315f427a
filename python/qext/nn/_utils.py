"""Helpers shared by the QAT modules (``qext.nn``), the converted modules (``qext.nn.quantized``) and the
workflow (``qext.quantization``): building fake-quantizers from a QConfig, reading their current
quantization parameters, and describing a QConfig in a state dict.

Everything that touches a :class:`qext.fake_quant.FakeQuantize` from outside goes through the few
functions here (``spec``, ``calculate_qparams``, ``observer.has_data``, ``initialized``,
``enable_observer`` / ``enable_fake_quant``), so the modules depend on its interface in one place only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import torch
from torch import nn

# Version of the dictionaries written by ``get_extra_state`` of the qext modules.
EXTRA_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# FakeQuantize construction and queries
# --------------------------------------------------------------------------------------------------


def make_fake_quant(spec) -> Optional[nn.Module]:
    """A FakeQuantize for ``spec``, or None when the spec is None (that tensor stays in float)."""
    if spec is None:
        return None
    # Imported when first needed, so that `import qext.nn` does not load qext.fake_quantize (a submodule
    # whose name is also that of the function qext.fake_quantize; see the package __init__).
    from ..fake_quant import FakeQuantize

    return FakeQuantize(spec)


def fq_range(fq: nn.Module) -> tuple[int, int]:
    spec = fq.spec
    return int(spec.quant_min), int(spec.quant_max)


def fq_axis(fq: nn.Module) -> Optional[int]:
    return fq.spec.axis


def fq_qparams(fq: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale (float32) and zero point (int32) the fake-quantizer applies, as an integer model uses
    them (``FakeQuantize.calculate_qparams``: a learnable scale clamped to eps, a learnable zero point
    rounded half to even and clamped); detached copies, shape ``[1]`` or ``[C]``."""
    scale, zp = fq.calculate_qparams()
    return scale.detach().to(torch.float32).reshape(-1).clone(), zp.detach().to(torch.int32).reshape(-1).clone()


def fq_has_data(fq: nn.Module) -> bool:
    """Whether the fake-quantizer's parameters come from data: a learnable quantizer that was
    initialised, or an observer that saw a (non-empty) input."""
    if fq.spec.learnable:
        return bool(fq.initialized.reshape(-1)[0])
    return bool(fq.observer.has_data())


def set_module_names(model: nn.Module) -> None:
    """Name every FakeQuantize / observer after its place in the model (for error messages)."""
    from ..fake_quant import set_module_names as _set

    _set(model)


def fq_set_observer(fq: nn.Module, enabled: bool) -> None:
    fq.enable_observer(enabled)


def fq_set_fake_quant(fq: nn.Module, enabled: bool) -> None:
    fq.enable_fake_quant(enabled)


def is_fake_quant(m: nn.Module) -> bool:
    from ..fake_quant import FakeQuantize

    return isinstance(m, FakeQuantize)


# --------------------------------------------------------------------------------------------------
# Integer ranges, storage types and quantized tensors (the carrier between converted modules)
# --------------------------------------------------------------------------------------------------


def range_bits(quant_min: int, quant_max: int) -> int:
    """Bits needed to store the levels of [quant_min, quant_max]."""
    return max(1, math.ceil(math.log2(quant_max - quant_min + 1)))


def qtensor_dtype(quant_min: int, quant_max: int) -> torch.dtype:
    """The PyTorch quantized dtype that carries values of [quant_min, quant_max]."""
    if quant_min >= 0 and quant_max <= 255:
        return torch.quint8
    if quant_min >= -128 and quant_max <= 127:
        return torch.qint8
    return torch.qint32


_INT_STORAGE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}


def make_qtensor(q: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int):
    """Wraps integer levels ``q`` (any integer dtype, values in [quant_min, quant_max]) as a PyTorch
    per-tensor affine quantized tensor (quint8 / qint8 / qint32). ``scale`` and ``zero_point``: numbers or
    one-element tensors."""
    storage = _INT_STORAGE[qtensor_dtype(quant_min, quant_max)]
    if q.dtype != storage:  # qext.quantize already stores this dtype; even a no-op .to() costs 1 us
        q = q.to(storage)
    return torch._make_per_tensor_quantized_tensor(q, float(scale), int(zero_point))


# From this many elements on, qtensor_levels views the quantized tensor's memory instead of copying it
# with int_repr (not vectorized in torch: about 0.5 ns per element, against a few us for the view).
_LEVELS_VIEW_NUMEL = 4096


def qtensor_levels(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(integer levels, scale, zero point) of a per-tensor affine quantized tensor. The levels may share
    ``x``'s memory: read them, do not write them."""
    if x.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise TypeError(f"expected a per-tensor quantized tensor, got qscheme {x.qscheme()}")
    # A trace would record the view's storage as a constant (and numel() as a traced value): traces copy.
    if torch.jit.is_tracing() or x.numel() < _LEVELS_VIEW_NUMEL:
        levels = x.int_repr()
    else:
        levels = torch.empty(0, dtype=_INT_STORAGE[x.dtype], device=x.device).set_(
            x.untyped_storage(), x.storage_offset(), x.size(), x.stride()
        )
    return levels, x.q_scale(), x.q_zero_point()


@functools.lru_cache(maxsize=256)
def _qparam_tensors(scale: float, zero_point: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``zero_point`` as the one-element tensors the ops take. Cached: a converted model meets
    the same few pairs on every call, and building two tensors costs more than dequantizing a small
    activation. Made outside inference mode, so a pair first met there serves ordinary calls too; the ops
    only read them."""
    with torch.inference_mode(False):
        return (torch.tensor([scale], dtype=torch.float32, device=device),
                torch.tensor([zero_point], dtype=torch.int32, device=device))


def dequantize_any(x):
    """float32 values of a quantized tensor, exactly ``(q - z) * s`` as qext's fake-quant computes them;
    other inputs are returned unchanged."""
    if isinstance(x, torch.Tensor) and x.is_quantized:
        if x.is_cpu:  # straight from the quantized tensor: no levels view, no parameter tensors
            return torch.ops.qext.dequantize_per_tensor.default(x)
        q, s, z = qtensor_levels(x)
        return torch.ops.qext.dequantize.default(q, *_qparam_tensors(s, z, q.device), None, None)
    return x


# --------------------------------------------------------------------------------------------------
# QConfig descriptions (extra state of the qext modules)
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value reduced to Python builtins (so that ``torch.load(weights_only=True)`` reads it)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def spec_description(spec) -> Optional[dict]:
    return None if spec is None else _plain(spec)


def qconfig_description(qconfig) -> Optional[dict]:
    if qconfig is None:
        return None
    return {
        "activation": spec_description(getattr(qconfig, "activation", None)),
        "weight": spec_description(getattr(qconfig, "weight", None)),
    }


def extra_state_compatible(saved: Any, expected: Any) -> bool:
    """Whether a module's saved extra state may be loaded into a module with ``expected``: equal, or
    saved from the float version of the same module (qconfig None: there is no quantization state to
    restore, e.g. a float model's QuantStub)."""
    if saved == expected:
        return True
    return (
        isinstance(saved, dict)
        and isinstance(expected, dict)
        and "qconfig" in saved
        and saved["qconfig"] is None
        and saved.get("module") == expected.get("module")
    )


def describe_difference(saved: Any, expected: Any, path: str = "") -> str:
    """A short human description of the first differences between two plain descriptions."""
    diffs: list[str] = []

    def walk(a, b, p):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{p}.{k}" if p else k)
        elif a != b:
            diffs.append(f"{p or 'value'}: saved {a!r}, model has {b!r}")

    walk(saved, expected, path)
    if not diffs:
        return "no difference"
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    return "; ".join(diffs[:4]) + more

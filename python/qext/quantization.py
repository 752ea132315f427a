"""Eager-mode quantization workflow: fuse, prepare_qat / prepare (+ calibrate), convert, quantize_dynamic,
model_size, and a state-dict check that refuses a state dict saved with another quantization config.

Typical QAT::

    model = qext.fuse(float_model)                              # Conv-BN(-ReLU), Conv-ReLU, Linear-ReLU
    qat = qext.prepare_qat(model, qext.get_qconfig("int8"), overrides={"classifier": None})
    ... train qat ...
    int_model = qext.convert(qat.eval())

Post-training static quantization::

    prepared = qext.prepare(qext.fuse(float_model.eval()), qext.get_qconfig("int8_histogram"))
    qext.calibrate(prepared, batches)                            # observers on, fake quant off
    int_model = qext.convert(prepared)

Dynamic quantization: ``qext.quantize_dynamic(model)`` (int8 weights, activations quantized per batch).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from .nn import _utils
from .nn import quantized as nnq
from .nn.fused import FUSED_TYPES, FusedConvBn2d, FusedConvBnReLU2d, FusedConvReLU2d, FusedLinearReLU
from .nn.kmeans import KMEANS_MODULES, KMeansConv2d, KMeansLinear
from .nn.qat import (
    QAT_MODULES,
    AdaptiveAvgPool2d,
    AvgPool2d,
    ConvBn2d,
    ConvBnReLU2d,
    ConvReLU2d,
    DeQuantStub,
    LinearReLU,
    QAdd,
    QConv2d,
    QLinear,
    QuantStub,
)

__all__ = [
    "LayerSize",
    "ModelSize",
    "QuantizationWarning",
    "StateDictMismatchError",
    "calibrate",
    "check_state_dict",
    "convert",
    "enable_fake_quant",
    "enable_observer",
    "freeze_bn_stats",
    "fuse",
    "load_state_dict",
    "model_size",
    "prepare",
    "prepare_qat",
    "quantize_dynamic",
]


class QuantizationWarning(UserWarning):
    """Warnings of the qext workflow (e.g. a module type left in float because it is not supported)."""


class StateDictMismatchError(RuntimeError):
    """A state dict that does not fit the model's quantization layout; nothing was loaded."""


# --------------------------------------------------------------------------------------------------
# torch.ao interoperability: its fused float containers and stubs are accepted like qext's own
# --------------------------------------------------------------------------------------------------


def _ao_types() -> dict:
    out = {}
    try:
        import torch.ao.nn.intrinsic as nni

        out.update({nni.ConvBn2d: ConvBn2d, nni.ConvBnReLU2d: ConvBnReLU2d, nni.ConvReLU2d: ConvReLU2d,
                    nni.LinearReLU: LinearReLU})
    except (ImportError, AttributeError):  # pragma: no cover - torch without torch.ao
        pass
    try:
        import torch.ao.quantization as tq

        out.update({tq.QuantStub: QuantStub, tq.DeQuantStub: DeQuantStub})
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return out


# float module type -> QAT module type (exact type match, as torch.ao does: subclasses such as
# MultiheadAttention's NonDynamicallyQuantizableLinear are not swapped)
_QAT_SWAP: dict = {
    nn.Linear: QLinear,
    nn.Conv2d: QConv2d,
    FusedConvBn2d: ConvBn2d,
    FusedConvBnReLU2d: ConvBnReLU2d,
    FusedConvReLU2d: ConvReLU2d,
    FusedLinearReLU: LinearReLU,
    nn.AvgPool2d: AvgPool2d,
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d,
    **_ao_types(),
}

_FUSE_PATTERNS = (
    ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), FusedConvBnReLU2d),
    ((nn.Conv2d, nn.BatchNorm2d), FusedConvBn2d),
    ((nn.Conv2d, nn.ReLU), FusedConvReLU2d),
    ((nn.Linear, nn.ReLU), FusedLinearReLU),
)


# Every module type that prepare_qat / prepare make.
_QAT_TYPES = QAT_MODULES + KMEANS_MODULES


def _qat_target(mod: nn.Module):
    """The QAT class a float module becomes, or None."""
    t = type(mod)
    if t in (QuantStub, QAdd):
        return t if mod.qconfig is None else None  # a float stub / add (qconfig None) gets one
    return _QAT_SWAP.get(t)


def _is_qext_module(mod: nn.Module) -> bool:
    return isinstance(mod, _QAT_TYPES) or isinstance(mod, nnq.QUANTIZED_MODULES)


def _resolve_qconfig(qconfig):
    if isinstance(qconfig, str):
        from .qconfig import get_qconfig

        return get_qconfig(qconfig)
    return qconfig


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, last = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, last, new)


def _get_submodule(root: nn.Module, name: str, who: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{who}: the model has no submodule named {name!r}") from None


# --------------------------------------------------------------------------------------------------
# fuse
# --------------------------------------------------------------------------------------------------


def fuse(model: nn.Module, modules_to_fuse: Optional[Iterable] = None, inplace: bool = False) -> nn.Module:
    """Fuse Conv2d-BatchNorm2d(-ReLU), Conv2d-ReLU and Linear-ReLU into the float containers
    ``qext.nn.FusedConvBnReLU2d`` / ``FusedConvBn2d`` / ``FusedConvReLU2d`` / ``FusedLinearReLU``, which
    prepare_qat / prepare turn into single QAT modules (BN folded into the weights). The first module of
    a pattern is replaced by the fused container, the others by ``nn.Identity``; the float model computes
    exactly what it computed before.

    ``modules_to_fuse=None``: every run of these types (exact types, consecutive) inside any
    ``nn.Sequential`` is fused. Otherwise a list of name lists, e.g. ``[["conv1", "bn1", "relu1"],
    ["fc1", "act"]]`` (dotted names), or one name list; a name that does not exist or a sequence of types
    that is not a pattern raises ValueError.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if modules_to_fuse is None:
        for mod in list(model.modules()):
            if isinstance(mod, nn.Sequential) and not isinstance(mod, FUSED_TYPES):
                _fuse_sequential(mod)
        return model
    groups = list(modules_to_fuse)
    if groups and isinstance(groups[0], str):
        groups = [groups]
    for group in groups:
        names = list(group)
        if len(set(names)) != len(names):
            raise ValueError(f"fuse: a module appears twice in {names}")
        mods = [_get_submodule(model, n, "fuse") for n in names]
        types = tuple(type(m) for m in mods)
        cls = next((c for pattern, c in _FUSE_PATTERNS if pattern == types), None)
        if cls is None:
            supported = ", ".join("(" + ", ".join(t.__name__ for t in p) + ")" for p, _ in _FUSE_PATTERNS)
            got = ", ".join(t.__name__ for t in types)
            raise ValueError(f"fuse: cannot fuse {names} of types ({got}); supported patterns: {supported}")
        try:
            fused = cls(*mods)
        except ValueError as exc:
            raise ValueError(f"fuse: {names}: {exc}") from None
        fused.train(mods[0].training)
        _set_submodule(model, names[0], fused)
        for n in names[1:]:
            _set_submodule(model, n, nn.Identity())
    return model


def _fuse_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules.keys())
    mods = list(seq._modules.values())
    i = 0
    while i < len(mods):
        match = next(((p, c) for p, c in _FUSE_PATTERNS
                      if i + len(p) <= len(mods) and all(type(mods[i + j]) is t for j, t in enumerate(p))), None)
        if match is None:
            i += 1
            continue
        pattern, cls = match
        k = len(pattern)
        try:
            fused = cls(*mods[i : i + k])
        except ValueError as exc:
            warnings.warn(f"qext.fuse: not fusing the modules at {names[i]}..{names[i + k - 1]}: {exc}",
                          QuantizationWarning, stacklevel=3)
            i += 1
            continue
        fused.train(mods[i].training)
        seq._modules[names[i]] = fused
        for j in range(1, k):
            seq._modules[names[i + j]] = nn.Identity()
        i += k


# --------------------------------------------------------------------------------------------------
# prepare_qat / prepare
# --------------------------------------------------------------------------------------------------


def _split_overrides(model: nn.Module, overrides: Optional[Mapping], who: str):
    by_name: dict = {}
    by_type: dict = {}
    for key, qc in (overrides or {}).items():
        qc = _resolve_qconfig(qc)
        if isinstance(key, str):
            if key:
                _get_submodule(model, key, f"{who}: overrides")
            by_name[key] = qc
        elif isinstance(key, type) and issubclass(key, nn.Module):
            by_type[key] = qc
        else:
            raise TypeError(f"{who}: override keys must be module names (str) or nn.Module types, got {key!r}")
    return by_name, by_type


def _type_override(mod: nn.Module, by_type: dict):
    """(found, qconfig) of a type override for ``mod``; a fused container also matches the type of its
    first module (an override for nn.Conv2d covers Conv-BN-ReLU)."""
    t = type(mod)
    if t in by_type:
        return True, by_type[t]
    if isinstance(mod, FUSED_TYPES) or (t in _QAT_SWAP and isinstance(mod, nn.Sequential)):
        first = type(mod[0])
        if first in by_type:
            return True, by_type[first]
    return False, None


# QAT class of a float module -> (k-means class, ReLU fused)
_KMEANS_SWAP = {
    QLinear: (KMeansLinear, False),
    LinearReLU: (KMeansLinear, True),
    QConv2d: (KMeansConv2d, False),
    ConvReLU2d: (KMeansConv2d, True),
    ConvBn2d: (KMeansConv2d, False),
    ConvBnReLU2d: (KMeansConv2d, False),
}


def _make_kmeans(mod: nn.Module, qc, cls, who: str) -> nn.Module:
    """The k-means module for a float Linear / Conv2d or a fused container. A Conv-BN(-ReLU) container
    becomes ``Sequential(KMeansConv2d, its BatchNorm2d[, its ReLU])``: the codebook clusters the
    convolution's own weights and the batch norm keeps training in float (folding it first would give
    every output channel its own weight scale, which one shared codebook fits badly)."""
    kmeans_cls, relu = _KMEANS_SWAP[cls]
    parts = list(mod) if isinstance(mod, nn.Sequential) else [mod]
    if cls in (ConvBn2d, ConvBnReLU2d):
        if qc.activation is not None:
            raise ValueError(
                f"{who}: k-means weights with activation quantization on a fused Conv-BN ({type(mod).__name__}) "
                f"are not supported (the output quantizer would sit before the batch norm); fuse only "
                f"Conv-ReLU / Linear-ReLU, or use a qconfig without an activation spec"
            )
        return nn.Sequential(kmeans_cls.from_float(parts[0], qc), *parts[1:])
    return kmeans_cls.from_float(parts[0], qc, relu=relu)


def _kept_float_by_kmeans(mod: nn.Module, qc) -> bool:
    """Batch norms stay float by design under a k-means qconfig (k-means clusters weight matrices)."""
    return getattr(qc, "kmeans", False) and isinstance(mod, nn.modules.batchnorm._BatchNorm)


def _swap_for_qat(model: nn.Module, qconfig, overrides, freeze_bn_step, who: str) -> nn.Module:
    by_name, by_type = _split_overrides(model, overrides, who)
    root_dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), None)
    unsupported: dict = {}

    def qconfig_for(name: str, mod: nn.Module, inherited):
        if name in by_name:
            return by_name[name]
        found, qc = _type_override(mod, by_type)
        return qc if found else inherited

    def make(mod: nn.Module, qc, cls):
        if getattr(qc, "kmeans", False) and cls in _KMEANS_SWAP:
            return _make_kmeans(mod, qc, cls, who)
        if cls in (ConvBn2d, ConvBnReLU2d):
            new = cls.from_float(mod, qc, freeze_bn_step=freeze_bn_step)
        else:
            new = cls.from_float(mod, qc)
        if root_dev is not None and not any(True for _ in mod.parameters()):
            new.to(root_dev)  # parameter-free stubs / adds: put their quantizers where the model lives
        return new

    def unsupported_leaf(mod: nn.Module) -> bool:
        # A module with parameters of its own that is not swapped: a torch.nn layer (LSTM, LayerNorm,
        # Embedding, an unfused BatchNorm, MultiheadAttention, ...) or a custom module without children.
        # Custom containers that merely own a parameter are searched for supported children instead.
        if not any(True for _ in mod.parameters(recurse=False)):
            return False
        return type(mod).__module__.startswith("torch.") or not any(True for _ in mod.children())

    def visit(mod: nn.Module, prefix: str, inherited):
        for name, child in list(mod.named_children()):
            full = prefix + name
            qc = qconfig_for(full, child, inherited)
            cls = _qat_target(child)
            if cls is not None:
                if qc is not None:
                    setattr(mod, name, make(child, qc, cls))
                continue
            if _is_qext_module(child):
                continue
            if unsupported_leaf(child):
                if qc is not None and not _kept_float_by_kmeans(child, qc):
                    unsupported.setdefault(type(child), []).append(full)
                continue
            visit(child, full + ".", qc)

    root_qc = qconfig_for("", model, qconfig)
    cls = _qat_target(model)
    if cls is not None:
        model = make(model, root_qc, cls) if root_qc is not None else model
    elif not _is_qext_module(model):
        if unsupported_leaf(model):
            if root_qc is not None:
                unsupported.setdefault(type(model), []).append("(the model itself)")
        else:
            visit(model, "", root_qc)
    for t, names in unsupported.items():
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"{who}: {t.__module__}.{t.__qualname__} is not supported by qext quantization; "
            f"left in float: {shown}",
            QuantizationWarning,
            stacklevel=3,
        )
    _utils.set_module_names(model)
    _install_state_dict_guard(model)
    return model


def prepare_qat(
    model: nn.Module,
    qconfig,
    overrides: Optional[Mapping] = None,
    inplace: bool = False,
    freeze_bn_step: Optional[int] = None,
) -> nn.Module:
    """Swap the supported modules for their QAT versions; everything else is left as it is.

    Swapped (exact types): ``nn.Linear`` -> ``qext.nn.QLinear``, ``nn.Conv2d`` -> ``QConv2d``, the fused
    containers of :func:`fuse` (and torch.ao's ``nni.ConvBn2d`` etc.) -> ``ConvBn2d`` / ``ConvBnReLU2d`` /
    ``ConvReLU2d`` / ``LinearReLU``, ``QuantStub`` / ``QAdd`` without qconfig -> with one.

    ``qconfig``: a ``qext.QConfig`` or a preset name (``"int8"``, ...). ``overrides`` maps dotted module
    names or module types to a QConfig (or preset name) or to None (keep in float). As in torch.ao: a
    module's qconfig is its own name's override if there is one, else its type's override, else its
    parent's qconfig (so a name applies to the subtree under it, except where a deeper name or a type
    override says otherwise). A type override of ``nn.Conv2d`` / ``nn.Linear`` also covers the fused
    containers that start with one.
    Unsupported modules that have parameters (``nn.LSTM``, a BatchNorm that was not fused, ...) are left
    in float with one :class:`QuantizationWarning` per type. ``freeze_bn_step``: training steps after
    which the folded batch norms stop updating their statistics (None: never; see
    :func:`freeze_bn_stats`). Returns the prepared model (a copy unless ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    qconfig = _resolve_qconfig(qconfig)
    return _swap_for_qat(model, qconfig, overrides, freeze_bn_step, "qext.prepare_qat")


def prepare(model: nn.Module, qconfig, overrides: Optional[Mapping] = None, inplace: bool = False) -> nn.Module:
    """Post-training static quantization: the same swap as :func:`prepare_qat`, with every quantizer's
    observer on and fake quantization off, and the model in eval mode (batch norms use and keep their
    running statistics). Run calibration batches through it (:func:`calibrate`), then :func:`convert`."""
    if not inplace:
        model = copy.deepcopy(model)
    qconfig = _resolve_qconfig(qconfig)
    model = _swap_for_qat(model, qconfig, overrides, None, "qext.prepare")
    enable_observer(model, True)
    enable_fake_quant(model, False)
    model.eval()
    return model


def calibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """Run calibration batches through a prepared model (eval mode, no gradients). A batch that is a
    tuple or list is passed as positional arguments. Raises ValueError when there is no batch."""
    model.eval()
    n = 0
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            n += 1
    if n == 0:
        names = [name for name, m in model.named_modules() if getattr(m, "activation_post_process", None) is not None
                 and isinstance(m, _QAT_TYPES)]
        where = f" (the observers of {', '.join(repr(x) for x in names[:3])}{' ...' if len(names) > 3 else ''} saw no data)" if names else ""
        raise ValueError(f"qext.calibrate: no calibration batches were given{where}")
    return model


def _fake_quants(model: nn.Module):
    return [m for m in model.modules() if _utils.is_fake_quant(m)]


def enable_observer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the observers of every fake-quantizer in ``model`` on (or off: freeze the ranges)."""
    for fq in _fake_quants(model):
        _utils.fq_set_observer(fq, enabled)
    return model


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn fake quantization of every fake-quantizer in ``model`` on (or off: observe only)."""
    for fq in _fake_quants(model):
        _utils.fq_set_fake_quant(fq, enabled)
    return model


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Freeze (or unfreeze) the batch-norm statistics of every ``ConvBn2d`` / ``ConvBnReLU2d``."""
    for m in model.modules():
        if isinstance(m, ConvBn2d):
            m.freeze_bn_stats(frozen)
    return model


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------


def _qparams_of(fq: nn.Module, what: str, name: str):
    if not _utils.fq_has_data(fq):
        raise ValueError(
            f"qext.convert: {what} of '{name}' saw no data; run calibration batches (qext.calibrate) or "
            f"training steps through the prepared model before convert"
        )
    try:
        scale, zp = _utils.fq_qparams(fq)
    except ValueError as exc:
        raise ValueError(f"qext.convert: {what} of '{name}': {exc}") from exc
    qmin, qmax = _utils.fq_range(fq)
    return scale, zp, qmin, qmax


def _activation_qparams(mod: nn.Module, name: str):
    fq = mod.activation_post_process
    if fq is None:
        return None, None, None, None
    if _utils.fq_axis(fq) is not None:
        raise ValueError(f"qext.convert: '{name}' quantizes its output per channel; converted activations are per tensor")
    return _qparams_of(fq, "observer", name)


def _weight_qparams(mod: nn.Module, w: torch.Tensor, name: str):
    fq = mod.weight_fake_quant
    if fq is None:
        return None, None, None, None, None
    # The quantizer sees the weights it quantizes, exactly as in the QAT model's forward pass (with its
    # observer on it derives the range from them; frozen, it keeps the range it has).
    fq(w)
    return (*_qparams_of(fq, "weight observer", name), _utils.fq_axis(fq))


def _float_bytes_of(mod: nn.Module) -> int:
    return _float_bytes(mod, skip_fake_quant=True)


def _convert_module(mod: nn.Module, name: str) -> nn.Module:
    if isinstance(mod, QuantStub):
        if mod.activation_post_process is None:
            return nn.Identity()
        s, z, lo, hi = _activation_qparams(mod, name)
        new = nnq.Quantize(s, z, lo, hi)
    elif isinstance(mod, DeQuantStub):
        return nnq.DeQuantize()
    elif isinstance(mod, QAdd):
        new = nnq.QAdd(*_activation_qparams(mod, name))
    elif isinstance(mod, AvgPool2d):
        new = nnq.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                            mod.divisor_override, *_activation_qparams(mod, name))
    elif isinstance(mod, AdaptiveAvgPool2d):
        new = nnq.AdaptiveAvgPool2d(mod.output_size, *_activation_qparams(mod, name))
    elif isinstance(mod, (QLinear, QConv2d, ConvBn2d)):
        w, b = mod.weight_bias()
        w = w.detach()
        b = None if b is None else b.detach()
        ws, wz, wlo, whi, waxis = _weight_qparams(mod, w, name)
        s, z, lo, hi = _activation_qparams(mod, name)
        relu = isinstance(mod, (LinearReLU, ConvReLU2d, ConvBnReLU2d))
        if isinstance(mod, QLinear):
            new = nnq.Linear(w, b, ws, wz, wlo, whi, waxis, s, z, lo, hi, relu=relu)
        else:
            new = nnq.Conv2d(w, b, ws, wz, wlo, whi, waxis, s, z, lo, hi, relu=relu, stride=mod.stride,
                             padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                             padding_mode=mod.padding_mode)
        new.float_bytes = _float_bytes_of(mod)
    elif isinstance(mod, KMEANS_MODULES):
        spec = mod.spec
        args = (mod.centroids.detach(), mod.labels, mod.bias, spec.bits, spec.storage_bits, mod.relu,
                *_activation_qparams(mod, name))
        if isinstance(mod, KMeansLinear):
            new = nnq.KMeansLinear(*args)
        else:
            new = nnq.KMeansConv2d(*args, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                                   groups=mod.groups, padding_mode=mod.padding_mode)
        new.float_bytes = _dense_kmeans_bytes(mod)
    else:  # pragma: no cover - guarded by the caller
        raise TypeError(f"qext.convert: cannot convert {type(mod).__name__}")
    new.qext_name = name
    dev = next((t.device for t in list(mod.parameters()) + list(mod.buffers())), None)
    return new.to(dev) if dev is not None else new


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The integer model of a QAT / calibrated model (``qext.nn.quantized``, run by the int8 kernels): integer weights
    (per-channel int8 for the ``"int8"`` presets; the BN-folded weights of ``ConvBn2d``), float32 scales,
    int32 zero points, the output scale / zero point of every quantized output; ``QuantStub`` ->
    ``Quantize``, ``DeQuantStub`` -> ``DeQuantize``, ``QAdd`` -> quantized add, QAT average pools -> integer
    average pools, ``nn.MaxPool2d`` (without ``return_indices``) -> the integer max pool (torch's on float
    inputs), ``nn.Flatten`` -> :class:`qext.nn.quantized.Flatten` (a block transpose of channels-last quantized
    inputs). Modules left in float stay float. The result is in eval mode and agrees with the QAT model in
    eval mode (fake quant, observers as they are) to within one output step per element.

    Raises ValueError naming the module when an observer saw no data (no calibration)."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        if isinstance(model, _QAT_TYPES):
            model = _convert_module(model, "")
        else:
            _convert_children(model, "")
    model.eval()
    _install_state_dict_guard(model)
    return model


def _convert_children(mod: nn.Module, prefix: str) -> None:
    for name, child in list(mod.named_children()):
        full = prefix + name
        if isinstance(child, _QAT_TYPES):
            setattr(mod, name, _convert_module(child, full))
        elif type(child) is nn.MaxPool2d and not child.return_indices:
            # No state and no quantizer: the integer pool runs on quantized inputs, torch's on float ones,
            # so it is swapped inside and outside the quantized parts alike.
            setattr(mod, name, nnq.MaxPool2d.from_float(child))
        elif type(child) is nn.Flatten:
            setattr(mod, name, nnq.Flatten.from_float(child))
        elif not isinstance(child, nnq.QUANTIZED_MODULES):
            _convert_children(child, full + ".")


# --------------------------------------------------------------------------------------------------
# quantize_dynamic
# --------------------------------------------------------------------------------------------------


def _default_dynamic_weight_spec(dtype):
    from .qconfig import QuantSpec

    if dtype not in (torch.qint8, "int8"):
        raise ValueError(f"qext.quantize_dynamic: dtype must be torch.qint8 (or give weight_spec), got {dtype}")
    return QuantSpec(bits=8, signed=True, symmetric=True, axis=0, observer="minmax")


def quantize_dynamic(
    model: nn.Module,
    dtype=torch.qint8,
    modules: Optional[Iterable] = None,
    weight_spec=None,
    reduce_range: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Dynamic quantization: every ``nn.Linear`` (exact type; ``modules`` may list module names to
    restrict it to those) becomes ``qext.nn.quantized.DynamicLinear`` with integer weights (by default
    int8, symmetric, per output channel; ``weight_spec`` gives another ``QuantSpec``) and activations
    quantized per call from the batch's min / max (affine uint8; 7-bit with ``reduce_range``)."""
    if not inplace:
        model = copy.deepcopy(model)
    spec = weight_spec if weight_spec is not None else _default_dynamic_weight_spec(dtype)
    names = None
    types = {nn.Linear}
    if modules is not None:
        names = set()
        types = set()
        for m in modules:
            if isinstance(m, str):
                _get_submodule(model, m, "qext.quantize_dynamic")
                names.add(m)
            elif m is nn.Linear:
                types.add(m)
            else:
                raise ValueError(f"qext.quantize_dynamic: only nn.Linear is supported, got {m!r}")

    def dynamic(lin: nn.Linear, name: str) -> nn.Module:
        with torch.no_grad():
            fq = _utils.make_fake_quant(spec).to(lin.weight.device)
            fq(lin.weight.detach())
            s, z = _utils.fq_qparams(fq)
            lo, hi = _utils.fq_range(fq)
            new = nnq.DynamicLinear(lin.weight, lin.bias, s, z, lo, hi, _utils.fq_axis(fq), reduce_range=reduce_range)
        new.qext_name = name
        new.float_bytes = _float_bytes_of(lin)
        return new.to(lin.weight.device)

    def wanted(name: str, mod: nn.Module) -> bool:
        if type(mod) is not nn.Linear:
            return False
        return (names is not None and name in names) or nn.Linear in types

    if wanted("", model):
        model = dynamic(model, "")
    else:
        def visit(mod, prefix):
            for name, child in list(mod.named_children()):
                full = prefix + name
                if wanted(full, child):
                    setattr(mod, name, dynamic(child, full))
                elif not _is_qext_module(child):
                    visit(child, full + ".")

        visit(model, "")
    _install_state_dict_guard(model)
    return model


# --------------------------------------------------------------------------------------------------
# model_size
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerSize:
    """Bytes of one layer: as float (``float_bytes``) and as the quantized model stores it
    (``quantized_bytes``); ``weight_bits`` is None for layers without quantized weights."""

    name: str
    kind: str
    float_bytes: int
    quantized_bytes: int
    weight_bits: Optional[float] = None


@dataclass
class ModelSize:
    layers: list = field(default_factory=list)

    @property
    def float_bytes(self) -> int:
        return sum(layer.float_bytes for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.quantized_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """float bytes / quantized bytes (compression factor)."""
        return self.float_bytes / self.quantized_bytes if self.quantized_bytes else float("nan")

    def __getitem__(self, name: str) -> LayerSize:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def as_dict(self) -> dict:
        return {
            "layers": {l.name: {"kind": l.kind, "float_bytes": l.float_bytes, "quantized_bytes": l.quantized_bytes,
                                "weight_bits": l.weight_bits} for l in self.layers},
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
        }

    def table(self) -> str:
        rows = ["| layer | kind | weight bits | float bytes | quantized bytes |", "|---|---|---:|---:|---:|"]
        for l in self.layers:
            bits = "" if l.weight_bits is None else f"{l.weight_bits:g}"
            rows.append(f"| {l.name or '(model)'} | {l.kind} | {bits} | {l.float_bytes} | {l.quantized_bytes} |")
        rows.append(f"| total | | | {self.float_bytes} | {self.quantized_bytes} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _float_bytes(mod: nn.Module, skip_fake_quant: bool = True) -> int:
    """Bytes of the parameters and floating-point buffers of ``mod`` and its submodules (not of its
    fake-quantizers / observers, not integer bookkeeping such as ``num_batches_tracked``)."""
    total = 0
    seen = set()

    def walk(m: nn.Module):
        nonlocal total
        if skip_fake_quant and _utils.is_fake_quant(m):
            return
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            total += _tensor_bytes(t)
        for child in m.children():
            walk(child)

    walk(mod)
    return total


def _quantized_weight_bytes(numel: int, bits: float, n_params: int) -> int:
    """Integer weights at ``bits`` per element (4-bit: half a byte) + float32 scale and int32 zero point
    per quantization group."""
    return int(math.ceil(numel * bits / 8)) + 8 * n_params


def _dense_kmeans_bytes(mod: nn.Module) -> int:
    """Bytes of the float layer a k-means layer stands for: a float32 weight and bias."""
    return 4 * mod.labels.numel() + (0 if mod.bias is None else 4 * mod.bias.numel())


def _kmeans_bytes(n_labels: int, storage_bits: int, n_centroids: int, bias, out_bytes: int) -> int:
    """Packed labels, the float32 codebook, a float32 bias and the output scale / zero point."""
    return int(math.ceil(n_labels * storage_bits / 8)) + 4 * n_centroids + (0 if bias is None else 4 * bias.numel()) + out_bytes


def _qat_layer(name: str, mod: nn.Module) -> LayerSize:
    kind = type(mod).__name__
    out_bytes = 8 if getattr(mod, "activation_post_process", None) is not None else 0
    if isinstance(mod, KMEANS_MODULES):
        q = _kmeans_bytes(mod.labels.numel(), mod.spec.storage_bits, mod.centroids.numel(), mod.bias, out_bytes)
        return LayerSize(name, kind, _dense_kmeans_bytes(mod), q, mod.spec.bits)
    fbytes = _float_bytes(mod)
    if isinstance(mod, (QLinear, QConv2d, ConvBn2d)):
        w = mod.weight
        n_bias = w.shape[0] if isinstance(mod, ConvBn2d) else (0 if mod.bias is None else mod.bias.numel())
        fq = mod.weight_fake_quant
        if fq is None:
            return LayerSize(name, kind, fbytes, _tensor_bytes(w) + 4 * n_bias + out_bytes, None)
        lo, hi = _utils.fq_range(fq)
        bits = _utils.range_bits(lo, hi)
        groups = w.shape[0] if _utils.fq_axis(fq) is not None else 1
        return LayerSize(name, kind, fbytes, _quantized_weight_bytes(w.numel(), bits, groups) + 4 * n_bias + out_bytes, bits)
    return LayerSize(name, kind, fbytes, out_bytes, None)  # stubs and adds: an output scale / zero point


def _converted_layer(name: str, mod: nn.Module) -> Optional[LayerSize]:
    kind = "quantized." + type(mod).__name__
    if isinstance(mod, nnq.DeQuantize):
        return None
    if isinstance(mod, nnq.DynamicLinear):
        inner = mod.inner
        q = _quantized_weight_bytes(inner.weight.numel(), inner.weight_bits, inner.weight_scale.numel())
        b = 0 if mod.bias is None else _tensor_bytes(mod.bias)
        f = getattr(mod, "float_bytes", inner.weight.numel() * 4 + b)
        return LayerSize(name, kind, f, q + b, inner.weight_bits)
    out_bytes = 8 if getattr(mod, "scale", None) is not None else 0
    if isinstance(mod, nnq.KMEANS_QUANTIZED_MODULES):
        n = math.prod(mod.weight_shape)
        q = _kmeans_bytes(n, mod.storage_bits, mod.centroids.numel(), mod.bias, out_bytes)
        f = getattr(mod, "float_bytes", 4 * n + (0 if mod.bias is None else 4 * mod.bias.numel()))
        return LayerSize(name, kind, f, q, mod.bits)
    if isinstance(mod, (nnq.Linear, nnq.Conv2d)):
        b = 0 if mod.bias is None else 4 * mod.bias.numel()
        if mod.weight_quantized:
            q = _quantized_weight_bytes(mod.weight.numel(), mod.weight_bits, mod.weight_scale.numel())
            bits = mod.weight_bits
        else:
            q, bits = _tensor_bytes(mod.weight), None
        f = getattr(mod, "float_bytes", mod.weight.numel() * 4 + b)
        return LayerSize(name, kind, f, q + b + out_bytes, bits)
    return LayerSize(name, kind, 0, out_bytes, None)


def model_size(model: nn.Module) -> ModelSize:
    """Bytes of every layer and in total, as float (``float_bytes``) and quantized (``quantized_bytes``).

    Float bytes: parameters and floating-point buffers at their dtype (for a converted layer, those of
    the QAT layer it came from, e.g. conv + batch norm). Quantized bytes: integer weights at their bit
    width (int8: 1 byte per element, 4-bit: half a byte), plus a float32 scale and an int32 zero point per
    weight group (channel or tensor), the bias (int32 / float32: 4 bytes per element; the folded bias for
    Conv-BN), and 8 bytes (scale, zero point) per quantized output. K-means layers count exactly what
    their converted form stores: labels packed at 1, 2, 4 or 8 bits (``KMeansSpec.storage_bits``), the
    float32 codebook and bias (their float bytes: the dense float32 weight and bias). Works on float models (every layer
    unquantized: quantized bytes = float bytes), QAT / prepared models (what convert will store) and
    converted or dynamically quantized models (what they store). Fake-quantizer / observer state is not
    counted. Layers left in float count their float bytes on both sides.
    """
    result = ModelSize()

    def visit(mod: nn.Module, name: str):
        if isinstance(mod, _QAT_TYPES):
            if isinstance(mod, DeQuantStub):
                return
            layer = _qat_layer(name, mod)
            if layer.float_bytes or layer.quantized_bytes:
                result.layers.append(layer)
            return
        if isinstance(mod, nnq.QUANTIZED_MODULES):
            layer = _converted_layer(name, mod)
            if layer is not None and (layer.float_bytes or layer.quantized_bytes):
                result.layers.append(layer)
            return
        if _utils.is_fake_quant(mod):
            return
        if isinstance(mod, FUSED_TYPES):
            f = _float_bytes(mod)
            result.layers.append(LayerSize(name, type(mod).__name__, f, f, None))
            return
        own = [t for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)) if t.is_floating_point()]
        if own:
            f = sum(_tensor_bytes(t) for t in own)
            result.layers.append(LayerSize(name, type(mod).__name__, f, f, None))
        for cname, child in mod.named_children():
            visit(child, f"{name}.{cname}" if name else cname)

    visit(model, "")
    return result


# --------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------


def _is_extra_state_key(key: str) -> bool:
    return key == "_extra_state" or key.endswith("._extra_state")


def _resizable_keys(model: nn.Module) -> set:
    """State-dict keys of buffers that their module resizes on load (observer statistics and per-channel
    quantization parameters that take their size from the first batch)."""
    keys = set()
    for mname, mod in model.named_modules():
        for b in getattr(mod, "_resizable", ()):
            keys.add(f"{mname}.{b}" if mname else b)
    return keys


def _state_dict_problems(model: nn.Module, state_dict: Mapping, prefix: str = "", strict: Optional[bool] = None):
    expected = model.state_dict()
    resizable = _resizable_keys(model)
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    problems = []
    for key, exp in expected.items():
        if key not in given:
            if strict:
                problems.append(f"missing key '{prefix + key}'")
            continue
        got = given[key]
        if _is_extra_state_key(key):
            if not _utils.extra_state_compatible(got, exp):
                problems.append(f"'{prefix + key}': saved with another quantization config "
                                f"({_utils.describe_difference(got, exp)})")
        elif isinstance(exp, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                problems.append(f"'{prefix + key}' is a {type(got).__name__}, the model has a tensor")
            elif tuple(got.shape) != tuple(exp.shape) and key not in resizable:
                problems.append(f"'{prefix + key}' has shape {list(got.shape)}, the model expects {list(exp.shape)}")
            elif got.is_floating_point() != exp.is_floating_point() or got.is_quantized != exp.is_quantized:
                problems.append(f"'{prefix + key}' has dtype {got.dtype}, the model expects {exp.dtype}")
    if strict:
        for key in given:
            if key not in expected:
                problems.append(f"unexpected key '{prefix + key}'")
    return problems


def check_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True) -> None:
    """Raise :class:`StateDictMismatchError` (listing the keys) if ``state_dict`` does not fit ``model``:
    a qext module whose saved quantization config differs, a shape or dtype mismatch, and with
    ``strict`` a missing or unexpected key."""
    problems = _state_dict_problems(model, state_dict, "", strict)
    if problems:
        _raise_mismatch(problems)


def _raise_mismatch(problems) -> None:
    shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
    raise StateDictMismatchError(
        "qext: the state dict does not fit this model (was it saved from a model prepared with another "
        f"qconfig?); nothing was loaded:\n  {shown}"
    )


def load_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True):
    """``model.load_state_dict`` that checks the whole state dict first (:func:`check_state_dict`), so
    that on any mismatch nothing is loaded. Returns what ``load_state_dict`` returns."""
    check_state_dict(model, state_dict, strict)
    return model.load_state_dict(state_dict, strict=strict)


def _state_dict_guard_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # Runs before anything is loaded into ``module`` or its submodules. torch does not pass the caller's
    # ``strict`` here, so only mismatches that are errors either way are checked (quantization config,
    # shapes, dtypes); use qext.load_state_dict to check missing / unexpected keys up front too.
    problems = _state_dict_problems(module, state_dict, prefix, strict=None)
    if problems:
        _raise_mismatch(problems)


def _install_state_dict_guard(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` check the quantization layout of the whole state dict before it
    loads anything (a load-state-dict pre-hook on the root module)."""
    if model.__dict__.get("_qext_state_dict_guard", False):
        return
    model.register_load_state_dict_pre_hook(_state_dict_guard_hook)
    model.__dict__["_qext_state_dict_guard"] = True

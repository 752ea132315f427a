"""Deployment: converted models as TorchScript files that C++ programs load with ``torch::jit::load``.

``save_torchscript`` traces a model (``torch.jit.trace``), checks that the traced module reproduces the
eager model's outputs bit for bit, and saves it; ``load_torchscript`` loads such a file back after
checking that it is intact.

A converted qext model traces to calls of the ``torch.ops.qext`` operators with its quantization
parameters (one-element scale / zero-point tensors read as Python numbers) recorded as constants: they
are fixed at convert time, so the trace is exact for every input. A C++ program that loads the file must
link libqext (and include ``qext/qext.h``) so that these operators are registered.

What tracing cannot record: Python control flow that depends on tensor values, and Python numbers
computed from the input (for example the per-batch scale of ``qext.quantize_dynamic``'s ``DynamicLinear``):
the trace freezes them at their values for the example input. ``save_torchscript`` therefore runs the
traced module (and the module reloaded from the file) on the example inputs and on ``check_inputs`` and
raises :class:`TraceMismatchError` when any output differs from the eager model's in a single bit.

Integrity: PyTorch's zip reader does not verify the CRC-32 checksums of the archive's records, so a
flipped byte in a weight loads silently. ``load_torchscript`` checks every record's CRC-32 first.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
import zipfile
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import torch

__all__ = ["ModelFileError", "TraceMismatchError", "load_torchscript", "save_torchscript"]

PathLike = Union[str, "os.PathLike[str]"]


class TraceMismatchError(RuntimeError):
    """The traced module does not reproduce the eager model's output exactly."""


class ModelFileError(RuntimeError):
    """A TorchScript file that is truncated, corrupted or not a TorchScript archive."""


# TracerWarnings that tracing a converted qext model always raises, and that are harmless there: the
# modules read their one-element scale / zero-point tensors as Python numbers and wrap numbers as
# tensors, which the trace records as constants. Silenced only when raised from qext's own modules;
# the exact output check below catches the cases where such a constant was in fact data-dependent.
_EXPECTED_TRACER_WARNINGS = (
    r"Converting a tensor to a Python (float|integer)",
    r"torch\.tensor results are registered as constants in the trace",
)
_QEXT_MODULES = r"qext(\.|$)"


def _module_of(filename: str) -> Optional[str]:
    """The name of the loaded module defined in ``filename`` (for re-issuing a recorded warning)."""
    for name, mod in list(sys.modules.items()):
        if getattr(mod, "__file__", None) == filename:
            return name
    return None


def _as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _describe_tensor_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None when ``a`` and ``b`` are identical (dtype, shape, quantization parameters, every value,
    NaN where NaN), otherwise what differs."""
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.is_quantized:
        if a.qscheme() != b.qscheme():
            return f"qscheme {a.qscheme()} vs {b.qscheme()}"
        if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            if a.q_scale() != b.q_scale() or a.q_zero_point() != b.q_zero_point():
                return (f"quantization parameters (scale {a.q_scale()!r}, zero point {a.q_zero_point()}) vs "
                        f"(scale {b.q_scale()!r}, zero point {b.q_zero_point()})")
        elif not (torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
                  and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())):
            return "per-channel quantization parameters"
        a, b = a.int_repr(), b.int_repr()
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point() or a.is_complex():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    else:
        same = a == b
    n_diff = int((~same).sum())
    if n_diff == 0:
        return None
    diff = (a.double() - b.double()).abs()
    diff = diff[~same & ~torch.isnan(diff)]
    worst = f", largest |difference| {float(diff.max()):.6g}" if diff.numel() else ""
    return f"{n_diff} of {a.numel()} values differ{worst}"


def _describe_difference(eager: Any, traced: Any, where: str = "output") -> Optional[str]:
    """None when the (nested) outputs are identical, otherwise where and how they differ."""
    if isinstance(eager, torch.Tensor) or isinstance(traced, torch.Tensor):
        if not (isinstance(eager, torch.Tensor) and isinstance(traced, torch.Tensor)):
            return f"{where}: {type(eager).__name__} vs {type(traced).__name__}"
        d = _describe_tensor_difference(eager, traced)
        return None if d is None else f"{where}: {d}"
    if isinstance(eager, (tuple, list)) and isinstance(traced, (tuple, list)):
        if len(eager) != len(traced):
            return f"{where}: {len(eager)} vs {len(traced)} elements"
        for i, (e, t) in enumerate(zip(eager, traced)):
            d = _describe_difference(e, t, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    if isinstance(eager, Mapping) and isinstance(traced, Mapping):
        if set(eager) != set(traced):
            return f"{where}: keys {sorted(map(str, eager))} vs {sorted(map(str, traced))}"
        for k in eager:
            d = _describe_difference(eager[k], traced[k], f"{where}[{k!r}]")
            if d is not None:
                return d
        return None
    return None if eager == traced else f"{where}: {eager!r} vs {traced!r}"


def _check_outputs(expected_outputs: list, module, inputs: Sequence[tuple], what: str, notes: list) -> None:
    for i, (inp, expected) in enumerate(zip(inputs, expected_outputs)):
        with torch.no_grad():
            got = module(*inp)
        d = _describe_difference(expected, got)
        if d is not None:
            label = "example_inputs" if i == 0 else f"check_inputs[{i - 1}]"
            hint = ("\n  warnings raised while tracing:\n    " + "\n    ".join(notes)) if notes else ""
            raise TraceMismatchError(
                f"qext.save_torchscript: {what} does not reproduce the eager model on {label} ({d}). "
                "A trace records one execution: Python control flow that depends on tensor values and Python "
                "numbers computed from the input (e.g. the per-batch scale of a dynamically quantized layer) "
                "are frozen at their values for example_inputs. Make the model's forward independent of "
                f"them, or script those parts with torch.jit.script.{hint}"
            )


def save_torchscript(
    model: torch.nn.Module,
    example_inputs: Any,
    path: PathLike,
    check_inputs: Optional[Sequence[Any]] = None,
    *,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
) -> torch.jit.ScriptModule:
    """Trace ``model`` (in eval mode, under ``torch.no_grad``) and save it as a TorchScript file.

    ``example_inputs``: a tensor or a tuple of tensors (the forward's arguments) to trace with;
    ``check_inputs``: more inputs of the same form (other batch sizes, other data) on which the traced
    module must also match. Every output of the traced module, and of the module loaded back from the
    saved file, must equal the eager model's output exactly (``torch.equal``; quantized outputs: same
    integer values, scale and zero point), else :class:`TraceMismatchError` is raised and nothing is
    written. ``extra_files`` (name -> contents) are stored in the archive (``torch::jit::load`` reads them
    with an ``ExtraFilesMap``), e.g. the input normalisation the model expects.

    The file is written atomically (in a temporary folder in the same directory, then renamed). Returns the
    traced module. The model's training flag is restored afterwards.
    """
    path = os.fspath(path)
    example = _as_tuple(example_inputs)
    all_inputs = [example] + [_as_tuple(c) for c in (check_inputs or [])]
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(record=True) as caught:  # the caller's filters still apply
            for pattern in _EXPECTED_TRACER_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=torch.jit.TracerWarning,
                                        module=_QEXT_MODULES)
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)
        notes = []
        for w in caught:  # hand the other warnings on to the caller (e.g. pytest.warns)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=_module_of(w.filename),
                                   source=w.source)
            if issubclass(w.category, torch.jit.TracerWarning):
                notes.append(f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0]}")
        with torch.no_grad():
            expected = [model(*inp) for inp in all_inputs]
        _check_outputs(expected, traced, all_inputs, "the traced module", notes)

        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"qext.save_torchscript: directory {directory} does not exist")
        # Written under the final name in a private folder (torch.jit.save names the archive's root
        # folder after the file), then renamed into place.
        tmp_dir = tempfile.mkdtemp(prefix=".qext-save-", dir=directory)
        tmp = os.path.join(tmp_dir, os.path.basename(path))
        try:
            files = {k: (v.encode() if isinstance(v, str) else bytes(v)) for k, v in (extra_files or {}).items()}
            torch.jit.save(traced, tmp, _extra_files=files)
            loaded = load_torchscript(tmp)
            _check_outputs(expected, loaded, all_inputs, f"the module saved to {path} and loaded back", notes)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.rmdir(tmp_dir)
    finally:
        model.train(was_training)
    return traced


def _check_archive(path: str) -> None:
    """Raises ModelFileError unless ``path`` is a zip archive whose records all pass their CRC-32 check."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(re.fullmatch(r"[^/]+/(data\.pkl|constants\.pkl)", n) for n in names):
                raise ModelFileError(
                    f"{path}: not a TorchScript archive (a zip file without data.pkl / constants.pkl; "
                    f"records: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                )
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except zipfile.BadZipFile as exc:
        raise ModelFileError(
            f"{path}: truncated or not a TorchScript file ({exc}; {size} bytes): the zip archive's directory "
            "at the end of the file is missing or damaged"
        ) from None
    except (zlib.error, EOFError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupted: a record cannot be read ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise ModelFileError(f"{path}: corrupted: record '{bad}' fails its CRC-32 check (the file was modified "
                             "or damaged after it was saved)")


def load_torchscript(path: PathLike, map_location: Union[str, torch.device, None] = "cpu",
                     extra_files: Optional[dict] = None) -> torch.jit.ScriptModule:
    """Load a TorchScript file saved by :func:`save_torchscript` (or ``torch.jit.save``).

    Checks the file first and raises ``FileNotFoundError`` (missing), ``IsADirectoryError`` or
    :class:`ModelFileError` (truncated, corrupted: a record whose CRC-32 does not match, or not a
    TorchScript archive), each naming the file and the reason; errors of ``torch.jit.load`` itself are
    re-raised as :class:`ModelFileError` too. ``extra_files``: a dict of names, filled with the contents
    of those extra files (as ``torch.jit.load``'s ``_extra_files``). The module is returned in eval mode.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"qext.load_torchscript: {path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"qext.load_torchscript: {path}: is a directory, not a TorchScript file")
    _check_archive(path)
    try:
        if extra_files is not None:
            module = torch.jit.load(path, map_location=map_location, _extra_files=extra_files)
        else:
            module = torch.jit.load(path, map_location=map_location)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: torch.jit.load failed: {first}") from exc
    return module.eval()

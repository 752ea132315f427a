"""qext.save_torchscript / qext.load_torchscript: the traced converted model reproduces the eager one bit for
bit (and so does the file loaded back), traces that do not reproduce their model are refused, and broken
files (missing, truncated, corrupted, not TorchScript) give errors that name the file and the reason."""

import os
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

import qext
import qext.nn as qnn

# TorchScript is the deployment format the C++ side loads; torch 2.11 marks its entry points deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def _tiny_converted(dequant: bool = True) -> nn.Module:
    """A small conv net (conv-BN-ReLU, maxpool, conv-ReLU, linear) after a few QAT steps, converted."""
    layers = OrderedDict(
        quant=qnn.QuantStub(),
        conv1=nn.Conv2d(1, 6, 3), bn1=nn.BatchNorm2d(6), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc=nn.Linear(8 * 5 * 5, 10),
    )
    if dequant:
        layers["dequant"] = qnn.DeQuantStub()
    model = qext.prepare_qat(qext.fuse(nn.Sequential(layers)), qext.get_qconfig("int8"))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        loss = model(torch.randn(16, 1, 12, 12)).pow(2).mean()  # the QAT model's output is float either way
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    qext.enable_observer(model, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qext.convert(model)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_quantized or b.is_quantized:
        return (a.is_quantized and b.is_quantized and a.dtype == b.dtype and a.q_scale() == b.q_scale()
                and a.q_zero_point() == b.q_zero_point() and torch.equal(a.int_repr(), b.int_repr()))
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dequant", [True, False], ids=["float-output", "quantized-output"])
def test_round_trip_bit_exact(tmp_path, dequant):
    model = _tiny_converted(dequant)
    example = torch.randn(4, 1, 12, 12)
    others = [torch.randn(1, 1, 12, 12), 3 * torch.randn(9, 1, 12, 12)]
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        # The expected TracerWarnings (scales read as numbers) are silenced; any other would fail here.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = qext.save_torchscript(model, example, path, check_inputs=[(x,) for x in others],
                                       extra_files={"normalization.txt": "mean 0.25\nstd 0.5\n"})
    assert isinstance(traced, torch.jit.ScriptModule)
    extra = {"normalization.txt": ""}
    loaded = qext.load_torchscript(path, extra_files=extra)
    assert extra["normalization.txt"] == b"mean 0.25\nstd 0.5\n"
    assert not loaded.training
    # inputs not seen when saving, among them a batch size never traced
    for x in [example, torch.randn(5, 1, 12, 12), 10 * torch.randn(2, 1, 12, 12)]:
        with torch.no_grad():
            expected = model(x)
            assert expected.is_quantized == (not dequant)
            assert _same(traced(x), expected)
            assert _same(loaded(x), expected)
    # the file holds the qext integer operators, not a float re-implementation
    graph = str(loaded.inlined_graph)
    assert all(f"qext::quantized_{op}" in graph for op in ("conv2d", "max_pool2d", "linear"))
    # nothing left behind but the model
    assert sorted(os.listdir(tmp_path)) == ["tiny.pt"]


def test_training_flag_restored(tmp_path):
    model = _tiny_converted()
    model.train()
    qext.save_torchscript(model, torch.randn(2, 1, 12, 12), tmp_path / "m.pt")
    assert model.training


class _DataDependent(nn.Module):
    """Python control flow on a tensor value: a trace records only the branch taken."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


def test_mismatching_trace_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    positive, negative = torch.rand(2, 3) + 0.1, -torch.rand(2, 3) - 0.1
    with pytest.warns(torch.jit.TracerWarning):  # not silenced: it is not one of qext's scale constants
        with pytest.raises(qext.TraceMismatchError, match=r"check_inputs\[0\].*6 of 6 values differ"):
            qext.save_torchscript(_DataDependent(), positive, path, check_inputs=[negative])
    assert os.listdir(tmp_path) == []
    # the same module with inputs that take the traced branch saves fine
    with pytest.warns(torch.jit.TracerWarning):
        qext.save_torchscript(_DataDependent(), positive, path, check_inputs=[positive * 3])
    assert torch.equal(qext.load_torchscript(path)(positive), positive * 2)


def test_dynamic_quantization_trace_is_refused(tmp_path):
    """The per-batch activation scale of a dynamically quantized Linear is frozen by tracing."""
    model = qext.quantize_dynamic(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(3, 16)
    with pytest.raises(qext.TraceMismatchError, match="example_inputs|check_inputs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qext.save_torchscript(model, x, tmp_path / "dyn.pt", check_inputs=[20 * torch.randn(3, 16)])
    assert not (tmp_path / "dyn.pt").exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    qext.save_torchscript(_tiny_converted(), torch.randn(2, 1, 12, 12), path)
    return path


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        qext.load_torchscript(missing)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        qext.load_torchscript(tmp_path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "10-bytes", "half", "minus-1-byte"])
def test_truncated_file(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[:n])
    with pytest.raises(qext.ModelFileError, match=r"truncated\.pt: truncated"):
        qext.load_torchscript(bad)


def test_flipped_byte_in_every_record_is_detected(saved, tmp_path):
    """PyTorch's own reader does not check CRCs (a flipped weight byte would load silently);
    load_torchscript does, for every record of the archive."""
    data = saved.read_bytes()
    with zipfile.ZipFile(saved) as z:
        records = [(i.filename, i.header_offset, i.compress_size) for i in z.infolist() if i.compress_size > 0]
    assert any(name.endswith("data.pkl") for name, _, _ in records)
    bad = tmp_path / "flipped.pt"
    for name, offset, size in records:
        # the record's data follows its local header (30 bytes + name + extra field)
        name_len = int.from_bytes(data[offset + 26:offset + 28], "little")
        extra_len = int.from_bytes(data[offset + 28:offset + 30], "little")
        pos = offset + 30 + name_len + extra_len + size // 2
        corrupted = bytearray(data)
        corrupted[pos] ^= 0x5A
        bad.write_bytes(bytes(corrupted))
        with pytest.raises(qext.ModelFileError, match=r"flipped\.pt: corrupted") as err:
            qext.load_torchscript(bad)
        assert name in str(err.value) or "cannot be read" in str(err.value), name
    bad.write_bytes(data)  # the intact copy still loads
    qext.load_torchscript(bad)


def test_not_torchscript(tmp_path):
    state = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state)  # a zip archive, but no TorchScript module
    with pytest.raises(qext.ModelFileError, match=r"state\.pt: torch\.jit\.load failed"):
        qext.load_torchscript(state)
    text = tmp_path / "text.pt"
    text.write_text("not a model\n")
    with pytest.raises(qext.ModelFileError, match=r"text\.pt: truncated or not a TorchScript file"):
        qext.load_torchscript(text)

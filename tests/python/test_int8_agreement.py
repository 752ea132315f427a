"""Converted integer models agree with the fake-quant (QAT) models they came from.

The guarantee (README, "Integer inference"): fed the same quantized input, every converted layer's output
levels are within one step of its QAT layer's fake-quantized output (they differ only where the float32
computation of the QAT layer and the exact integer one fall on two sides of a rounding boundary: the
int32 bias rounding and float32 accumulation); a whole Fashion-MNIST CNN gives the same top-1 class on
>= 99.9% of the 10k test images.
"""

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qext
import qext.nn as qnn
import qext.nn.quantized as nnq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))


class Block(nn.Module):
    """Conv-BN-ReLU, a grouped conv, a depthwise conv, a residual add, average pools and a linear head."""

    def __init__(self):
        super().__init__()
        self.quant = qnn.QuantStub()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.add = qnn.QAdd()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(16, 24, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(24, 10)
        self.dequant = qnn.DeQuantStub()

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.add(self.depthwise(self.grouped(x)), x)
        x = self.gap(self.conv2(self.pool(x)))
        return self.dequant(self.fc(self.flatten(x)))


def make_converted_pair():
    torch.manual_seed(0)
    model = qext.fuse(Block().eval(), [["conv1", "bn1", "relu1"]])
    qat = qext.prepare_qat(model.train(), qext.get_qconfig("int8"))
    with torch.no_grad():
        for _ in range(4):
            qat(torch.randn(8, 3, 16, 16))
    qext.enable_observer(qat, False)  # the reference keeps the quantization parameters convert() used
    return qat.eval(), qext.convert(qat)


def output_levels(y: torch.Tensor, fq) -> torch.Tensor:
    scale, zp = fq.calculate_qparams()
    return torch.round(y / scale.reshape(-1)[0]).to(torch.int64) + int(zp.reshape(-1)[0])


def test_every_converted_layer_is_within_one_step_of_its_qat_layer():
    qat, converted = make_converted_pair()
    qat_layers = dict(qat.named_modules())
    captured = {}

    def hook(name):
        def fn(mod, args, out):
            captured[name] = (args, out)

        return fn

    kernels = (nnq.Linear, nnq.Conv2d, nnq.QAdd, nnq.AvgPool2d, nnq.AdaptiveAvgPool2d)
    handles = [m.register_forward_hook(hook(n)) for n, m in converted.named_modules() if isinstance(m, kernels)]
    with torch.no_grad():
        converted(torch.randn(16, 3, 16, 16))
    for h in handles:
        h.remove()
    assert set(captured) == {"conv1", "grouped", "depthwise", "add", "pool", "conv2", "gap", "fc"}
    for name, (args, out) in captured.items():
        assert out.is_quantized, name
        assert all(a.is_quantized and a.dtype == torch.quint8 for a in args), name
        ref_mod = qat_layers[name]
        with torch.no_grad():
            ref = ref_mod(*[a.dequantize() for a in args])
        ref_levels = output_levels(ref, ref_mod.activation_post_process)
        diff = (out.int_repr().to(torch.int64) - ref_levels).abs()
        assert int(diff.max()) <= 1, name
        assert float((diff != 0).double().mean()) < 0.01, name


def test_kernels_and_reference_path_agree_on_a_whole_model():
    """The integer kernels against the float64 reference integer path of the same converted modules."""
    _, converted = make_converted_pair()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        fast = converted(x)
        layers = [m for m in converted.modules() if hasattr(m, "reference_forward") and hasattr(m, "_kernel_forward")]
        for m in layers:
            m.forward = m.reference_forward  # instance attribute: this model only
        slow = converted(x)
    step = converted.fc.scale.item()
    assert float((fast - slow).abs().max()) <= 2 * step + 1e-6


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_top1_agreement():
    from fashion_mnist_qat import DEFAULT_DATA_DIR, load_normalized
    from fashion_mnist_workflow import make_cnn

    x_train, y_train, x_test, y_test, _, _ = load_normalized(DEFAULT_DATA_DIR)
    x_train, y_train = x_train[:12000], y_train[:12000]
    torch.manual_seed(0)
    model = make_cnn(widths=(8, 16, 16), hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(0, 12000, 100):  # one fp32 epoch on the subset
        loss = F.cross_entropy(model(x_train[i:i + 100]), y_train[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat = qext.prepare_qat(qext.fuse(model.eval()).train(), qext.get_qconfig("int8"))
    opt = torch.optim.Adam(qat.parameters(), lr=5e-4)
    for i in range(0, 6000, 100):
        loss = F.cross_entropy(qat(x_train[i:i + 100]), y_train[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qext.enable_observer(qat.eval(), False)
    converted = qext.convert(qat)
    with torch.no_grad():
        fq_pred = torch.cat([qat(x_test[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
        int_pred = torch.cat([converted(x_test[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
    accuracy = float((int_pred == y_test).double().mean())
    agreement = float((int_pred == fq_pred).double().mean())
    print(f"int8 accuracy {accuracy:.4f}, top-1 agreement with the fake-quant model {agreement:.4%}")
    assert accuracy > 0.8
    assert agreement >= 0.999

"""The C++ QAT modules (qext::nn) against the Python ones: the gtest binary builds a model, runs one
forward and writes its state (QEXT_NN_EXPORT); the same state loaded into qext.nn modules must give
the same output and the same observer / scale / zero-point buffers, key for key."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import qext
import qext.nn

BINARY = Path(__file__).resolve().parents[2] / "build" / "tests" / "cpp" / "test_nn_modules"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        qconfig = qext.get_qconfig("int8")
        self.quant = qext.nn.QuantStub(qconfig)
        self.cbr = qext.nn.ConvBnReLU2d(3, 8, 3, padding=1, bias=False, qconfig=qconfig)
        self.conv = qext.nn.QConv2d(8, 8, 3, padding=1, qconfig=qconfig)
        self.add = qext.nn.QAdd(qconfig)

    def forward(self, x):
        h = self.cbr(self.quant(x))
        return self.add(h, self.conv(h))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        qconfig = qext.get_qconfig("int8")
        self.fc1 = qext.nn.LinearReLU(16, 32, qconfig=qconfig)
        self.fc2 = qext.nn.QLinear(32, 4, qconfig=qconfig)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.mark.skipif(not BINARY.exists(), reason="C++ tests not built (needs GTest)")
@pytest.mark.parametrize("name,model", [("tiny_net", TinyNet), ("conv_net", ConvNet)])
def test_cpp_modules_match_python(tmp_path, name, model):
    subprocess.run([str(BINARY), "--gtest_filter=QatModules.Export"], check=True,
                   env=dict(os.environ, QEXT_NN_EXPORT=str(tmp_path)), capture_output=True)
    saved = torch.load(tmp_path / f"{name}.pt", weights_only=False)  # written by our own test binary
    before = {k[len("before."):]: v for k, v in saved.items() if k.startswith("before.")}
    after = {k[len("after."):]: v for k, v in saved.items() if k.startswith("after.")}

    net = model()
    tensor_keys = {k for k in net.state_dict() if not k.endswith("_extra_state")}
    assert tensor_keys == set(before), "C++ and Python modules must have the same state_dict keys"
    net.load_state_dict(before, strict=False)
    net(saved["x"])
    y = net(saved["x"] * 1.5)
    torch.testing.assert_close(y.detach(), saved["y"], rtol=0, atol=0)
    state = net.state_dict()
    for key, value in after.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)

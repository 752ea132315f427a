"""The C++ modules (qext::nn) against the Python ones. The gtest binaries build models, run training
forwards (QEXT_NN_EXPORT) and write their state: loaded into qext.nn modules (int8 and int4_lsq), it
must give the same output, parameters and buffers, key for key; and a QAT state converted by
qext::nn::convert must equal what qext.convert makes of it (buffers and integer output)."""

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
    def __init__(self, preset="int8"):
        super().__init__()
        qconfig = qext.get_qconfig(preset)
        self.quant = qext.nn.QuantStub(qconfig)
        self.cbr = qext.nn.ConvBnReLU2d(3, 8, 3, padding=1, bias=False, qconfig=qconfig)
        self.conv = qext.nn.QConv2d(8, 8, 3, padding=1, qconfig=qconfig)
        self.add = qext.nn.QAdd(qconfig)

    def forward(self, x):
        h = self.cbr(self.quant(x))
        return self.add(h, self.conv(h))


class TinyNet(nn.Module):
    def __init__(self, preset="int8"):
        super().__init__()
        qconfig = qext.get_qconfig(preset)
        self.fc1 = qext.nn.LinearReLU(16, 32, qconfig=qconfig)
        self.fc2 = qext.nn.QLinear(32, 4, qconfig=qconfig)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.mark.skipif(not BINARY.exists(), reason="C++ tests not built (needs GTest)")
@pytest.mark.parametrize("preset", ["int8", "int4_lsq"])
@pytest.mark.parametrize("name,model", [("tiny_net", TinyNet), ("conv_net", ConvNet)])
def test_cpp_modules_match_python(tmp_path, name, model, preset):
    """Two training forwards (the second updates EMA / batch-norm statistics; LSQ quantizers
    initialise on the first) give the same output and the same parameters and buffers."""
    subprocess.run([str(BINARY), "--gtest_filter=QatModules.Export"], check=True,
                   env=dict(os.environ, QEXT_NN_EXPORT=str(tmp_path)), capture_output=True)
    suffix = "" if preset == "int8" else "_lsq"
    saved = torch.load(tmp_path / f"{name}{suffix}.pt", weights_only=False)  # written by our own test binary
    before = {k[len("before."):]: v for k, v in saved.items() if k.startswith("before.")}
    after = {k[len("after."):]: v for k, v in saved.items() if k.startswith("after.")}

    net = model(preset)
    tensor_keys = {k for k in net.state_dict() if not k.endswith("_extra_state")}
    assert tensor_keys == set(before), "C++ and Python modules must have the same state_dict keys"
    net.load_state_dict(before, strict=False)
    net(saved["x"])
    y = net(saved["x"] * 1.5)
    torch.testing.assert_close(y.detach(), saved["y"], rtol=0, atol=0)
    state = net.state_dict()
    for key, value in after.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


QUANTIZED_BINARY = BINARY.with_name("test_nn_quantized")


@pytest.mark.skipif(not QUANTIZED_BINARY.exists(), reason="C++ tests not built (needs GTest)")
@pytest.mark.parametrize("preset", ["int8", "int4_lsq"])
def test_cpp_convert_matches_python(tmp_path, preset):
    """qext::nn::convert of a C++ QAT ConvNet and qext.convert of the same state in Python give the
    same converted buffers (integer weights, scales, bias, output parameters, packed weights) and the
    same integer output."""
    subprocess.run([str(QUANTIZED_BINARY), "--gtest_filter=QuantizedModules.Export"], check=True,
                   env=dict(os.environ, QEXT_NN_EXPORT=str(tmp_path)), capture_output=True)
    saved = torch.load(tmp_path / f"converted_{preset}.pt", weights_only=False)  # our own test binary
    qat_state = {k[len("qat."):]: v for k, v in saved.items() if k.startswith("qat.")}
    cpp_converted = {k[len("q."):]: v for k, v in saved.items() if k.startswith("q.")}

    net = ConvNet(preset)
    assert {k for k in net.state_dict() if not k.endswith("_extra_state")} == set(qat_state)
    net.load_state_dict(qat_state, strict=False)
    converted = qext.convert(net)
    py_converted = dict(converted.named_buffers())  # with the non-persistent packed weights
    assert set(py_converted) == set(cpp_converted)
    for key, value in py_converted.items():
        torch.testing.assert_close(cpp_converted[key], value, rtol=0, atol=0, msg=key)

    y = converted(saved["x"])
    assert y.is_quantized
    assert torch.equal(y.int_repr(), saved["y_levels"])
    assert y.q_scale() == float(saved["y_scale"][0])
    assert y.q_zero_point() == int(saved["y_zero_point"][0])

"""QAT modules (qext.nn): numerics against torch.ao's QAT modules, batch-norm folding, fused variants,
stubs and the residual add, from_float, and the qconfig carried in the state dict."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qext.nn as qnn
from qext.functional import fake_quantize
from qext.qconfig import QConfig, QuantSpec, get_qconfig
from qext.quantization import enable_fake_quant

tq = pytest.importorskip("torch.ao.quantization")
import torch.ao.nn.intrinsic.qat as nniqat  # noqa: E402
import torch.ao.nn.qat as nnqat  # noqa: E402

W8 = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, observer="minmax")
W8_PT = QuantSpec(bits=8, signed=True, symmetric=True, axis=None, observer="minmax")
A8 = QuantSpec(bits=8, signed=False, symmetric=False, observer="ema", averaging_constant=0.01)
QC8 = QConfig(activation=A8, weight=W8)
QC_W = QConfig(activation=None, weight=W8)


def _torch_weight_fq(per_channel=True):
    if per_channel:
        return tq.FakeQuantize.with_args(
            observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.FakeQuantize.with_args(
        observer=tq.MinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric)


def _torch_act_fq():
    return tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine, averaging_constant=0.01)


def _torch_qconfig(per_channel=True):
    return tq.QConfig(activation=_torch_act_fq(), weight=_torch_weight_fq(per_channel))


def _fake_quant_state(mod):
    return [m for m in mod.modules() if type(m).__name__ == "FakeQuantize" and m is not mod]


# --------------------------------------------------------------------------------------------------
# QLinear / QConv2d against torch.ao.nn.qat
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_qlinear_matches_torch_ao(per_channel):
    lin = nn.Linear(12, 7)
    ours = qnn.QLinear.from_float(copy.deepcopy(lin), QConfig(activation=A8, weight=W8 if per_channel else W8_PT))
    ref = nnqat.Linear(12, 7, qconfig=_torch_qconfig(per_channel))
    ref.load_state_dict(lin.state_dict(), strict=False)
    ref_act = _torch_act_fq()()
    for step in range(3):
        x = torch.randn(5, 12) * (step + 1)
        xo = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        yo = ours(xo)
        yr = ref_act(ref(xr))
        torch.testing.assert_close(yo, yr, rtol=0, atol=0)
        g = torch.randn_like(yo)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ours.weight_fake_quant.scale.reshape(-1), ref.weight_fake_quant.scale.reshape(-1))
    torch.testing.assert_close(ours.activation_post_process.scale.reshape(-1), ref_act.scale.reshape(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=2, dilation=2),
        dict(kernel_size=(3, 1), groups=4, padding=(1, 0)),
        dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    ],
)
def test_qconv2d_matches_torch_ao(kwargs):
    conv = nn.Conv2d(8, 12, **kwargs)
    ours = qnn.QConv2d.from_float(copy.deepcopy(conv), QC8)
    ref = nnqat.Conv2d(8, 12, qconfig=_torch_qconfig(), **kwargs)
    ref.load_state_dict(conv.state_dict(), strict=False)
    ref_act = _torch_act_fq()()
    for _ in range(2):
        x = torch.randn(2, 8, 9, 9)
        xo = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        yo = ours(xo)
        yr = ref_act(ref(xr))
        torch.testing.assert_close(yo, yr, rtol=0, atol=0)
        g = torch.randn_like(yo)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert ours.stride == conv.stride and ours.groups == conv.groups and ours.dilation == conv.dilation


def test_fused_relu_variants():
    lin = nn.Linear(6, 5)
    m = qnn.LinearReLU.from_float(qnn.FusedLinearReLU(copy.deepcopy(lin), nn.ReLU()), QC8)
    plain = qnn.QLinear.from_float(copy.deepcopy(lin), QConfig(activation=None, weight=W8))
    x = torch.randn(16, 6)
    y = m(x)
    # fake_quant(relu(linear(x, fake_quant(w)))): after the ReLU, so the zero point is 0 and y >= 0
    assert int(m.activation_post_process.zero_point.reshape(-1)[0]) == 0
    expected = fake_quantize(F.relu(plain(x)), m.activation_post_process.scale, 0, 0, 255)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)

    conv = nn.Conv2d(3, 4, 3, padding=1)
    c = qnn.ConvReLU2d.from_float(qnn.FusedConvReLU2d(copy.deepcopy(conv), nn.ReLU()), QC8)
    cplain = qnn.QConv2d.from_float(copy.deepcopy(conv), QConfig(activation=None, weight=W8))
    x = torch.randn(2, 3, 6, 6)
    y = c(x)
    expected = fake_quantize(F.relu(cplain(x)), c.activation_post_process.scale, 0, 0, 255)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_from_float_shares_parameters_and_checks_types():
    lin = nn.Linear(4, 3)
    q = qnn.QLinear.from_float(lin, QC8)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert q.qconfig is QC8
    assert q.weight_fake_quant is not None and q.activation_post_process is not None
    q2 = qnn.QLinear.from_float(nn.Linear(4, 3), QC_W)
    assert q2.activation_post_process is None
    with pytest.raises(TypeError, match="QLinear.from_float expects Linear, got Conv2d"):
        qnn.QLinear.from_float(nn.Conv2d(1, 1, 1), QC8)
    with pytest.raises(TypeError, match="FusedConvBn2d"):
        qnn.ConvBn2d.from_float(nn.Conv2d(1, 1, 1), QC8)
    # subclasses are not float Linears (torch.ao swaps exact types too)
    with pytest.raises(TypeError):
        qnn.QConv2d.from_float(qnn.QConv2d(1, 1, 1), QC8)


def test_weight_spec_none_keeps_float_weights():
    lin = nn.Linear(4, 3)
    q = qnn.QLinear.from_float(copy.deepcopy(lin), QConfig(activation=A8, weight=None))
    assert q.weight_fake_quant is None
    x = torch.randn(8, 4)
    y = q(x)
    expected = fake_quantize(lin(x), q.activation_post_process.scale, q.activation_post_process.zero_point, 0, 255)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# ConvBn2d: folding (Krishnamoorthi 2018) against torch.ao and against unfused Conv + BN
# --------------------------------------------------------------------------------------------------


def _conv_bn(bias=False, groups=1, **kw):
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=bias, groups=groups, **kw)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _ours_and_torch_convbn(relu, bias, groups=1):
    conv, bn = _conv_bn(bias=bias, groups=groups)
    fused = (qnn.FusedConvBnReLU2d(conv, bn, nn.ReLU()) if relu else qnn.FusedConvBn2d(conv, bn))
    cls = qnn.ConvBnReLU2d if relu else qnn.ConvBn2d
    ours = cls.from_float(copy.deepcopy(fused), QC_W)
    tcls = nniqat.ConvBnReLU2d if relu else nniqat.ConvBn2d
    ref = tcls(4, 8, 3, padding=1, bias=bias, groups=groups, qconfig=_torch_qconfig())
    sd = {"weight": conv.weight, **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    if bias:
        sd["bias"] = conv.bias
    ref.load_state_dict(sd, strict=False)
    return ours, ref


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_convbn_matches_torch_ao_training_and_eval(relu, bias):
    ours, ref = _ours_and_torch_convbn(relu, bias, groups=2 if bias else 1)
    # Several training steps with the same weights (the running statistics move, the weights do not:
    # an optimizer step would let float rounding move the per-channel maximum of the folded weights,
    # which sits exactly on a rounding tie, |w| / scale = 127.5, across it in one model only).
    for _ in range(4):
        x = torch.randn(6, 4, 7, 7)
        xo = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(yo)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bn.weight.grad, ref.bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bn.bias.grad, ref.bn.bias.grad, rtol=1e-4, atol=1e-4)
        if bias:
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
        ours.zero_grad(), ref.zero_grad()
        torch.testing.assert_close(ours.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 4
    # frozen statistics (torch.ao: freeze_bn_stats) and eval mode
    ours.freeze_bn_stats()
    ref.freeze_bn_stats()
    x = torch.randn(3, 4, 7, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_convbn_without_fake_quant_equals_unfused_conv_bn():
    conv, bn = _conv_bn(bias=True, stride=2)
    float_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    ours = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(copy.deepcopy(conv), copy.deepcopy(bn)), QC8)
    enable_fake_quant(ours, False)
    for _ in range(3):
        x = torch.randn(5, 4, 9, 9)
        xo = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        yo, yf = ours(xo), float_model(xf)
        torch.testing.assert_close(yo, yf, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(yo)
        yo.backward(g)
        yf.backward(g)
        torch.testing.assert_close(xo.grad, xf.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, float_model[0].weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, float_model[0].bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bn.weight.grad, float_model[1].weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bn.running_mean, float_model[1].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bn.running_var, float_model[1].running_var, rtol=1e-5, atol=1e-6)
    ours.eval(), float_model.eval()
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), float_model(x), rtol=1e-5, atol=1e-5)


def test_folded_weight_bias_is_what_eval_computes():
    conv, bn = _conv_bn(bias=True)
    m = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(conv, bn), QC_W)
    w_fold, b_fold = m.folded_weight_bias()
    sigma = torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(w_fold, conv.weight * (bn.weight / sigma).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(b_fold, bn.bias + (conv.bias - bn.running_mean) * bn.weight / sigma)
    m.eval()
    x = torch.randn(2, 4, 6, 6)
    y = m(x)
    wq = m.weight_fake_quant(w_fold)  # the weight quantizer of the layer, on the folded weights
    torch.testing.assert_close(y, F.conv2d(x, wq, b_fold, padding=1), rtol=0, atol=0)
    # the weights are quantized per output channel of the *folded* weights
    s = m.weight_fake_quant.scale.reshape(-1)
    torch.testing.assert_close(s, w_fold.detach().abs().amax(dim=(1, 2, 3)) / 127.5)


def test_freeze_bn_step():
    conv, bn = _conv_bn()
    m = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(conv, bn), QC_W, freeze_bn_step=2)
    means = []
    for _ in range(4):
        m(torch.randn(4, 4, 5, 5) + 1.0)
        means.append(m.bn.running_mean.clone())
    assert int(m.step) == 4 and m.bn_stats_frozen
    # the step count travels with the state dict
    resumed = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(*_conv_bn()), QC_W, freeze_bn_step=2)
    assert not resumed.bn_stats_frozen
    resumed.load_state_dict(m.state_dict())
    assert resumed.bn_stats_frozen
    assert not torch.equal(means[0], means[1])  # steps 0 and 1 update the statistics
    assert torch.equal(means[1], means[2]) and torch.equal(means[2], means[3])  # then frozen
    assert int(m.bn.num_batches_tracked) == 2
    # frozen training forward == eval forward (the folded weights and bias convert() quantizes)
    x = torch.randn(2, 4, 5, 5)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(y_train, m(x), rtol=0, atol=0)
    # the method form, and unfreezing
    m2 = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(*_conv_bn()), QC_W).freeze_bn_stats()
    before = m2.bn.running_var.clone()
    m2(torch.randn(4, 4, 5, 5))
    assert torch.equal(before, m2.bn.running_var)
    m2.freeze_bn_stats(False)
    m2(torch.randn(4, 4, 5, 5))
    assert not torch.equal(before, m2.bn.running_var)


def test_convbn_momentum_none_cumulative_average():
    conv, bn = _conv_bn()
    bn.momentum = None
    float_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    m = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(conv, bn), QConfig(activation=None, weight=None))
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(m(x), float_model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bn.running_var, float_model[1].running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_unfold_batch_norm_equals_batch_norm_of_the_unfolded_output(bias):
    # float64 and a large eps: the factor gradient is proportional to eps, so a wrong closed form shows
    from qext.nn.qat import _UnfoldBatchNorm

    torch.manual_seed(0)
    c, eps = 5, 0.5
    y = (torch.randn(6, c, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    factor = (torch.rand(c, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1, 1, 1, -1], dtype=torch.float64)
    factor.requires_grad_()
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    gamma = torch.randn(c, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(c, dtype=torch.float64, requires_grad=True)
    stats_ref = (torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5)
    stats = tuple(t.clone() for t in stats_ref)
    x = y / factor.reshape(1, -1, 1, 1)
    if bias:
        x = x + b.reshape(1, -1, 1, 1)
    ref = F.batch_norm(x, *stats_ref, gamma, beta, True, 0.1, eps)
    out = _UnfoldBatchNorm.apply(y, factor, b, gamma, beta, *stats, 0.1, eps)
    assert torch.equal(out, ref)  # the same forward, bit for bit
    assert torch.equal(stats[0], stats_ref[0]) and torch.equal(stats[1], stats_ref[1])
    g = torch.randn_like(ref)
    inputs = [y, factor, gamma, beta] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_convbn_float64_large_eps_equals_unfused_conv_bn():
    conv, bn = _conv_bn(bias=True)
    bn.eps = 0.5
    with torch.no_grad():
        bn.weight[::3].neg_()  # negative gamma: a negative folding factor
    conv, bn = conv.double(), bn.double()
    float_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    m = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(conv, bn), QConfig(activation=None, weight=None))
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        g = torch.randn(3, 8, 5, 5, dtype=torch.float64)
        m(x).backward(g)
        float_model(x).backward(g)
        for ours, ref in ((m.weight, float_model[0].weight), (m.bias, float_model[0].bias),
                          (m.bn.weight, float_model[1].weight), (m.bn.bias, float_model[1].bias)):
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.bn.running_var, float_model[1].running_var, rtol=1e-12, atol=0)


def test_convbn_single_value_per_channel_is_an_error():
    m = qnn.ConvBn2d.from_float(qnn.FusedConvBn2d(*_conv_bn()), QC_W)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))


# --------------------------------------------------------------------------------------------------
# Stubs and QAdd
# --------------------------------------------------------------------------------------------------


def test_stubs_and_qadd():
    x = torch.randn(4, 5)
    y = torch.randn(4, 5)
    assert torch.equal(qnn.QuantStub()(x), x)  # float: identity
    assert torch.equal(qnn.QAdd()(x, y), x + y)
    assert torch.equal(qnn.DeQuantStub()(x), x)
    stub = qnn.QuantStub.from_float(qnn.QuantStub(), QC8)
    out = stub(x)
    fq = stub.activation_post_process
    torch.testing.assert_close(out, fake_quantize(x, fq.scale, fq.zero_point, 0, 255), rtol=0, atol=0)
    assert stub.weight_fake_quant is None
    add = qnn.QAdd.from_float(qnn.QAdd(), QC8)
    out = add(x, y)
    fq = add.activation_post_process
    torch.testing.assert_close(out, fake_quantize(x + y, fq.scale, fq.zero_point, 0, 255), rtol=0, atol=0)
    # torch.ao's stubs are accepted too
    assert isinstance(qnn.QuantStub.from_float(tq.QuantStub(), QC8), qnn.QuantStub)
    assert isinstance(qnn.DeQuantStub.from_float(tq.DeQuantStub(), QC8), qnn.DeQuantStub)


def test_learnable_weights_train():
    qc = get_qconfig("int4_lsq")
    m = qnn.QConv2d.from_float(nn.Conv2d(3, 4, 3), qc)
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    y.square().sum().backward()
    params = dict(m.named_parameters())
    assert any("weight_fake_quant" in n for n in params), list(params)
    assert m.weight.grad is not None
    # 4-bit weights: at most 16 distinct levels per output channel
    w = m.weight_fake_quant(m.weight).detach()
    assert max(len(torch.unique(w[c])) for c in range(4)) <= 16


def test_qconfig_in_extra_state():
    m = qnn.QLinear.from_float(nn.Linear(3, 2), QC8)
    state = m.state_dict()["_extra_state"]
    assert state["module"] == "QLinear"
    assert state["qconfig"]["weight"]["bits"] == 8 and state["qconfig"]["weight"]["axis"] == 0
    assert state["qconfig"]["activation"]["observer"] == "ema"
    other = qnn.QLinear.from_float(nn.Linear(3, 2), QConfig(activation=A8, weight=W8.replace(bits=4)))
    with pytest.raises(RuntimeError, match="weight.bits: saved 4, model has 8"):
        m.set_extra_state(other.state_dict()["_extra_state"])
    # a float stub's state (qconfig None) loads into a prepared stub: nothing to restore
    stub = qnn.QuantStub.from_float(qnn.QuantStub(), QC8)
    stub.load_state_dict(qnn.QuantStub().state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="saved with another quantization config"):
        qnn.QuantStub().load_state_dict(stub.state_dict(), strict=False)

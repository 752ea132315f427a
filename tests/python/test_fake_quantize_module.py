"""FakeQuantize module: straight-through mode against torch.ao's FakeQuantize (bit-exact), flags,
state_dict round trips, LSQ / LSQ+ initialisation and gradients, error messages naming modules."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize as AOFakeQuantize
from torch.ao.quantization import MovingAverageMinMaxObserver as AOMovingAverageMinMaxObserver
from torch.ao.quantization import PerChannelMinMaxObserver as AOPerChannelMinMaxObserver

import qext
from qext.fake_quant import (
    FakeQuantize,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    set_module_names,
)
from qext.qconfig import QuantSpec, get_qconfig
from qext_testing import cuda_usable

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")

NAN = float("nan")


def data(n=5, shape=(8, 6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + 0.5 * i) + 0.2 * i for i in range(n)]


def test_package_function_not_shadowed_by_submodule():
    """The FakeQuantize module lives in qext.fake_quant, so importing it leaves the function
    qext.fake_quantize alone."""
    import qext.fake_quant  # noqa: F401

    assert callable(qext.fake_quantize) and qext.fake_quantize is qext.functional.fake_quantize


# --------------------------------------------------------------------------------------------------
# Straight-through mode
# --------------------------------------------------------------------------------------------------


def test_activation_matches_torch_ao_fake_quantize():
    ours = FakeQuantize(get_qconfig("int8").activation)
    ref = AOFakeQuantize(observer=AOMovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                         dtype=torch.quint8, qscheme=torch.per_tensor_affine, averaging_constant=0.01)
    for x in data():
        y = ours(x)
        y_ref = ref(x)
        assert torch.equal(y, y_ref)
        assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero_point, ref.zero_point)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_weight_matches_torch_ao_fake_quantize(axis):
    ours = FakeQuantize(get_qconfig("int8").weight.replace(axis=axis))
    ref = AOFakeQuantize(observer=AOPerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                         dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=axis)
    for x in data(3):
        assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.scale, ref.scale)
    assert torch.equal(ours.zero_point, ref.zero_point.to(torch.int32))
    s, z = ours.calculate_qparams()
    assert torch.equal(s, ref.scale) and z.dtype == torch.int32


def test_straight_through_gradient():
    fq = FakeQuantize(QuantSpec(bits=4, signed=False, symmetric=False))
    fq(torch.tensor([-1.0, 2.0]))  # range [-1, 2]
    fq.disable_observer()
    x = torch.tensor([-3.0, -0.5, 0.0, 1.0, 1.9, 5.0], requires_grad=True)
    y = fq(x)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    s, z = fq.scale, fq.zero_point
    assert torch.equal(y, qext.functional.fake_quantize(x.detach(), s, z, 0, 15))


def test_flags_and_stale_parameters():
    fq = FakeQuantize(QuantSpec(signed=False, symmetric=False, observer="minmax"))
    x0, x1 = torch.tensor([-1.0, 1.0]), torch.tensor([-4.0, 4.0])
    fq(x0)
    s0 = fq.scale.clone()
    fq.disable_observer()
    fq(x1)
    assert torch.equal(fq.scale, s0) and fq.observer.min_val.item() == -1.0
    fq.enable_observer().disable_fake_quant()
    x = torch.randn(10)
    assert fq(x) is x  # no fake quantization: identity
    fq(x1)  # observed, parameters not derived yet
    assert torch.equal(fq.scale, s0)
    assert fq.state_dict()["scale"].item() == pytest.approx(8 / 255)  # refreshed for the state dict
    fq2 = FakeQuantize(fq.spec)
    fq2(x0)
    fq2.disable_fake_quant()
    fq2(x1)
    fq2.enable_fake_quant()  # re-enabling refreshes
    assert fq2.scale.item() == pytest.approx(8 / 255)
    assert fq.fake_quant_enabled.item() == 0 and fq.observer_enabled.item() == 1


def test_model_helpers_and_module_names():
    model = nn.Sequential(nn.Linear(4, 4), FakeQuantize(get_qconfig("int8").activation),
                          nn.Sequential(FakeQuantize(get_qconfig("int8").weight)))
    set_module_names(model, prefix="net")
    assert model[1].module_name == "net.1" and model[1].observer.module_name == "net.1"
    assert model[2][0].module_name == "net.2.0"
    disable_observer(model)
    assert not model[1]._observer_on and model[2][0].observer_enabled.item() == 0
    enable_observer(model)
    disable_fake_quant(model)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model[0](x))
    enable_fake_quant(model)
    fresh = set_module_names(nn.Sequential(nn.Identity(), FakeQuantize(get_qconfig("int8").activation)), "net")
    with pytest.raises(ValueError,
                       match=r"MovingAverageMinMaxObserver 'net\.1': no finite values observed \(all NaN/Inf\)"):
        fresh(torch.full((3, 4), NAN))
    w = torch.randn(3, 5)
    w[:, 2] = NAN
    fqw = model[2][0].observer.spec.replace(axis=1)
    fq = FakeQuantize(fqw)
    fq.module_name = "conv1.weight_fake_quant"
    with pytest.raises(ValueError, match=r"MinMaxObserver 'conv1\.weight_fake_quant': no finite values observed "
                                         r"\(all NaN/Inf\) in channel 2"):
        fq(w)
    with pytest.raises(IndexError, match=r"FakeQuantize 'conv1\.weight_fake_quant': axis 1 is out of range"):
        fq(torch.randn(4))


def test_state_dict_round_trip_straight_through():
    for spec in (get_qconfig("int8").weight, get_qconfig("int8").activation,
                 QuantSpec(signed=False, symmetric=False, observer="histogram", histogram_method="percentile")):
        a = FakeQuantize(spec)
        for x in data(3):
            a(x)
        a.disable_observer()
        b = FakeQuantize(spec)
        b.load_state_dict(a.state_dict())
        assert not b._observer_on
        x = torch.randn(8, 6, 4) * 3
        assert torch.equal(a(x), b(x))
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_calculate_qparams_before_data():
    with pytest.raises(ValueError, match="calculate_qparams called before any data was observed"):
        FakeQuantize(QuantSpec()).calculate_qparams()
    with pytest.raises(ValueError, match="before the learnable scale was initialised"):
        FakeQuantize(QuantSpec(learnable=True)).calculate_qparams()


# --------------------------------------------------------------------------------------------------
# Learnable mode (LSQ / LSQ+)
# --------------------------------------------------------------------------------------------------


def test_lsq_init_per_channel_and_gradients_match_functional():
    spec = get_qconfig("int4_lsq").weight  # 4-bit signed symmetric, axis 0
    fq = FakeQuantize(spec)
    assert isinstance(fq.scale, nn.Parameter) and not isinstance(fq.zero_point, nn.Parameter)
    param = fq.scale
    w = torch.randn(6, 5, 3)
    w[1, 0, 0] = NAN  # ignored by the initialisation
    x = w.clone().requires_grad_(True)
    y = fq(x)
    assert fq.scale is param and fq.scale.shape == (6,)
    finite = torch.where(torch.isfinite(w), w.abs(), torch.zeros(()))
    expected = (2 * finite.double().sum((1, 2)) / torch.isfinite(w).sum((1, 2)) / math.sqrt(7)).float()
    torch.testing.assert_close(fq.scale.detach(), expected, rtol=1e-6, atol=0)

    y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    s_ref = fq.scale.detach().clone().requires_grad_(True)
    x_ref = w.clone().requires_grad_(True)
    y_ref = qext.functional.fake_quantize_learnable(x_ref, s_ref, torch.zeros(6), -8, 7,
                                         grad_factor=1 / math.sqrt(w.numel() / 6 * 7), axis=0)
    y_ref.backward(torch.ones_like(y_ref) * torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(fq.scale.grad, s_ref.grad) and torch.equal(x.grad, x_ref.grad)
    assert fq.initialized.item() == 1

    # later batches do not re-initialise
    before = fq.scale.detach().clone()
    fq(torch.randn(6, 5, 3) * 100)
    assert torch.equal(fq.scale.detach(), before)


def test_lsq_plus_affine_init_from_observer_and_zero_point_gradient():
    spec = get_qconfig("int4_lsq").activation  # 4-bit unsigned affine, learnable
    fq = FakeQuantize(spec)
    assert isinstance(fq.zero_point, nn.Parameter)
    x = torch.randn(32, 4) - 0.5
    ref = qext.observer.MinMaxObserver(spec)
    ref(x)
    s_ref, z_ref = ref.calculate_qparams()
    xr = (x * 1.7).requires_grad_(True)  # gradients from values outside the initial range too
    fq(x)
    assert torch.equal(fq.scale.detach(), s_ref) and torch.equal(fq.zero_point.detach(), z_ref.float())
    y = fq(xr)
    y.sum().backward()
    assert fq.zero_point.grad is not None and fq.zero_point.grad.abs().sum() > 0
    assert fq.scale.grad is not None and xr.grad is not None


def test_lsq_scale_kept_positive_with_straight_through_clamp():
    fq = FakeQuantize(QuantSpec(bits=4, learnable=True))
    fq(torch.randn(100))
    with torch.no_grad():
        fq.scale.fill_(-0.3)
    x = torch.randn(100, requires_grad=True)
    y = fq(x)
    assert torch.isfinite(y).all()
    y.pow(2).sum().backward()
    assert torch.isfinite(fq.scale.grad).all() and fq.scale.grad.item() != 0.0
    s, z = fq.calculate_qparams()
    assert s.item() == torch.finfo(torch.float32).eps and z.dtype == torch.int32


def test_learnable_calculate_qparams_rounds_zero_point():
    fq = FakeQuantize(QuantSpec(bits=4, signed=False, symmetric=False, learnable=True), num_channels=None)
    fq(torch.rand(10))
    for value, expected in ((2.5, 2), (3.5, 4), (-3.0, 0), (40.0, 15)):
        with torch.no_grad():
            fq.zero_point.fill_(value)
        assert fq.calculate_qparams()[1].item() == expected


def test_lsq_training_reduces_error_and_optimizer_keeps_parameter():
    torch.manual_seed(0)
    fq = FakeQuantize(get_qconfig("int4_lsq").weight, num_channels=8)
    assert fq.scale.shape == (8,)
    opt = torch.optim.Adam(fq.parameters(), lr=0.01)  # created before the first forward
    w = torch.randn(8, 64) * torch.linspace(0.1, 2.0, 8)[:, None]
    errors = []
    for _ in range(60):
        opt.zero_grad()
        loss = (fq(w) - w).pow(2).mean()
        loss.backward()
        opt.step()
        errors.append(loss.item())
    assert errors[-1] < 0.8 * errors[0]


def test_learnable_state_dict_round_trip():
    spec = get_qconfig("int4_lsq").weight
    a = FakeQuantize(spec)
    w = torch.randn(4, 9)
    a(w)
    with torch.no_grad():
        a.scale.mul_(1.3)
    sd = a.state_dict()
    assert set(sd) >= {"scale", "zero_point", "initialized", "fake_quant_enabled", "observer_enabled"}
    b = FakeQuantize(spec)
    b.load_state_dict(sd)
    assert b._initialized and b.scale.shape == (4,)
    assert torch.equal(b(w), a(w)) and torch.equal(b.scale, a.scale)  # not re-initialised


def test_presets_run_end_to_end():
    torch.manual_seed(0)
    for name in ("int8", "int8_per_tensor", "int8_avx2", "int4_lsq", "int8_histogram"):
        qc = get_qconfig(name)
        wfq, afq = FakeQuantize(qc.weight), FakeQuantize(qc.activation)
        lin = nn.Linear(16, 8)
        x = torch.randn(32, 16)
        y = afq(nn.functional.linear(x, wfq(lin.weight), lin.bias))
        y.sum().backward()
        assert lin.weight.grad is not None
        s, z = afq.calculate_qparams()
        assert s.numel() == 1 and z.dtype == torch.int32
        assert wfq.calculate_qparams()[0].shape == ((8,) if qc.weight.axis is not None else (1,))
        q = qext.functional.quantize(y.detach(), s, z, qc.activation.quant_min, qc.activation.quant_max)
        assert q.min() >= qc.activation.quant_min and q.max() <= qc.activation.quant_max


@pytest.mark.skipif(not cuda_usable(), reason="needs CUDA and qext's CUDA kernels")
@pytest.mark.parametrize("spec", [get_qconfig("int8").weight, get_qconfig("int8").activation,
                                  get_qconfig("int4_lsq").weight, get_qconfig("int4_lsq").activation])
def test_cuda_matches_cpu(spec):
    cpu, gpu = FakeQuantize(spec), FakeQuantize(spec).cuda()
    for x in data(3):
        xc = x.clone().requires_grad_(True)
        xg = x.cuda().requires_grad_(True)
        yc, yg = cpu(xc), gpu(xg)
        assert torch.equal(yc, yg.cpu())
        yc.sum().backward()
        yg.sum().backward()
        assert torch.equal(xc.grad, xg.grad.cpu())
    assert torch.equal(cpu.scale.detach(), gpu.scale.detach().cpu())

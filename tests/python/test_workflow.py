"""The eager-mode workflow (qext.quantization): fuse, prepare_qat (+ overrides, warnings), prepare +
calibrate (PTQ), convert (agreement of the integer model with the fake-quant model), quantize_dynamic,
model_size, and state-dict checks."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qext.nn as qnn
from qext.nn import quantized as nnq
from qext.qconfig import QConfig, QuantSpec, get_qconfig
from qext.quantization import (
    QuantizationWarning,
    StateDictMismatchError,
    calibrate,
    check_state_dict,
    convert,
    enable_fake_quant,
    enable_observer,
    freeze_bn_stats,
    fuse,
    load_state_dict,
    model_size,
    prepare,
    prepare_qat,
    quantize_dynamic,
)

INT8 = get_qconfig("int8")


class SmallCNN(nn.Module):
    """QuantStub, Conv-BN-ReLU, a residual block (Conv-BN + add), strided/dilated/grouped convs,
    Linear-ReLU, Linear, DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.quant = qnn.QuantStub()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8))
        self.add = qnn.QAdd()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 10))
        self.dequant = qnn.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.stem(x)
        x = self.relu(self.add(x, self.block(x)))
        x = self.down(self.pool(x))
        return self.dequant(self.head(x))


def _inputs(n, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _trained_qat(qconfig=INT8, steps=8):
    model = fuse(SmallCNN())
    qat = prepare_qat(model, qconfig)
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for x in _inputs(steps, seed=1):
        loss = qat(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat


def _assert_within_one_lsb(fake, integer, scale):
    diff = (fake.detach() - integer.detach()).abs() / scale
    assert float(diff.max()) <= 1.0 + 1e-3, f"max difference {float(diff.max())} output steps"
    return diff


# --------------------------------------------------------------------------------------------------
# fuse
# --------------------------------------------------------------------------------------------------


def test_fuse_sequential_patterns():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),      # conv-bn-relu
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),                 # conv-bn
        nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True),             # conv-relu
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU()),  # nested: linear-relu
        nn.Linear(6, 3), nn.Sigmoid(),                        # not a pattern
    ).eval()
    fused = fuse(model)
    kinds = [type(m).__name__ for m in fused]
    assert kinds == ["FusedConvBnReLU2d", "Identity", "Identity", "FusedConvBn2d", "Identity",
                     "FusedConvReLU2d", "Identity", "Sequential", "Linear", "Sigmoid"]
    assert isinstance(fused[7][1], qnn.FusedLinearReLU) and isinstance(fused[7][2], nn.Identity)
    assert isinstance(model[0], nn.Conv2d)  # not in place
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)  # a float model computes the same


def test_fuse_by_names():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)
            self.fc_act = nn.ReLU()

        def forward(self, x):
            x = self.act(self.bn(self.conv(x))).mean((2, 3))
            return self.fc_act(self.fc(x))

    m = M().eval()
    f = fuse(m, [["conv", "bn", "act"], ["fc", "fc_act"]])
    assert isinstance(f.conv, qnn.FusedConvBnReLU2d) and isinstance(f.bn, nn.Identity)
    assert isinstance(f.fc, qnn.FusedLinearReLU) and isinstance(f.fc_act, nn.Identity)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(f(x), m(x), rtol=0, atol=0)
    # one group as a flat list
    assert isinstance(fuse(m, ["conv", "bn"]).conv, qnn.FusedConvBn2d)
    with pytest.raises(ValueError, match="no submodule named 'bn2'"):
        fuse(m, [["conv", "bn2"]])
    with pytest.raises(ValueError, match=r"cannot fuse \['conv', 'fc'\] of types \(Conv2d, Linear\)"):
        fuse(m, [["conv", "fc"]])
    m.bn = nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match="5 features but the Conv2d has 4 output channels"):
        fuse(m, [["conv", "bn"]])


# --------------------------------------------------------------------------------------------------
# prepare_qat
# --------------------------------------------------------------------------------------------------


def test_prepare_qat_swaps_supported_modules():
    model = fuse(SmallCNN())
    qat = prepare_qat(model, INT8)
    assert isinstance(qat.quant, qnn.QuantStub) and qat.quant.activation_post_process is not None
    assert isinstance(qat.stem[0], qnn.ConvBnReLU2d)
    assert isinstance(qat.block[0], qnn.ConvBn2d)
    assert isinstance(qat.down[0], qnn.ConvReLU2d)
    assert isinstance(qat.head[1], qnn.LinearReLU)
    assert type(qat.head[3]) is qnn.QLinear
    assert isinstance(qat.add, qnn.QAdd) and qat.add.activation_post_process is not None
    assert isinstance(qat.pool, nn.MaxPool2d) and isinstance(qat.relu, nn.ReLU)
    assert qat.stem[0].qconfig is INT8
    # the float model is untouched (inplace=False) and the prepared one shares nothing with it
    assert type(model.stem[0]) is qnn.FusedConvBnReLU2d and model.quant.activation_post_process is None
    assert qat.stem[0].weight is not model.stem[0][0].weight
    # preset names work as qconfigs; the QAT model trains
    qat2 = prepare_qat(model, "int8_per_tensor")
    assert qat2.head[3].weight_fake_quant.spec.axis is None
    out = qat2(torch.randn(4, 3, 8, 8))
    out.sum().backward()
    assert qat2.stem[0].weight.grad is not None and qat2.stem[0].bn.weight.grad is not None


def test_prepare_qat_overrides_by_name_and_type():
    model = fuse(SmallCNN())
    int4 = get_qconfig("int4_lsq")
    qat = prepare_qat(model, INT8, overrides={"head": None, "head.3": int4, nn.Conv2d: "int8_per_tensor",
                                              "block.0": INT8, "down": INT8})
    # name None: the subtree stays float...
    assert type(qat.head[1]) is qnn.FusedLinearReLU
    # ...except where a more specific name asks for quantization
    assert type(qat.head[3]) is qnn.QLinear and qat.head[3].qconfig is int4
    # type override (nn.Conv2d also covers fused containers that start with a Conv2d)
    assert qat.stem[0].weight_fake_quant.spec.axis is None and qat.down[0].weight_fake_quant.spec.axis is None
    # a module's own name wins over its type; its type wins over a qconfig inherited from a parent
    # (torch.ao's rule)
    assert qat.block[0].qconfig is INT8
    assert qat.down[0].weight_fake_quant.spec.axis is None
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        prepare_qat(model, INT8, overrides={"nope": None})
    with pytest.raises(TypeError, match="override keys"):
        prepare_qat(model, INT8, overrides={3: None})


def test_prepare_qat_warns_once_per_unsupported_type():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn1 = nn.LSTM(4, 4)
            self.rnn2 = nn.LSTM(4, 4)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()

    with pytest.warns(QuantizationWarning) as record:
        q = prepare_qat(M(), INT8)
    messages = [str(w.message) for w in record if issubclass(w.category, QuantizationWarning)]
    assert len(messages) == 2, messages
    lstm = next(m for m in messages if "LSTM" in m)
    assert "'rnn1'" in lstm and "'rnn2'" in lstm and "left in float" in lstm
    assert any("LayerNorm" in m and "'norm'" in m for m in messages)
    assert type(q.rnn1) is nn.LSTM and type(q.fc) is qnn.QLinear
    # modules asked to stay in float do not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        prepare_qat(M(), INT8, overrides={nn.LSTM: None, "norm": None})


def test_prepare_qat_searches_custom_containers_that_own_parameters():
    class Block(nn.Module):  # a custom container with a parameter of its own (a layer scale)
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.gamma * self.fc(x)

    class Leaf(nn.Module):  # a custom layer without children: not supported
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.w * x

    model = nn.Sequential(Block(), Leaf())
    with pytest.warns(QuantizationWarning, match=r"Leaf is not supported by qext quantization; left in float: '1'"):
        q = prepare_qat(model, INT8)
    assert type(q[0].fc) is qnn.QLinear and type(q[1]) is Leaf
    q(torch.randn(2, 4)).sum().backward()


def test_fuse_skips_batch_norm_without_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU())
    with pytest.warns(QuantizationWarning, match="cannot be folded"):
        fused = fuse(model)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_prepare_qat_accepts_torch_ao_fused_modules_and_stubs():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nni.ConvBnReLU2d(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()),
                          nni.LinearReLU(nn.Linear(2, 2), nn.ReLU()), tq.DeQuantStub())
    q = prepare_qat(model, INT8)
    assert [type(m) for m in q] == [qnn.QuantStub, qnn.ConvBnReLU2d, qnn.LinearReLU, qnn.DeQuantStub]


def test_freeze_bn_step_via_prepare_qat():
    qat = prepare_qat(fuse(SmallCNN()), INT8, freeze_bn_step=2)
    for x in _inputs(3):
        qat(x)
    assert qat.stem[0].bn_stats_frozen and int(qat.stem[0].bn.num_batches_tracked) == 2
    freeze_bn_stats(qat, False)
    qat.stem[0].freeze_bn_step = None
    qat(_inputs(1)[0])
    assert int(qat.stem[0].bn.num_batches_tracked) == 3


# --------------------------------------------------------------------------------------------------
# convert: the integer model against the fake-quant model
# --------------------------------------------------------------------------------------------------


def test_convert_qat_model_agrees_with_fake_quant_model():
    """The whole integer network against the QAT network in eval mode (observers off, so both use the
    same ranges). Each layer is within one output step of its fake-quant counterpart on the same input
    (next test); a difference in one layer can move the next layer's result across a rounding boundary,
    so end to end the bound is looser: over 30 seeds of this net, about 2% of the outputs differ by one
    step, 2 in 28,800 by two steps, and the argmax differs for 0.07% of the samples."""
    qat = _trained_qat()
    qat.eval()
    enable_observer(qat, False)  # freeze the ranges: the fake-quant model and the integer model share them
    integer = convert(qat)
    assert isinstance(integer.quant, nnq.Quantize) and isinstance(integer.dequant, nnq.DeQuantize)
    assert isinstance(integer.stem[0], nnq.Conv2d) and integer.stem[0].relu
    assert isinstance(integer.add, nnq.QAdd) and isinstance(integer.head[3], nnq.Linear)
    assert integer.stem[0].weight.dtype == torch.int8 and integer.stem[0].weight_scale.numel() == 8
    assert not integer.training
    scale = float(qat.head[3].activation_post_process.scale)
    total = differing = beyond_one = argmax_diff = samples = 0
    for x in _inputs(6, batch=32, seed=7):
        fake = qat(x).detach()
        out = integer(x)
        assert out.dtype == torch.float32 and not out.is_quantized
        steps = (fake - out).abs() / scale
        assert float(steps.max()) <= 2 + 1e-3
        total += steps.numel()
        differing += int((steps > 0.5).sum())
        beyond_one += int((steps > 1.5).sum())
        argmax_diff += int((fake.argmax(1) != out.argmax(1)).sum())
        samples += x.shape[0]
    assert beyond_one <= 0.001 * total
    assert differing <= 0.05 * total, differing / total
    assert argmax_diff <= 0.02 * samples


def test_converted_layers_agree_with_their_qat_layers_within_one_step():
    """Layer by layer, given the same quantized input, every converted layer's output is within one
    output step of the fake-quant layer's (the integer path is exact; only the float32 sums of the
    fake-quant layer can put an output on the other side of a rounding boundary)."""
    qat = _trained_qat()
    qat.eval()
    enable_observer(qat, False)
    integer = convert(qat)
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            seen[name] = (args, out)
        return hook

    # each layer, and the modules whose output quantizers produced its inputs
    producers = {"stem.0": ["quant"], "block.0": ["stem.0"], "add": ["stem.0", "block.0"], "down.0": ["add"],
                 "head.1": ["down.0"], "head.3": ["head.1"]}
    for n in producers:
        qat.get_submodule(n).register_forward_hook(keep(n))
    differing = 0
    for x in _inputs(4, batch=32, seed=3):
        qat(x)
        for n, srcs in producers.items():
            args, fake_out = seen[n]
            q_args = [_as_qtensor(a, qat.get_submodule(src)) for a, src in zip(args, srcs)]
            out = integer.get_submodule(n)(*q_args)
            scale = float(qat.get_submodule(n).activation_post_process.scale)
            steps = _assert_within_one_lsb(fake_out, out.dequantize(), scale)
            differing += int((steps > 0.5).sum())
    # Not vacuous: the weighted layers ran the integer kernels (packed weights), not the float path.
    assert all(integer.get_submodule(n).packed_weight is not None for n in producers if n != "add")
    assert differing <= 0.001 * sum(out.numel() for _, out in seen.values()) * 4


def test_convert_swaps_max_pools_and_flatten_and_the_output_is_unchanged():
    """convert() puts the integer max pool in place of torch's, inside the quantized part (quantized input) and
    outside it (float input, torch's pool runs), and qext's Flatten in place of torch's: the model's output is
    what it was with torch's modules."""
    qat = _trained_qat().eval()
    enable_observer(qat, False)
    model = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), qat)  # the first pool sees floats
    integer = convert(model)
    outer, inner, flatten = integer[0], integer[1].pool, integer[1].head[0]
    assert type(outer) is nnq.MaxPool2d and type(inner) is nnq.MaxPool2d and type(flatten) is nnq.Flatten
    assert (outer.kernel_size, outer.stride, outer.padding, outer.dilation, outer.ceil_mode) == (3, 1, 1, 1, True)
    with_torch_modules = copy.deepcopy(integer)
    with_torch_modules[0] = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    with_torch_modules[1].pool = nn.MaxPool2d(2)
    with_torch_modules[1].head[0] = nn.Flatten()
    seen, flattened = [], []
    inner.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    flatten.register_forward_hook(lambda mod, args, out: flattened.append(args[0]))
    for x in _inputs(3, batch=16, seed=21):
        assert torch.equal(integer(x), with_torch_modules(x))
    # not vacuous: the inner pool got (and gave) channels-last quint8 tensors, the converted conv's output,
    # and so did the Flatten (the conv after the pool)
    assert len(seen) == 3 and len(flattened) == 3
    for x, y in seen:
        assert x.dtype == y.dtype == torch.quint8 and x.is_contiguous(memory_format=torch.channels_last)
    for x in flattened:
        assert x.dtype == torch.quint8 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    # a pool that returns indices has no integer form and stays torch's
    assert type(convert(nn.Sequential(nn.MaxPool2d(2, return_indices=True)))[0]) is nn.MaxPool2d


def _as_qtensor(x, producer):
    """The quantized tensor an integer model carries for the fake-quantized ``x`` that came out of
    ``producer``'s output quantizer (exact: x is on that quantizer's grid; MaxPool / ReLU keep it there)."""
    from qext.functional import quantize

    fq = producer.activation_post_process
    s, z = fq.calculate_qparams()
    q = quantize(x.detach(), s, z, fq.quant_min, fq.quant_max)
    torch.testing.assert_close((q.float() - z.float()) * s, x.detach(), rtol=0, atol=0)
    return torch._make_per_tensor_quantized_tensor(q, float(s), int(z))


def test_ptq_calibrate_convert_agrees():
    float_model = SmallCNN().eval()
    for qconfig in (INT8, get_qconfig("int8_histogram")):
        prepared = prepare(fuse(float_model), qconfig)
        assert not prepared.training
        # observers on, fake quant off: the prepared model computes the float model's function
        x0 = _inputs(1, seed=11)[0]
        torch.testing.assert_close(prepared(x0), float_model(x0), rtol=1e-5, atol=1e-5)
        calibrate(prepared, _inputs(4, seed=12))
        integer = convert(prepared)
        # the fake-quant view of the calibrated model, ranges frozen
        enable_observer(prepared, False)
        enable_fake_quant(prepared, True)
        scale = float(prepared.head[3].activation_post_process.scale)
        for x in _inputs(3, batch=16, seed=13):
            _assert_within_one_lsb(prepared(x), integer(x), scale)
            # and close to the float model
            assert (integer(x) - float_model(x)).abs().mean() < 0.05 * float_model(x).abs().mean() + 10 * scale


def test_convert_without_calibration_names_the_module():
    prepared = prepare(fuse(SmallCNN().eval()), INT8)
    with pytest.raises(ValueError, match="observer of 'quant' saw no data"):
        convert(prepared)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(prepared, [])
    # a model whose only unobserved quantizer is deeper down
    calibrate(prepared, _inputs(1))
    prepared.add.activation_post_process = type(prepared.add.activation_post_process)(INT8.activation)
    with pytest.raises(ValueError, match="observer of 'add' saw no data"):
        convert(prepared)


def test_convert_leaves_float_modules_and_runs_float_inputs():
    model = fuse(SmallCNN()).eval()
    qat = prepare_qat(model, INT8, overrides={"head.3": None})
    calibrate(qat, _inputs(2))
    # head.3 stays float: its input must be dequantized first
    qat.head[3] = nn.Sequential(qnn.DeQuantStub(), qat.head[3])
    integer = convert(qat)
    assert type(integer.head[3][1]) is nn.Linear
    assert isinstance(integer.head[3][0], nnq.DeQuantize)
    out = integer(_inputs(1)[0])
    assert out.shape == (8, 10)
    # a converted layer given a float input computes with its dequantized weights (as QAT did)
    lin = integer.head[1]
    xf = torch.randn(3, 64)
    ref = F.relu(F.linear(xf, lin.dequantized_weight(), lin.bias))
    torch.testing.assert_close(out := lin(xf).dequantize(), _fq(ref, lin), rtol=0, atol=0)
    assert out.shape == (3, 16)


def _fq(y, mod):
    from qext.functional import fake_quantize

    return fake_quantize(y, mod.scale, mod.zero_point, mod.out_quant_min, mod.out_quant_max)


def test_convert_int4_lsq_model():
    qat = _trained_qat(get_qconfig("int4_lsq"), steps=4)
    qat.eval()
    integer = convert(qat)
    conv = integer.stem[0]
    assert conv.weight_bits == 4 and int(conv.weight.min()) >= -8 and int(conv.weight.max()) <= 7
    scale = float(qat.head[3].activation_post_process.calculate_qparams()[0])
    for x in _inputs(2, batch=16, seed=5):
        _assert_within_one_lsb(qat(x), integer(x), scale)


# --------------------------------------------------------------------------------------------------
# quantize_dynamic
# --------------------------------------------------------------------------------------------------


def test_quantize_dynamic_linear():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10), nn.LSTM(10, 4))
    dyn = quantize_dynamic(model)
    assert isinstance(dyn[0], nnq.DynamicLinear) and isinstance(dyn[2], nnq.DynamicLinear)
    assert type(dyn[3]) is nn.LSTM and type(model[0]) is nn.Linear
    assert dyn[0].weight.dtype == torch.int8 and dyn[0].inner.weight_scale.numel() == 64
    head = nn.Sequential(*list(model)[:3])
    dyn_head = nn.Sequential(*list(dyn)[:3])
    for scale in (0.1, 1.0, 30.0):  # activations are quantized per batch: any input range works
        x = torch.randn(16, 32) * scale
        y_float = head(x)
        y_dyn = dyn_head(x)
        err = (y_dyn - y_float).abs().max() / y_float.abs().max()
        assert err < 0.03, float(err)
        # the integer computation equals the fake-quant formula up to float rounding
        torch.testing.assert_close(dyn[0](x), dyn[0].reference_forward(x), rtol=1e-5, atol=1e-5 * scale)
    # per-batch: the input scale follows the batch
    s_small = dyn[0].input_qparams(torch.randn(4, 32))[0]
    s_big = dyn[0].input_qparams(100 * torch.randn(4, 32))[0]
    assert float(s_big) > 50 * float(s_small)
    # restricting to names
    only = quantize_dynamic(model, modules=["2"])
    assert type(only[0]) is nn.Linear and isinstance(only[2], nnq.DynamicLinear)
    with pytest.raises(ValueError, match="only nn.Linear"):
        quantize_dynamic(model, modules={nn.Conv2d})
    with pytest.raises(ValueError, match="dtype"):
        quantize_dynamic(model, dtype=torch.float16)
    # 4-bit weights via a spec
    dyn4 = quantize_dynamic(model, weight_spec=QuantSpec(bits=4, signed=True, symmetric=True, axis=0))
    assert dyn4[0].weight_bits == 4


# --------------------------------------------------------------------------------------------------
# model_size (hand-checked numbers)
# --------------------------------------------------------------------------------------------------


def _size_model():
    return nn.Sequential(qnn.QuantStub(), nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, 10), qnn.DeQuantStub())


def test_model_size_float_qat_converted_dynamic():
    model = _size_model()
    # float: conv 8*3*3*3*4 = 864, BN 4 * 8 * 4 = 128 (num_batches_tracked not counted), linear 80*4 + 10*4 = 360
    s = model_size(model)
    assert [(l.name, l.float_bytes) for l in s.layers] == [("1", 864), ("2", 128), ("5", 360)]
    assert s.float_bytes == s.quantized_bytes == 1352

    qat = prepare_qat(fuse(model, ["1", "2", "3"]), INT8)
    s = model_size(qat)
    # QuantStub: output scale + zero point = 8
    # ConvBnReLU2d: 216 int8 + 8 channels * (4 + 4) + folded bias 8 * 4 + output 8 = 216 + 64 + 32 + 8 = 320
    # QLinear: 80 int8 + 10 * 8 + bias 40 + output 8 = 208
    assert [(l.name, l.float_bytes, l.quantized_bytes, l.weight_bits) for l in s.layers] == [
        ("0", 0, 8, None), ("1", 864 + 128, 320, 8), ("5", 360, 208, 8)]
    assert s.float_bytes == 1352 and s.quantized_bytes == 536
    assert abs(s.ratio - 1352 / 536) < 1e-12

    qat(torch.randn(2, 3, 3, 3))
    integer = convert(qat.eval())
    si = model_size(integer)
    assert [(l.name, l.float_bytes, l.quantized_bytes) for l in si.layers] == [
        ("0", 0, 8), ("1", 992, 320), ("5", 360, 208)]

    # 4-bit LSQ weights: half a byte each (216 -> 108, 80 -> 40)
    s4 = model_size(prepare_qat(fuse(model, ["1", "2", "3"]), "int4_lsq"))
    assert [l.quantized_bytes for l in s4.layers] == [8, 108 + 64 + 32 + 8, 40 + 80 + 40 + 8]
    assert s4["1"].weight_bits == 4

    # dynamic: 80 int8 + 10 * 8 + float bias 40; the float layers count as float
    sd = model_size(quantize_dynamic(model))
    assert sd["5"].quantized_bytes == 200 and sd["5"].float_bytes == 360
    assert sd["1"].quantized_bytes == sd["1"].float_bytes == 864
    assert "| total |" in sd.table() and sd.as_dict()["quantized_bytes"] == sd.quantized_bytes


# --------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------


def _snapshot(model):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize(
    "other, match",
    [
        ("int4_lsq", r"'stem.0._extra_state': saved with another quantization config \(qconfig.activation.bits: saved 4, model has 8"),
        ("int8_per_tensor", r"qconfig.weight.axis: saved None, model has 0"),
        (QConfig(activation=get_qconfig("int8").activation, weight=QuantSpec(bits=8, axis=0, learnable=True)),
         r"qconfig.weight.learnable: saved True, model has False"),
    ],
)
def test_load_state_dict_from_another_qconfig_is_refused_and_nothing_loaded(other, match):
    src = _trained_qat(other, steps=2)
    saved = src.state_dict()
    dst = _trained_qat(INT8, steps=2)
    before = _snapshot(dst)
    with pytest.raises(StateDictMismatchError, match=match):
        dst.load_state_dict(saved)
    _same(before, _snapshot(dst))
    with pytest.raises(StateDictMismatchError, match=match):
        load_state_dict(dst, saved, strict=False)
    _same(before, _snapshot(dst))


def test_load_state_dict_same_qconfig_round_trips(tmp_path):
    src = _trained_qat(steps=3).eval()
    path = tmp_path / "qat.pt"
    torch.save(src.state_dict(), path)
    fresh = prepare_qat(fuse(SmallCNN()), INT8).eval()  # never run: per-channel buffers not yet sized
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = _inputs(1)[0]
    torch.testing.assert_close(fresh(x), src(x), rtol=0, atol=0)
    # converted models round-trip too
    integer = convert(src)
    again = convert(src)
    again.load_state_dict(integer.state_dict())
    torch.testing.assert_close(again(x), integer(x), rtol=0, atol=0)


def test_load_state_dict_strict_checks_up_front():
    dst = _trained_qat(steps=1)
    before = _snapshot(dst)
    saved = dict(_trained_qat(steps=2).state_dict())
    del saved["head.3.bias"]
    with pytest.raises(StateDictMismatchError, match="missing key 'head.3.bias'"):
        load_state_dict(dst, saved)
    _same(before, _snapshot(dst))
    saved["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match="unexpected key 'extra.weight'"):
        check_state_dict(dst, saved)
    # a float model's state dict does not fit a converted one
    integer = convert(_trained_qat(steps=1).eval())
    with pytest.raises(StateDictMismatchError, match="'stem.0.weight' has dtype torch.float32, the model expects torch.int8"):
        integer.load_state_dict({**integer.state_dict(), "stem.0.weight": torch.zeros(8, 3, 3, 3)})

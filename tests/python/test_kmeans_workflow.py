"""K-means weight quantization in the workflow: KMeansSpec, prepare_qat (clustering), centroid training,
label re-assignment, convert (packed labels + codebook), model_size, state dicts and TorchScript."""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qext
import qext.nn.quantized as nnq
from qext import KMeansSpec, QConfig


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def images(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 14, 14, generator=g)


# ------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=0), "bits must be an integer in 1..8, got 0"),
        (dict(bits=9), "bits must be an integer in 1..8, got 9"),
        (dict(init="random"), "init must be one of"),
        (dict(grad="max"), "grad must be one of"),
        (dict(reassign_every=0), "reassign_every must be None or a positive integer, got 0"),
        (dict(iters=-1), "iters must be a non-negative integer, got -1"),
    ],
)
def test_kmeans_spec_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KMeansSpec(**kwargs)


@pytest.mark.parametrize("bits, storage", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_storage_bits_is_the_next_packed_width(bits, storage):
    assert KMeansSpec(bits=bits).storage_bits == storage
    assert KMeansSpec(bits=bits).k == 2**bits


def test_kmeans_wrapper_arguments():
    w = torch.randn(64, 8)
    with pytest.raises(ValueError, match="exactly one of bits and k"):
        qext.kmeans(w, bits=2, k=4)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 9"):
        qext.kmeans(w, bits=9)
    c, labels = qext.kmeans(w, bits=3)
    assert c.shape == (8,) and labels.shape == w.shape and labels.dtype == torch.uint8
    c, labels = qext.kmeans(w, k=5, per_channel=True)
    assert c.shape == (64, 5)


def test_kmeans_assign_is_the_nearest_centroid():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 30, generator=g)
    c = torch.randn(7, generator=g)  # unsorted on purpose
    got = qext.kmeans_assign(w, c)
    expected = (w.unsqueeze(-1) - c).abs().argmin(dim=-1)
    assert torch.equal(got.long(), expected)
    cp = torch.randn(12, 5, generator=g)
    got = qext.kmeans_assign(w, cp, axis=0)
    expected = (w.unsqueeze(-1) - cp.unsqueeze(1)).abs().argmin(dim=-1)
    assert torch.equal(got.long(), expected)


# ------------------------------------------------------------------------------------ prepare_qat


def test_prepare_qat_clusters_every_linear_and_conv():
    model = small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch norms stay float by design: no warning
        qat = qext.prepare_qat(model, "kmeans2")
    kinds = [type(m) for m in qat]
    assert kinds.count(qext.nn.KMeansConv2d) == 2 and kinds.count(qext.nn.KMeansLinear) == 2
    assert isinstance(qat[1], nn.BatchNorm2d)
    for m in qat:
        if isinstance(m, (qext.nn.KMeansConv2d, qext.nn.KMeansLinear)):
            w = m.clustered_weight()
            assert w.shape == m.labels.shape
            assert torch.unique(w).numel() <= 4
            assert torch.equal(w, m.centroids[m.labels.long()])
    # the QAT forward is the float model with the clustered weights
    ref = qat[0]
    x = images()
    assert torch.equal(ref(x), F.conv2d(x, ref.centroids[ref.labels.long()], ref.bias, padding=1))


def test_fused_conv_bn_keeps_the_batch_norm_in_float():
    model = qext.fuse(small_cnn())
    qat = qext.prepare_qat(model, "kmeans4")
    first = qat[0]
    assert isinstance(first, nn.Sequential)
    assert isinstance(first[0], qext.nn.KMeansConv2d) and isinstance(first[1], nn.BatchNorm2d)
    assert isinstance(first[2], nn.ReLU)
    lin_relu = qat[7]
    assert isinstance(lin_relu, qext.nn.KMeansLinear) and lin_relu.relu


def test_fused_conv_bn_with_activation_quantization_is_refused():
    qc = QConfig(activation=qext.get_qconfig("int8").activation, weight=KMeansSpec(bits=4))
    with pytest.raises(ValueError, match="fused Conv-BN"):
        qext.prepare_qat(qext.fuse(small_cnn()), qc)


def test_centroid_gradient_is_the_sum_over_each_cluster():
    torch.manual_seed(0)
    lin = nn.Linear(20, 6)
    for grad, per_channel in [("sum", False), ("mean", False), ("sum", True)]:
        qc = QConfig(weight=KMeansSpec(bits=2, grad=grad, per_channel=per_channel))
        m = qext.nn.KMeansLinear.from_float(lin, qc)
        x = torch.randn(5, 20)
        m(x).square().sum().backward()
        dense = m.centroids.detach()[torch.arange(6).unsqueeze(1), m.labels.long()] if per_channel else \
            m.centroids.detach()[m.labels.long()]
        dense.requires_grad_(True)
        F.linear(x, dense, lin.bias.detach()).square().sum().backward()
        rows = m.labels.long() + (torch.arange(6).unsqueeze(1) * 4 if per_channel else 0)
        expected = torch.zeros(m.centroids.numel(), dtype=torch.float64).index_add_(
            0, rows.reshape(-1), dense.grad.double().reshape(-1))
        if grad == "mean":
            counts = torch.bincount(rows.reshape(-1), minlength=m.centroids.numel()).double()
            expected = torch.where(counts > 0, expected / counts.clamp(min=1), torch.zeros_like(expected))
        torch.testing.assert_close(m.centroids.grad.double().reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_training_the_codebook_lowers_the_loss_and_keeps_labels():
    torch.manual_seed(0)
    teacher = nn.Linear(16, 4)
    x = torch.randn(256, 16)
    y = teacher(x).detach()
    student = nn.Linear(16, 4)
    with torch.no_grad():
        student.weight.copy_(teacher.weight + 0.3 * torch.randn_like(teacher.weight))
    m = qext.nn.KMeansLinear.from_float(student, QConfig(weight=KMeansSpec(bits=3)))
    labels = m.labels.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(m.labels, labels)


def test_reassignment_moves_weights_to_their_nearest_centroid():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    m = qext.nn.KMeansLinear.from_float(lin, QConfig(weight=KMeansSpec(bits=2, reassign_every=3)))
    assert m.weight is not None and m.weight.requires_grad
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(64, 32)
    for step in range(3):
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        # the float weights receive the clustered weight's gradient (straight through)
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
        opt.step()
    m(x)  # the 4th training step re-assigns first
    nearest = (m.weight.detach().unsqueeze(-1) - m.centroids.detach()).abs().argmin(dim=-1)
    assert torch.equal(m.labels.long(), nearest)


def test_reassign_without_float_weights_is_an_error():
    m = qext.nn.KMeansLinear.from_float(nn.Linear(4, 2), qext.get_qconfig("kmeans2"))
    with pytest.raises(RuntimeError, match="reassign_every"):
        m.reassign()


# ---------------------------------------------------------------------------------------- convert


def converted_pair(preset="kmeans4", per_channel=False):
    qc = qext.get_qconfig(preset)
    if per_channel:
        qc = QConfig(weight=qc.weight.replace(per_channel=True))
    qat = qext.prepare_qat(small_cnn(), qc).eval()
    return qat, qext.convert(qat)


@pytest.mark.parametrize("preset", ["kmeans8", "kmeans4", "kmeans2"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_converted_model_matches_the_clustered_model(preset, per_channel):
    qat, conv = converted_pair(preset, per_channel)
    assert isinstance(conv[0], nnq.KMeansConv2d) and isinstance(conv[9], nnq.KMeansLinear)
    for q, c in zip(qat, conv):
        if isinstance(q, (qext.nn.KMeansConv2d, qext.nn.KMeansLinear)):
            assert torch.equal(c.dequantized_weight(), q.clustered_weight().detach())
    x = images(16)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), qat(x), rtol=1e-5, atol=1e-5)


def test_model_size_counts_packed_labels_codebook_and_bias():
    qat, conv = converted_pair("kmeans2")
    size = qext.model_size(conv)
    assert size.quantized_bytes == qext.model_size(qat).quantized_bytes
    lin = conv[7]
    expected = math.ceil(16 * 200 * 2 / 8) + 4 * 4 + 4 * 16
    assert size["7"].quantized_bytes == expected == lin.packed_labels.numel() + 4 * lin.centroids.numel() + 4 * 16
    assert size["7"].float_bytes == 4 * (16 * 200 + 16)
    assert size["7"].weight_bits == 2
    three_bit = qext.convert(qext.prepare_qat(small_cnn(), QConfig(weight=KMeansSpec(bits=3))).eval())
    assert three_bit[7].packed_labels.numel() == 16 * 200 // 2  # 3-bit labels are stored at 4 bits


def test_converted_state_dict_round_trips_bit_exactly():
    _, conv = converted_pair("kmeans4")
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    _, other = converted_pair("kmeans4", per_channel=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
        other[0].centroids.add_(1.0)
    other.load_state_dict(loaded)
    for key, value in conv.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(other.state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        assert torch.equal(other(x), conv(x))


def test_state_dict_of_other_bits_is_refused_and_nothing_loaded():
    _, conv4 = converted_pair("kmeans4")
    _, conv2 = converted_pair("kmeans2")
    before = {k: v.clone() for k, v in conv2.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(qext.StateDictMismatchError):
        conv2.load_state_dict(conv4.state_dict())
    for k, v in before.items():
        assert torch.equal(conv2.state_dict()[k], v)


def test_converted_model_exports_to_torchscript(tmp_path):
    _, conv = converted_pair("kmeans4")
    x = images(4)
    path = tmp_path / "kmeans.pt"
    qext.save_torchscript(conv, x, path)
    loaded = qext.load_torchscript(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x))


def test_kmeans_weights_with_int8_activations():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))
    qc = QConfig(activation=qext.get_qconfig("int8").activation, weight=KMeansSpec(bits=4))
    qat = qext.prepare_qat(qext.fuse(mlp), qc)
    x = torch.randn(128, 12)
    for _ in range(3):
        qat(x)  # observers see data
    qat.eval()
    conv = qext.convert(qat)
    with torch.no_grad():
        fq = qat(x)
        out = conv(x)
    assert out.is_quantized
    step = out.q_scale()
    assert (out.dequantize() - fq).abs().max() <= step * 1.001

"""The k-means codebook operators, called as torch.ops.qext.*: kmeans_dequantize against torch indexing,
its centroid gradient (_kmeans_centroid_grad) against index_add in float64, gradcheck / gradgradcheck in
float64, determinism across thread counts, and pack_labels / unpack_labels (round trips, the documented byte
layout, torch.save / torch.load), with every bad input. CUDA cases are skipped without CUDA."""

import io
import re

import pytest
import torch

import qext  # noqa: F401  (registers torch.ops.qext)

ops = torch.ops.qext


def cuda_usable() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "qext::kmeans_dequantize", "CUDA"
    )


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_usable(), reason="no CUDA device or no CUDA kernels")),
]
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AXES = (None, 0, 1, -1)
BITS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------------
# References (plain torch)
# --------------------------------------------------------------------------------------------------


def along(labels, axis):
    """The codebook index of every element (broadcastable to labels) and the number of codebooks."""
    a = axis % labels.dim()
    shape = [1] * labels.dim()
    shape[a] = labels.shape[a]
    return torch.arange(labels.shape[a], device=labels.device).view(shape), labels.shape[a]


def ref_dequantize(centroids, labels, axis):
    idx = labels.long()
    if axis is None:
        return centroids[idx]
    rows, _ = along(labels, axis)
    return centroids[rows.expand(labels.shape), idx]


def ref_centroid_grad(grad, labels, k, axis, mean):
    """Sum (or mean) of grad per (codebook, label) by index_add in float64."""
    bins, codebooks = labels.long(), 1
    if axis is not None:
        rows, codebooks = along(labels, axis)
        bins = bins + rows * k
    bins = bins.reshape(-1)
    sums = torch.zeros(codebooks * k, dtype=torch.float64, device=grad.device)
    sums.index_add_(0, bins, grad.reshape(-1).double())
    if mean:
        sizes = torch.zeros_like(sums).index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
        sums = torch.where(sizes > 0, sums / sizes, torch.zeros_like(sums))
    return sums if axis is None else sums.view(codebooks, k)


def ref_pack(labels, bits):
    """The documented format, independently: row-major labels, label i at bit (i % per) * bits of byte i // per."""
    per = 8 // bits
    flat = labels.reshape(-1).long().cpu()
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)])
    shifts = torch.arange(per) * bits
    return (padded.view(-1, per) << shifts).sum(1).to(torch.uint8)


def random_case(gen, shape, k, axis, dtype=torch.float32, label_dtype=torch.uint8):
    labels = torch.randint(0, k, shape, generator=gen).to(label_dtype)
    rows = 1 if axis is None else shape[axis % len(shape)]
    centroids = torch.randn((k,) if axis is None else (rows, k), generator=gen, dtype=torch.float64).to(dtype)
    return centroids, labels


# --------------------------------------------------------------------------------------------------
# kmeans_dequantize: forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis", AXES)
def test_forward_matches_indexing(axis, dtype, label_dtype, device):
    gen = torch.Generator().manual_seed(1)
    for k, shape in ((1, (4, 3, 5)), (3, (7, 5, 3)), (16, (9, 17, 2)), (256, (31, 9, 4))):
        centroids, labels = random_case(gen, shape, k, axis, dtype, label_dtype)
        out = ops.kmeans_dequantize(centroids.to(device), labels.to(device), axis, False)
        assert out.dtype == dtype and out.shape == labels.shape and out.is_contiguous()
        assert torch.equal(out.cpu(), ref_dequantize(centroids, labels, axis)), (k, shape)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_layouts_and_edge_shapes(device):
    gen = torch.Generator().manual_seed(2)
    centroids, labels = random_case(gen, (8, 6, 5), 5, 1)
    # Non-contiguous labels: the output is still contiguous and follows the labels' logical order.
    t = labels.transpose(0, 2).to(device)
    out = ops.kmeans_dequantize(centroids.to(device), t, 1, False)
    assert out.is_contiguous()
    assert torch.equal(out.cpu(), ref_dequantize(centroids, t.cpu(), 1))
    # Non-contiguous centroids.
    wide = torch.randn(6, 10, generator=gen)
    out = ops.kmeans_dequantize(wide[:, ::2].to(device), labels.to(device), 1, False)
    assert torch.equal(out.cpu(), ref_dequantize(wide[:, ::2], labels, 1))
    # A 0-dim label, empty labels, and an empty codebook dimension.
    c = torch.tensor([0.5, -2.0]).to(device)
    assert ops.kmeans_dequantize(c, torch.tensor(1, dtype=torch.uint8, device=device), None, False).item() == -2.0
    empty = ops.kmeans_dequantize(c, torch.zeros(0, 3, dtype=torch.uint8, device=device), None, False)
    assert empty.shape == (0, 3)
    no_codebooks = torch.zeros(0, 4, device=device)
    none = ops.kmeans_dequantize(no_codebooks, torch.zeros(2, 0, dtype=torch.uint8, device=device), 1, False)
    assert none.shape == (2, 0)


def test_forward_does_not_depend_on_mean():
    gen = torch.Generator().manual_seed(3)
    centroids, labels = random_case(gen, (10, 4), 8, 0)
    mean, total = (ops.kmeans_dequantize(centroids, labels, 0, m) for m in (True, False))
    assert torch.equal(mean, total)


# --------------------------------------------------------------------------------------------------
# Centroid gradient
# --------------------------------------------------------------------------------------------------


def run_backward(centroids, labels, upstream, axis, mean, device):
    c = centroids.detach().to(device).requires_grad_()
    w = ops.kmeans_dequantize(c, labels.to(device), axis, mean)
    w.backward(upstream.to(device))
    return c.grad.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean", (False, True))
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16))
def test_backward_matches_index_add(dtype, axis, mean, device):
    gen = torch.Generator().manual_seed(4)
    for k, shape in ((4, (12, 7, 5)), (256, (40, 9, 6))):  # k = 256: most clusters of a channel are empty
        centroids, labels = random_case(gen, shape, k, axis, dtype, torch.int64)
        upstream = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        got = run_backward(centroids, labels, upstream, axis, mean, device)
        assert got.dtype == dtype and got.shape == centroids.shape
        ref = ref_centroid_grad(upstream, labels, k, axis, mean)
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        else:
            # Summed in double, rounded once: the float64 reference rounded to the dtype.
            torch.testing.assert_close(got, ref.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_a_non_contiguous_upstream(device):
    gen = torch.Generator().manual_seed(5)
    centroids, labels = random_case(gen, (9, 14), 6, -1)
    upstream = torch.randn(14, 9, generator=gen).t()
    got = run_backward(centroids, labels, upstream, -1, False, device)
    torch.testing.assert_close(got, ref_centroid_grad(upstream, labels, 6, -1, False).float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", AXES)
def test_centroid_grad_op(axis, device):
    gen = torch.Generator().manual_seed(6)
    _, labels = random_case(gen, (6, 5, 4), 7, axis)
    grad = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    for mean in (False, True):
        got = ops._kmeans_centroid_grad(grad.to(device), labels.to(device), 7, axis, mean).cpu()
        torch.testing.assert_close(got, ref_centroid_grad(grad, labels, 7, axis, mean), rtol=1e-12, atol=1e-12)
    sums = ops._kmeans_centroid_grad(grad, labels, 7, axis, False)
    sizes = ops._kmeans_centroid_grad(torch.ones_like(grad), labels, 7, axis, False)
    means = ops._kmeans_centroid_grad(grad, labels, 7, axis, True)
    assert torch.equal(means, torch.where(sizes > 0, sums / sizes, torch.zeros_like(sums)))


@pytest.mark.parametrize("axis", AXES)
def test_gradcheck_sum(axis):
    gen = torch.Generator().manual_seed(7)
    centroids, labels = random_case(gen, (5, 4, 3), 3, axis, torch.float64)
    c = centroids.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.kmeans_dequantize(x, labels, axis, False), (c,))
    assert torch.autograd.gradgradcheck(lambda x: ops.kmeans_dequantize(x, labels, axis, False), (c,))


@pytest.mark.parametrize("axis", AXES)
def test_gradcheck_mean(axis):
    """mean=True is the sum divided by the cluster size, not the derivative of the forward, so it is checked
    through the backward op: gradcheck of _kmeans_centroid_grad(mean=True) as a function of grad (its
    numerical Jacobian is the averaging itself, its analytical one the gather of its double backward), and
    gradgradcheck of kmeans_dequantize(mean=True)."""
    gen = torch.Generator().manual_seed(8)
    centroids, labels = random_case(gen, (5, 4, 3), 4, axis, torch.float64)
    grad = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops._kmeans_centroid_grad(g, labels, 4, axis, True), (grad,))
    c = centroids.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: ops.kmeans_dequantize(x, labels, axis, True), (c,))


@pytest.mark.parametrize("mean", (False, True))
@pytest.mark.parametrize("axis,shape", ((None, (700, 600)), (0, (3, 70000)), (1, (70000, 3)), (1, (300, 400))))
def test_gradient_is_identical_for_every_thread_count(axis, shape, mean):
    """Codebooks of more than one piece (32768 elements) and many codebooks of one: the sums must be
    bit-identical for 1 to 4 threads. float64, where a change of summation order shows in the last bits
    (float32 gradients are summed in double and rounded once, which hides most of it)."""
    gen = torch.Generator().manual_seed(9)
    centroids, labels = random_case(gen, shape, 16, axis, torch.float64)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2, 3, 4, 1):
            torch.set_num_threads(threads)
            grads.append(run_backward(centroids, labels, upstream, axis, mean, "cpu"))
    finally:
        torch.set_num_threads(before)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])
    torch.testing.assert_close(grads[0], ref_centroid_grad(upstream, labels, 16, axis, mean), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not cuda_usable(), reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("mean", (False, True))
@pytest.mark.parametrize("axis", (None, 0, 1))
def test_cuda_gradient_is_deterministic_and_agrees_with_cpu(axis, mean):
    gen = torch.Generator().manual_seed(10)
    centroids, labels = random_case(gen, (1000, 700), 4, axis)  # k = 4: many lanes share a label
    upstream = torch.randn(1000, 700, generator=gen)
    first = run_backward(centroids, labels, upstream, axis, mean, "cuda")
    for _ in range(3):
        assert torch.equal(run_backward(centroids, labels, upstream, axis, mean, "cuda"), first)
    torch.testing.assert_close(first, run_backward(centroids, labels, upstream, axis, mean, "cpu"), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# pack_labels / unpack_labels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits, label_dtype, device):
    gen = torch.Generator().manual_seed(11)
    for n in (0, 1, 3, 5, 7, 9, 13, 31, 33, 63, 65, 101, 1023, 40001, 300007):
        labels = torch.randint(0, 1 << bits, (n,), generator=gen).to(label_dtype)
        packed = ops.pack_labels(labels.to(device), bits)
        assert packed.dtype == torch.uint8 and packed.shape == ((n * bits + 7) // 8,)
        assert torch.equal(packed.cpu(), ref_pack(labels, bits)), n
        unpacked = ops.unpack_labels(packed, bits, [n])
        assert unpacked.dtype == torch.uint8 and unpacked.device.type == device
        assert torch.equal(unpacked.cpu(), labels.to(torch.uint8)), n


@pytest.mark.parametrize("device", DEVICES)
def test_packed_bytes_by_hand(device):
    def pack(values, bits, dtype=torch.uint8):
        return ops.pack_labels(torch.tensor(values, dtype=dtype, device=device), bits).cpu().tolist()

    assert pack([1, 2, 3, 0, 2], 2) == [0x39, 0x02]  # 1 | 2 << 2 | 3 << 4 | 0 << 6, then 2 and zero padding
    assert pack([1, 0, 1, 1, 0, 0, 0, 1, 1], 1) == [0x8D, 0x01]
    assert pack([0xA, 0x3, 0xF], 4, torch.int64) == [0x3A, 0x0F]
    assert pack([7, 200, 255], 8, torch.int32) == [7, 200, 255]
    # Row-major order of the logical shape, whatever the memory layout.
    grid = torch.tensor([[1, 3], [2, 0]], dtype=torch.uint8, device=device)
    assert ops.pack_labels(grid.t(), 2).cpu().tolist() == [1 | 2 << 2 | 3 << 4]
    byte = torch.tensor([0x39], dtype=torch.uint8, device=device)
    assert ops.unpack_labels(byte, 2, [2, 2]).cpu().tolist() == [[1, 2], [3, 0]]


def test_packed_codebook_survives_torch_save_and_load_bit_for_bit():
    gen = torch.Generator().manual_seed(12)
    for bits in BITS:
        k = 1 << bits
        centroids, labels = random_case(gen, (33, 7, 3), k, 0)
        centroids[0, 0] = -0.0
        centroids[1, 0] = 1e-40  # subnormal
        state = {"packed": ops.pack_labels(labels, bits), "centroids": centroids, "shape": list(labels.shape)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
        assert torch.equal(loaded["packed"], state["packed"])
        assert torch.equal(loaded["centroids"].view(torch.int32), centroids.view(torch.int32))
        labels2 = ops.unpack_labels(loaded["packed"], bits, loaded["shape"])
        assert torch.equal(labels2, labels)
        w = ops.kmeans_dequantize(centroids, labels, 0, False)
        w2 = ops.kmeans_dequantize(loaded["centroids"], labels2, 0, False)
        assert torch.equal(w.view(torch.int32), w2.view(torch.int32))


@pytest.mark.skipif(not cuda_usable(), reason="no CUDA device or no CUDA kernels")
def test_cuda_packs_the_same_bytes_as_the_cpu():
    gen = torch.Generator().manual_seed(13)
    for bits in BITS:
        labels = torch.randint(0, 1 << bits, (1000, 37), generator=gen, dtype=torch.uint8)
        packed = ops.pack_labels(labels, bits)
        assert torch.equal(ops.pack_labels(labels.cuda(), bits).cpu(), packed)
        assert torch.equal(ops.unpack_labels(packed.cuda(), bits, [1000, 37]).cpu(), labels)


def test_meta_shapes():
    c = torch.empty(5, 16, device="meta")
    labels = torch.empty(5, 3, dtype=torch.uint8, device="meta")
    assert ops.kmeans_dequantize(c, labels, 0, False).shape == (5, 3)
    assert ops._kmeans_centroid_grad(torch.empty(5, 3, device="meta"), labels, 16, 0, True).shape == (5, 16)
    assert ops.pack_labels(labels, 2).shape == (4,)
    assert ops.unpack_labels(torch.empty(4, dtype=torch.uint8, device="meta"), 2, [5, 3]).shape == (5, 3)


# --------------------------------------------------------------------------------------------------
# Bad input: the documented exception, naming the argument and the value; inputs unchanged
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_label_outside_the_codebook(label_dtype, device):
    centroids = torch.randn(4, device=device)
    labels = torch.zeros(3, 5, dtype=label_dtype, device=device)
    labels[1, 2] = 4
    labels[2, 0] = 9  # a later bad label: the error names the first one
    before = labels.clone()
    msg = r"qext::kmeans_dequantize: labels must be in \[0, k\) for a codebook of k = 4 centroids, got 4 at index \[1, 2\]"
    with pytest.raises(IndexError, match=msg):
        ops.kmeans_dequantize(centroids, labels, None, False)
    assert torch.equal(labels, before)
    with pytest.raises(IndexError, match=r"_kmeans_centroid_grad: labels must be in \[0, k\) .* k = 4 .*got 4 at index \[1, 2\]"):
        ops._kmeans_centroid_grad(torch.ones(3, 5, device=device), labels, 4, None, False)
    if label_dtype != torch.uint8:
        labels[1, 2] = -1
        with pytest.raises(IndexError, match=r"k = 4 centroids, got -1 at index \[1, 2\]"):
            ops.kmeans_dequantize(centroids, labels, None, False)
    # Per-channel: the bound is the same k for every codebook.
    per_channel = torch.zeros(3, 5, dtype=label_dtype, device=device)
    per_channel[2, 0] = 9
    with pytest.raises(IndexError, match=r"k = 4 centroids, got 9 at index \[2, 0\]"):
        ops.kmeans_dequantize(torch.randn(5, 4, device=device), per_channel, 1, False)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_dequantize_arguments(device):
    c = torch.randn(4, device=device)
    labels = torch.zeros(3, 5, dtype=torch.uint8, device=device)
    with pytest.raises(TypeError, match=r"kmeans_dequantize: labels must be a uint8, int32 or int64 tensor, got Float"):
        ops.kmeans_dequantize(c, labels.float(), None, False)
    with pytest.raises(TypeError, match=r"labels must be a uint8, int32 or int64 tensor, got Short"):
        ops.kmeans_dequantize(c, labels.short(), None, False)
    with pytest.raises(TypeError, match=r"centroids must be a floating-point tensor .*got Long"):
        ops.kmeans_dequantize(c.long(), labels, None, False)
    with pytest.raises(ValueError, match=r"centroids must be one-dimensional \[k\] when axis is None, got shape \[3, 4\]"):
        ops.kmeans_dequantize(torch.randn(3, 4, device=device), labels, None, False)
    with pytest.raises(ValueError, match=r"centroids must be two-dimensional \[C, k\] .*axis 0\), got shape \[4\]"):
        ops.kmeans_dequantize(c, labels, 0, False)
    with pytest.raises(ValueError, match=r"centroids has 4 codebooks \(shape \[4, 4\]\) but labels has 5 entries along axis -1"):
        ops.kmeans_dequantize(torch.randn(4, 4, device=device), labels, -1, False)
    with pytest.raises(IndexError, match=r"kmeans_dequantize: axis 2 is out of range .* 2 dimensions"):
        ops.kmeans_dequantize(torch.randn(3, 4, device=device), labels, 2, False)
    for k in (0, 257):
        with pytest.raises(ValueError, match=rf"the codebook size k must be in \[1, 256\], got {k}$"):
            ops.kmeans_dequantize(torch.randn(k, device=device), labels, None, False)


@pytest.mark.skipif(not cuda_usable(), reason="no CUDA device or no CUDA kernels")
def test_devices_must_match():
    with pytest.raises(RuntimeError, match=r"centroids and labels must be on the same device"):
        ops.kmeans_dequantize(torch.randn(4), torch.zeros(3, dtype=torch.uint8, device="cuda"), None, False)


def test_bad_centroid_grad_arguments():
    labels = torch.zeros(3, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"_kmeans_centroid_grad: grad must have the shape of labels \[3, 5\], got \[5, 3\]"):
        ops._kmeans_centroid_grad(torch.ones(5, 3), labels, 4, None, False)
    with pytest.raises(TypeError, match=r"grad must be a floating-point tensor, got Int"):
        ops._kmeans_centroid_grad(torch.ones(3, 5, dtype=torch.int32), labels, 4, None, False)
    with pytest.raises(ValueError, match=r"the codebook size k must be in \[1, 256\], got 300"):
        ops._kmeans_centroid_grad(torch.ones(3, 5), labels, 300, None, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", (0, 3, 5, 16, -1))
def test_unsupported_bits(bits, device):
    labels = torch.zeros(4, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=rf"qext::pack_labels: bits must be 1, 2, 4 or 8, got {bits}$"):
        ops.pack_labels(labels, bits)
    with pytest.raises(ValueError, match=rf"qext::unpack_labels: bits must be 1, 2, 4 or 8, got {bits}$"):
        ops.unpack_labels(labels, bits, [4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_label_too_wide_to_pack(label_dtype, device):
    labels = torch.tensor([[1, 0, 3], [4, 1, 7]], dtype=label_dtype, device=device)
    before = labels.clone()
    msg = r"qext::pack_labels: labels must be in \[0, 2\^bits\) = \[0, 4\) for bits = 2, got 4 at index \[1, 0\]"
    with pytest.raises(ValueError, match=msg):
        ops.pack_labels(labels, 2)
    assert torch.equal(labels, before)
    if label_dtype != torch.uint8:
        with pytest.raises(ValueError, match=r"got -2 at index \[0\]"):
            ops.pack_labels(torch.tensor([-2, 0], dtype=label_dtype, device=device), 8)
    with pytest.raises(TypeError, match=r"pack_labels: labels must be a uint8, int32 or int64 tensor, got Float"):
        ops.pack_labels(labels.float(), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_packed_data(device):
    packed = torch.zeros(3, dtype=torch.uint8, device=device)
    msg = "qext::unpack_labels: packed has 3 bytes, but 7 labels of shape [7] at 4 bits need 4 bytes"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ops.unpack_labels(packed, 4, [7])
    with pytest.raises(ValueError, match=r"packed has 3 bytes, but 25 labels of shape \[5, 5\] at 1 bits need 4 bytes"):
        ops.unpack_labels(packed, 1, [5, 5])
    with pytest.raises(ValueError, match=r"packed must be one-dimensional, got shape \[1, 3\]"):
        ops.unpack_labels(packed.view(1, 3), 8, [3])
    with pytest.raises(TypeError, match=r"packed must be a uint8 tensor, got Char"):
        ops.unpack_labels(packed.to(torch.int8), 8, [3])
    with pytest.raises(ValueError, match=r"shape must not have negative dimensions, got \[3, -1\]"):
        ops.unpack_labels(packed, 8, [3, -1])

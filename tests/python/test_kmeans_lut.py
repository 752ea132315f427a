"""Look-up-table inference on packed k-means labels (torch.ops.qext.kmeans_linear / kmeans_decode) against
independent references:

* labels are packed here by a small packer written from the format (label i in byte i // (8 // bits), at
  bit offset (i % (8 // bits)) * bits), checked on a hand-packed case;
* kmeans_decode == centroids[labels] (one codebook, or one per output channel; any rank);
* kmeans_linear bit-identical to qext::_kmeans_linear_reference (the fixed accumulation order, scalar) on
  the decoded weight, on 1 and 2 threads, and close to F.linear on it (BLAS sums in another order);
* bad inputs raise the documented exception naming the argument and the value seen, inputs untouched;
* CUDA (skipped without a device and qext's CUDA kernels): bit-identical to the CPU.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import qext  # noqa: F401  (registers torch.ops.qext)

ops = torch.ops.qext
BITS = (1, 2, 4, 8)

cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("qext::kmeans_linear", "CUDA")),
    reason="needs a CUDA device and qext's CUDA kernels",
)


def pack_labels(labels: torch.Tensor, bits: int) -> torch.Tensor:
    """The packed format, written out: fields of `bits` bits, the first label of a byte lowest."""
    per_byte = 8 // bits
    flat = labels.flatten().to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)]).view(-1, per_byte)
    return (flat << (torch.arange(per_byte) * bits)).sum(1).to(torch.uint8)


def decode(labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """centroids[labels], the codebook of row n for row n when there is one per output channel."""
    if centroids.dim() == 1:
        return centroids[labels]
    rows = labels.reshape(labels.shape[0], -1)
    return torch.gather(centroids, 1, rows).reshape(labels.shape)


def random_weight(gen, shape, bits, k=None, per_channel=False):
    """(labels, centroids, packed) with labels in [0, k), k = 2^bits unless given."""
    k = 1 << bits if k is None else k
    labels = torch.randint(0, k, shape, generator=gen)
    centroids = torch.randn((shape[0], k) if per_channel else (k,), generator=gen)
    return labels, centroids, pack_labels(labels, bits)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (equality of these is bit-identity, -0.0 != +0.0 included)."""
    return t.contiguous().view(torch.int32)


def assert_bit_identical(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = bits_of(got) != bits_of(want)
    assert not bool(diff.any()), f"{int(diff.sum())} of {got.numel()} outputs differ, first at {diff.nonzero()[0].tolist()}"


def assert_close_to_dense_linear(y, x, w, bias):
    """|y - F.linear| within float rounding of the sum of |terms| (1e-5 of it: far above either order's
    error for these K, far below any wrong term)."""
    want = F.linear(x, w, bias)
    magnitude = x.abs() @ w.abs().t() + (0 if bias is None else bias.abs())
    assert bool(((y - want).abs() <= 1e-5 * magnitude + 1e-30).all())


# --------------------------------------------------------------------------------------------------
# The reference packer and decoding
# --------------------------------------------------------------------------------------------------


def test_reference_packer_hand_cases():
    assert pack_labels(torch.tensor([1, 2, 3, 0, 2]), 2).tolist() == [0x39, 0x02]
    assert pack_labels(torch.tensor([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
    assert pack_labels(torch.tensor([1, 0, 0, 0, 1, 1, 0, 1, 1]), 1).tolist() == [0xB1, 0x01]
    assert pack_labels(torch.tensor([7, 200]), 8).tolist() == [7, 200]


def test_decode_hand_case():
    centroids = torch.tensor([-1.5, 0.25, 3.0])
    packed = pack_labels(torch.tensor([2, 0, 1, 1, 2]), 2)  # [0x52, 0x02]
    out = ops.kmeans_decode(packed, centroids, 2, [5])
    assert out.tolist() == [3.0, -1.5, 0.25, 0.25, 3.0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 13), (16, 3, 3, 3), (3, 1, 5, 5), (33, 64)])
def test_decode_is_codebook_of_labels(bits, per_channel, shape):
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    for k in sorted({1, min(3, 1 << bits), 1 << bits, min(17, 1 << bits)}):
        labels, centroids, packed = random_weight(gen, shape, bits, k, per_channel)
        out = ops.kmeans_decode(packed, centroids, bits, list(shape))
        assert_bit_identical(out, decode(labels, centroids))


def test_decoded_conv_weight_runs_the_float_conv():
    gen = torch.Generator().manual_seed(3)
    labels, centroids, packed = random_weight(gen, (8, 4, 3, 3), 4, per_channel=True)
    w = ops.kmeans_decode(packed, centroids, 4, [8, 4, 3, 3])
    x = torch.randn(2, 4, 9, 9, generator=gen)
    assert_bit_identical(F.conv2d(x, w, padding=1), F.conv2d(x, decode(labels, centroids), padding=1))


# --------------------------------------------------------------------------------------------------
# kmeans_linear
# --------------------------------------------------------------------------------------------------

LINEAR_SHAPES = [(1, 1, 1), (1, 7, 16), (1, 33, 257), (2, 9, 15), (3, 4, 47), (5, 17, 100), (8, 64, 300), (13, 5, 129)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES)
def test_linear_bit_identical_to_reference_and_close_to_f_linear(bits, per_channel, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K + bits)
    for k, with_bias in ((1 << bits, True), (max(1, (1 << bits) - 1), False), (min(17, 1 << bits), True)):
        labels, centroids, packed = random_weight(gen, (N, K), bits, k, per_channel)
        x = torch.randn(M, K, generator=gen)
        bias = torch.randn(N, generator=gen) if with_bias else None
        y = ops.kmeans_linear(x, packed, centroids, bits, [N, K], bias)
        w = decode(labels, centroids)
        assert_bit_identical(y, ops._kmeans_linear_reference(x, w, bias))
        assert_close_to_dense_linear(y, x, w, bias)


def test_linear_leading_dims_and_noncontiguous_input():
    gen = torch.Generator().manual_seed(5)
    labels, centroids, packed = random_weight(gen, (24, 40), 4)
    x = torch.randn(40, 2, 3, generator=gen).permute(1, 2, 0)  # [2, 3, 40], not contiguous
    bias = torch.randn(48, generator=gen)[::2]  # [24], strided
    y = ops.kmeans_linear(x, packed, centroids, 4, [24, 40], bias)
    assert y.shape == (2, 3, 24)
    assert_bit_identical(y, ops._kmeans_linear_reference(x.contiguous(), decode(labels, centroids), bias.contiguous()))


def test_linear_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(7)
    labels, centroids, packed = random_weight(gen, (301, 517), 4, per_channel=True)
    x = torch.randn(9, 517, generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.kmeans_linear(x, packed, centroids, 4, [301, 517]))
    finally:
        torch.set_num_threads(threads)
    assert_bit_identical(outs[1], outs[0])
    assert_bit_identical(outs[2], outs[0])


def test_linear_empty_batch():
    gen = torch.Generator().manual_seed(9)
    _, centroids, packed = random_weight(gen, (6, 10), 2)
    y = ops.kmeans_linear(torch.empty(0, 10), packed, centroids, 2, [6, 10])
    assert y.shape == (0, 6) and y.dtype == torch.float32


def test_reference_order_is_not_sequential():
    """The reference sums 16 lanes (k mod 16) and then a tree: with x = 2^24 at k = 0 and 1 at k = 1 and 17,
    lane 1 holds 2 before it meets 2^24 (a left-to-right sum would round 2^24 + 1 back to 2^24 twice)."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 17] = 2.0**24, 1.0, 1.0
    y = ops._kmeans_linear_reference(x, torch.ones(1, 32))
    assert y.item() == 2.0**24 + 2


def test_meta_shapes():
    x = torch.empty(4, 5, 12, device="meta")
    packed = torch.empty(3 * 12 // 2, dtype=torch.uint8, device="meta")
    centroids = torch.empty(16, device="meta")
    assert ops.kmeans_linear(x, packed, centroids, 4, [3, 12]).shape == (4, 5, 3)
    assert ops.kmeans_decode(packed, centroids, 4, [3, 2, 6]).shape == (3, 2, 6)
    with pytest.raises(ValueError, match="packed_labels has 18 bytes"):
        ops.kmeans_linear(x, packed, centroids, 4, [4, 12])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def linear_args(bits=4, N=6, K=10, k=None, per_channel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    _, centroids, packed = random_weight(gen, (N, K), bits, k, per_channel)
    return torch.randn(3, K, generator=gen), packed, centroids, bits, [N, K], torch.randn(N, generator=gen)


def expect_error(exc, pattern, *args, op=ops.kmeans_linear):
    """op(*args) raises exc matching pattern and leaves every tensor argument as it was."""
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=pattern):
        op(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [0, 3, 5, 16, -1])
def test_bad_bits(bits):
    x, packed, centroids, _, shape, bias = linear_args()
    expect_error(ValueError, rf"qext::kmeans_linear: bits must be 1, 2, 4 or 8, got {bits}$", x, packed, centroids, bits, shape, bias)
    expect_error(ValueError, rf"qext::kmeans_decode: bits must be 1, 2, 4 or 8, got {bits}$", packed, centroids, bits, shape,
                 op=ops.kmeans_decode)


@pytest.mark.parametrize("bits,bytes_", [(4, 29), (4, 31), (2, 14), (8, 59), (1, 0)])
def test_packed_length(bits, bytes_):
    x, packed, centroids, _, shape, bias = linear_args(bits=bits)
    wrong = torch.zeros(bytes_, dtype=torch.uint8)
    need = (60 * bits + 7) // 8
    pattern = rf"packed_labels has {bytes_} bytes, but weight_shape \[6, 10\] at {bits} bits needs ceil\(60 \* {bits} / 8\) = {need}"
    expect_error(ValueError, pattern, x, wrong, centroids, bits, shape, bias)
    expect_error(ValueError, pattern, wrong, centroids, bits, shape, op=ops.kmeans_decode)


def test_packed_dtype_and_rank():
    x, packed, centroids, bits, shape, bias = linear_args()
    expect_error(TypeError, "packed_labels must be uint8, got Char", x, packed.to(torch.int8), centroids, bits, shape, bias)
    expect_error(ValueError, r"packed_labels must be 1-D, got shape \[5, 6\]", x, packed.view(5, 6), centroids, bits, shape, bias)


def test_centroids_dtype_shape_and_size():
    x, packed, centroids, bits, shape, bias = linear_args()
    expect_error(TypeError, "centroids must be float32, got Double", x, packed, centroids.double(), bits, shape, bias)
    expect_error(ValueError, r"centroids must be \[k\] \(one codebook\) or \[6, k\] \(one per output channel\), got shape \[5, 16\]",
                 x, packed, torch.randn(5, 16), bits, shape, bias)
    expect_error(ValueError, r"centroids must be \[k\].*got shape \[1, 6, 16\]", x, packed, torch.randn(1, 6, 16), bits, shape, bias)
    expect_error(ValueError, r"centroids has k = 17 entries per codebook, but 4-bit labels address 1 to 16",
                 x, packed, torch.randn(17), bits, shape, bias)
    expect_error(ValueError, r"centroids has k = 0 entries", x, packed, torch.randn(6, 0), bits, shape, bias)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_label_out_of_range(bits, per_channel):
    N, K = 7, 45
    k = max(1, (1 << bits) - 3) if bits > 1 else 1
    gen = torch.Generator().manual_seed(bits)
    labels = torch.randint(0, k, (N, K), generator=gen)
    labels[4, 21] = k + (1 if bits > 2 else 0)  # the first bad label
    labels[6, 44] = (1 << bits) - 1
    centroids = torch.randn((N, k) if per_channel else (k,), generator=gen)
    packed = pack_labels(labels, bits)
    x = torch.randn(2, K, generator=gen)
    pattern = (rf"packed_labels holds label {int(labels[4, 21])} at element {4 * K + 21} \(row 4, column 21\), "
               rf"but centroids has only k = {k} entries \(labels must be < k\)")
    expect_error(IndexError, "qext::kmeans_linear: " + pattern, x, packed, centroids, bits, [N, K])
    expect_error(IndexError, "qext::kmeans_decode: " + pattern, packed, centroids, bits, [N, K], op=ops.kmeans_decode)


def test_label_in_the_last_partial_byte_is_checked():
    labels = torch.zeros(1, 5, dtype=torch.int64)
    labels[0, 4] = 3
    packed = pack_labels(labels, 2)  # 2 bytes, the label in the second
    with pytest.raises(IndexError, match=r"label 3 at element 4 \(row 0, column 4\), but centroids has only k = 3"):
        ops.kmeans_decode(packed, torch.randn(3), 2, [1, 5])


def test_weight_shape():
    x, packed, centroids, bits, _, bias = linear_args()
    expect_error(ValueError, r"qext::kmeans_linear: weight_shape must have 2 sizes, got \[60\]", x, packed, centroids, bits, [60], bias)
    expect_error(ValueError, r"weight_shape must have 2 sizes, got \[6, 10, 1\]", x, packed, centroids, bits, [6, 10, 1], bias)
    expect_error(ValueError, r"weight_shape must have positive sizes, got \[0, 10\] \(size 0 is 0\)", x, packed, centroids, bits,
                 [0, 10], bias)
    expect_error(ValueError, r"qext::kmeans_decode: weight_shape must have at least one size, got \[\]", packed, centroids, bits, [],
                 op=ops.kmeans_decode)
    expect_error(ValueError, r"weight_shape must have positive sizes, got \[6, -1, 10\] \(size 1 is -1\)", packed, centroids, bits,
                 [6, -1, 10], op=ops.kmeans_decode)


def test_input_and_bias():
    x, packed, centroids, bits, shape, bias = linear_args()
    expect_error(TypeError, "qext::kmeans_linear: input must be float32, got Double", x.double(), packed, centroids, bits, shape, bias)
    expect_error(ValueError, r"input of shape \[3, 11\] does not end in the weight's K = 10", torch.randn(3, 11), packed, centroids,
                 bits, shape, bias)
    expect_error(ValueError, r"input of shape \[\] does not end", torch.tensor(1.0), packed, centroids, bits, shape, bias)
    expect_error(TypeError, "bias must be float32, got Half", x, packed, centroids, bits, shape, bias.half())
    expect_error(ValueError, r"bias must have shape \[6\], got \[7\]", x, packed, centroids, bits, shape, torch.randn(7))
    expect_error(ValueError, r"bias must have shape \[6\], got \[1, 6\]", x, packed, centroids, bits, shape, bias[None])


def test_reference_op_checks():
    with pytest.raises(TypeError, match="qext::_kmeans_linear_reference: weight must be float32, got Double"):
        ops._kmeans_linear_reference(torch.randn(2, 3), torch.randn(4, 3).double())
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with N, K > 0, got shape \[12\]"):
        ops._kmeans_linear_reference(torch.randn(2, 3), torch.randn(12))
    with pytest.raises(ValueError, match=r"input of shape \[2, 3\] does not end in the weight's K = 4"):
        ops._kmeans_linear_reference(torch.randn(2, 3), torch.randn(5, 4))


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------


@cuda_kernels
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES + [(64, 256, 1024), (257, 40, 33)])
def test_cuda_linear_bit_identical_to_cpu(bits, per_channel, M, N, K):
    gen = torch.Generator().manual_seed(M + N + K + bits)
    labels, centroids, packed = random_weight(gen, (N, K), bits, max(1, (1 << bits) - 1), per_channel)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    want = ops.kmeans_linear(x, packed, centroids, bits, [N, K], bias)
    got = ops.kmeans_linear(x.cuda(), packed.cuda(), centroids.cuda(), bits, [N, K], bias.cuda())
    assert got.is_cuda
    assert_bit_identical(got.cpu(), want)
    nobias = ops.kmeans_linear(x.cuda(), packed.cuda(), centroids.cuda(), bits, [N, K])
    assert_bit_identical(nobias.cpu(), ops.kmeans_linear(x, packed, centroids, bits, [N, K]))


@cuda_kernels
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(5, 13), (16, 3, 3, 3)])
def test_cuda_decode(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    labels, centroids, packed = random_weight(gen, shape, bits, per_channel=True)
    out = ops.kmeans_decode(packed.cuda(), centroids.cuda(), bits, list(shape))
    assert_bit_identical(out.cpu(), decode(labels, centroids))


@cuda_kernels
def test_cuda_errors_match_cpu():
    labels = torch.zeros(3, 8, dtype=torch.int64)
    labels[1, 2] = 9
    packed, centroids, x = pack_labels(labels, 4), torch.randn(9), torch.randn(2, 8)
    pattern = re.escape("label 9 at element 10 (row 1, column 2), but centroids has only k = 9")
    with pytest.raises(IndexError, match=pattern):
        ops.kmeans_linear(x.cuda(), packed.cuda(), centroids.cuda(), 4, [3, 8])
    with pytest.raises(IndexError, match=pattern):
        ops.kmeans_decode(packed.cuda(), centroids.cuda(), 4, [3, 8])
    with pytest.raises(RuntimeError, match="input is on cpu but the weight is on cuda"):
        ops.kmeans_linear(x, packed.cuda(), centroids.cuda(), 4, [3, 8])
    with pytest.raises(RuntimeError, match="centroids is on cpu but packed_labels is on cuda"):
        ops.kmeans_decode(packed.cuda(), centroids, 4, [3, 8])

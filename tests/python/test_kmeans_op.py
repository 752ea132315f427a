"""torch.ops.qext.kmeans: hand-computed cases, agreement with a plain float64 Lloyd loop written here (nearest
centroid by distance, index_add sums) started from the same init, each init, per-channel against one call per
row, determinism across runs and thread counts, dtypes and layouts, CUDA against CPU bit for bit, and every bad
input."""

import re

import pytest
import torch

import qext  # noqa: F401  (registers torch.ops.qext)
from qext_testing import DEVICES, cuda_usable

kmeans = torch.ops.qext.kmeans
INITS = ["linear", "density", "kmeans++"]


def linear_init(x: torch.Tensor, k: int) -> torch.Tensor:
    lo, hi = float(x.min()), float(x.max())
    if k == 1:
        return torch.tensor([0.5 * lo + 0.5 * hi], dtype=torch.float64)
    return torch.tensor([lo + (hi - lo) * j / (k - 1) for j in range(k)], dtype=torch.float64)


def density_init(x: torch.Tensor, k: int) -> torch.Tensor:
    s = x.flatten().double().sort().values
    n = s.numel()
    return s[[(2 * j + 1) * n // (2 * k) for j in range(k)]].clone()


def plain_lloyd(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd on the unsorted values in float64: nearest centroid by distance (argmin: ties to the lower index),
    sums by index_add, an empty cluster keeps its centroid; stops when no centroid changes."""
    x = x.flatten().double()
    c = c.double().clone()
    for _ in range(iters):
        labels = (x[:, None] - c[None, :]).abs().argmin(1)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=c.numel())
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def assert_nearest(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor):
    """labels[i] is the index of the centroid nearest to x[i] (exact ties: the lower index, as argmin), except
    where two centroids are within rounding of a tie."""
    x = x.flatten().double()
    c = centroids.double()
    d = (x[:, None] - c[None, :]).abs()
    best = d.argmin(1)
    got = labels.flatten().long()
    gap = (d.gather(1, got[:, None]) - d.gather(1, best[:, None])).squeeze(1)
    bad = (got != best) & (gap > 1e-12 * x.abs().clamp(min=1.0))
    assert not bad.any(), f"labels not nearest at {bad.nonzero()[:5].flatten().tolist()}"


def random_weight(seed: int, shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_hand_computed():
    # Linear init [0, 12], midpoint 6: means 1 and 11, then nothing changes.
    c, labels = kmeans(torch.tensor([12.0, 0, 11, 1, 10, 2]), 2)
    assert c.tolist() == [1.0, 11.0] and c.dtype == torch.float32
    assert labels.tolist() == [1, 0, 1, 0, 1, 0] and labels.dtype == torch.uint8


def test_tie_goes_to_the_lower_centroid():
    # Init [0, 4]: 2 is as far from both and joins 0; means 1 and 4.
    c, labels = kmeans(torch.tensor([4.0, 2, 0]), 2)
    assert c.tolist() == [1.0, 4.0] and labels.tolist() == [1, 0, 0]
    c, labels = kmeans(torch.tensor([4.0, 2, 0]), 2, max_iters=0)
    assert c.tolist() == [0.0, 4.0] and labels.tolist() == [1, 0, 0]


def test_empty_cluster_keeps_its_centroid():
    c, labels = kmeans(torch.tensor([0.0, 0, 0, 10, 10, 10]), 3)
    assert c.tolist() == [0.0, 5.0, 10.0]
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]


def test_inits_by_hand():
    x = torch.tensor([5.0, 3, -3, 8, 1, 2, 4, 6, 7], dtype=torch.float64)
    assert kmeans(x, 3, init="linear", max_iters=0)[0].tolist() == [-3.0, 2.5, 8.0]
    assert kmeans(x, 1, init="linear", max_iters=0)[0].tolist() == [2.5]
    # Sorted -3 1 2 3 4 5 6 7 8; ranks floor((2j + 1) 9 / 6) = 1, 4, 7.
    assert kmeans(x, 3, init="density", max_iters=0)[0].tolist() == [1.0, 4.0, 7.0]


# --------------------------------------------------------------------------------------------------
# Against the plain Lloyd loop
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("k", [1, 2, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_plain_lloyd(init, k, dtype):
    x = random_weight(k, (40, 250), dtype)
    if init == "linear":
        start = linear_init(x, k)
    elif init == "density":
        start = density_init(x, k)
    else:  # qext's own k-means++ init: zero iterations return it (exactly, for float64 weights)
        start = kmeans(x.double(), k, init=init, max_iters=0, seed=3)[0]
    expected = plain_lloyd(x, start, 30)
    c, labels = kmeans(x, k, init=init, max_iters=30, seed=3)
    assert c.dtype == dtype and c.shape == (k,)
    assert torch.all(c[1:] >= c[:-1])
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-7)
    assert labels.shape == x.shape and labels.dtype == torch.uint8 and labels.is_contiguous()
    assert_nearest(x, c, labels)


def test_result_is_a_fixed_point():
    """Run to convergence: every centroid is the mean of its cluster."""
    x = random_weight(5, (3000,))
    c, labels = kmeans(x, 8, max_iters=10000)
    for j in range(8):
        members = x[labels == j].double()
        assert members.numel() > 0
        assert abs(members.mean().item() - c[j].item()) <= 1e-6 * max(1.0, abs(c[j].item()))


def test_labels_are_the_nearest_rounded_centroid():
    """float16 / bfloat16: centroids are rounded to the weight's dtype and the labels follow the rounded values."""
    for dtype in (torch.float16, torch.bfloat16):
        x = random_weight(7, (5000,), dtype)
        c, labels = kmeans(x, 32, init="density")
        assert c.dtype == dtype
        assert_nearest(x, c, labels)
        expected = plain_lloyd(x, density_init(x, 32), 30).to(dtype)
        torch.testing.assert_close(c, expected, rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Inits
# --------------------------------------------------------------------------------------------------


def test_kmeans_plus_plus_is_seeded():
    x = random_weight(2, (20000,), torch.float64)
    a = kmeans(x, 16, init="kmeans++", seed=5, max_iters=0)[0]
    b = kmeans(x, 16, init="kmeans++", seed=5, max_iters=0)[0]
    other = kmeans(x, 16, init="kmeans++", seed=6, max_iters=0)[0]
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.isin(a, x).all(), "k-means++ picks values of the data"
    assert torch.all(a[1:] >= a[:-1])


def test_kmeans_plus_plus_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    x = (torch.arange(3000) % 3).double() * 10 + 0.01 * torch.randn(3000, generator=g, dtype=torch.float64)
    for seed in range(10):
        c = kmeans(x, 3, init="kmeans++", seed=seed, max_iters=0)[0]
        torch.testing.assert_close(c, torch.tensor([0.0, 10.0, 20.0], dtype=torch.float64), atol=0.1, rtol=0)


# --------------------------------------------------------------------------------------------------
# Per channel, determinism, layouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("shape,axis", [((6, 300), 0), ((300, 5), 1), ((300, 5), -1), ((4, 7, 60), 1), ((3, 2, 50), -3)])
def test_per_channel_equals_one_call_per_row(init, shape, axis):
    x = random_weight(len(shape) + axis, shape)
    c, labels = kmeans(x, 8, axis, init, 20, 11)
    channels = x.shape[axis]
    assert c.shape == (channels, 8) and labels.shape == x.shape and labels.is_contiguous()
    for i in range(channels):
        ci, li = kmeans(x.select(axis, i), 8, None, init, 20, 11)
        assert torch.equal(c[i], ci), f"row {i}"
        assert torch.equal(labels.select(axis, i), li), f"row {i}"


def test_deterministic_across_runs_and_threads():
    x = random_weight(3, (64, 700))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append((kmeans(x, 16), kmeans(x, 16, axis=0, init="kmeans++", seed=9)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for (c0, l0), (c1, l1) in zip(results[0], r):
            assert torch.equal(c0, c1) and torch.equal(l0, l1)


def test_order_and_layout_do_not_matter():
    x = random_weight(4, (200, 150))
    c, labels = kmeans(x, 16)
    ct, lt = kmeans(x.t(), 16)  # the same values, another memory order
    assert torch.equal(c, ct) and torch.equal(lt, labels.t())
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))
    cp, lp = kmeans(x.flatten()[perm], 16)
    assert torch.equal(cp, c) and torch.equal(lp, labels.flatten()[perm])


def test_zero_dim_and_single_value():
    c, labels = kmeans(torch.tensor(2.5), 1)
    assert c.tolist() == [2.5] and labels.shape == () and labels.item() == 0
    c, labels = kmeans(torch.tensor([-1.0, 3.0]), 2)
    assert c.tolist() == [-1.0, 3.0] and labels.tolist() == [0, 1]


def test_signed_zeros_are_one_value():
    c, labels = kmeans(torch.tensor([-0.0, 0.0, -0.0, 1.0]), 2)
    assert c.tolist() == [0.0, 1.0] and not torch.signbit(c[0])
    assert labels.tolist() == [0, 0, 0, 1]


# --------------------------------------------------------------------------------------------------
# CUDA: the same bits as the CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not cuda_usable(), reason="no CUDA device with qext's CUDA kernels")
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_cuda_matches_cpu(init, dtype, axis):
    x = random_weight(9, (24, 500), dtype)
    c, labels = kmeans(x, 16, axis, init, 30, 2)
    cd, ld = kmeans(x.cuda(), 16, axis, init, 30, 2)
    assert cd.device.type == "cuda" and ld.device.type == "cuda"
    assert torch.equal(cd.cpu(), c) and torch.equal(ld.cpu(), labels)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, -1, 257, 1000])
def test_k_out_of_range(k, device):
    with pytest.raises(ValueError, match=rf"qext::kmeans: k must be in \[1, 256\] \(labels are uint8\), got {k}$"):
        kmeans(torch.randn(300, device=device), k)


@pytest.mark.parametrize("device", DEVICES)
def test_k_larger_than_the_values(device):
    with pytest.raises(ValueError, match=r"qext::kmeans: k = 7 is larger than the number of weights, 6$"):
        kmeans(torch.randn(2, 3, device=device), 7)
    with pytest.raises(ValueError, match=r"k = 4 is larger than the number of weights per codebook, 3 \(one codebook "
                                         r"per index along axis 0 of shape \[2, 3\]\)"):
        kmeans(torch.randn(2, 3, device=device), 4, axis=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 3), None), ((0, 3), 1), ((3, 0), 0)])
def test_empty(shape, axis, device):
    with pytest.raises(ValueError, match=re.escape(f"qext::kmeans: weight is empty (shape {list(shape)})")):
        kmeans(torch.empty(shape, device=device), 1, axis)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_non_finite(bad, shown, device):
    x = torch.randn(4, 50, device=device)
    x[2, 17] = bad
    before = x.clone()
    with pytest.raises(ValueError, match=rf"qext::kmeans: weight must be finite, found {shown}$"):
        kmeans(x, 4)
    with pytest.raises(ValueError, match=rf"qext::kmeans: weight must be finite, found {shown} in codebook 2 along axis 0$"):
        kmeans(x, 4, axis=0)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [2, -3, 5])
def test_bad_axis(axis, device):
    with pytest.raises(IndexError, match=rf"qext::kmeans: axis {axis} is out of range for an input with 2 dimensions"):
        kmeans(torch.randn(4, 5, device=device), 2, axis)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init", ["", "Linear", "kmeans", "random"])
def test_bad_init(init, device):
    with pytest.raises(ValueError, match=rf'qext::kmeans: init must be "linear", "density" or "kmeans\+\+", got "{init}"$'):
        kmeans(torch.randn(10, device=device), 2, init=init)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,shown", [(torch.int32, "Int"), (torch.int64, "Long"), (torch.uint8, "Byte"),
                                         (torch.bool, "Bool"), (torch.complex64, "ComplexFloat")])
def test_bad_dtype(dtype, shown, device):
    with pytest.raises(TypeError, match=r"qext::kmeans: weight must be a floating-point tensor \(float32, float64, "
                                        rf"float16 or bfloat16\), got {shown}$"):
        kmeans(torch.ones(10, device=device).to(dtype), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_max_iters(device):
    with pytest.raises(ValueError, match=r"qext::kmeans: max_iters must be >= 0, got -1$"):
        kmeans(torch.randn(10, device=device), 2, max_iters=-1)

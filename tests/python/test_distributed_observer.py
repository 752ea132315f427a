"""Observers under torch.distributed: two gloo processes on the CPU observe different data; after
calculate_qparams (which synchronises) both ranks hold identical statistics and scales, equal to a
single process's result on the union of the data (min/max, histogram) or to the mean of the
ranks' averages (EMA, LSQ initialisation)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qext.fake_quant import FakeQuantize
from qext.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver
from qext.qconfig import QuantSpec, get_qconfig

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)

WORLD = 2

# name -> (observer factory, batches per rank); histograms in several modes
CASES = {
    "minmax": lambda: MinMaxObserver(signed=False, symmetric=False),
    "minmax_per_channel": lambda: MinMaxObserver(axis=1),
    "minmax_per_channel_rank1_idle": lambda: MinMaxObserver(axis=0),
    "hist_entropy_sym": lambda: HistogramObserver(histogram_method="entropy"),
    "hist_entropy_aff": lambda: HistogramObserver(signed=False, symmetric=False, histogram_method="entropy"),
    "hist_percentile": lambda: HistogramObserver(histogram_method="percentile", percentile=99.0, bins=512),
    "hist_mse_aff": lambda: HistogramObserver(signed=False, symmetric=False, histogram_method="mse", bins=512),
}


def rank_batches(name: str, rank: int, round_: int):
    if name.endswith("rank1_idle") and rank == 1:
        return []
    g = torch.Generator().manual_seed(1000 * round_ + 10 * rank + len(name))
    scale = 1.0 + rank + round_  # ranks see different ranges
    return [torch.randn(64, 6, generator=g) * scale + 0.5 * rank for _ in range(2)]


def ema_batches(rank: int):
    g = torch.Generator().manual_seed(77 + rank)
    return [torch.randn(32, 3, generator=g) * (1 + rank) for _ in range(3)]


def lsq_weight(rank: int):
    return torch.randn(5, 7, generator=torch.Generator().manual_seed(5 + rank)) * (1 + rank)


def _worker(rank: int, init_method: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        res = {}
        observers = {name: make() for name, make in CASES.items()}
        for round_ in (0, 1):  # observe, synchronise, observe more, synchronise again
            for name, obs in observers.items():
                for x in rank_batches(name, rank, round_):
                    obs(x)
                res[(name, round_)] = obs.calculate_qparams()
                res[(name, round_, "again")] = obs.calculate_qparams()  # idempotent
                if isinstance(obs, HistogramObserver):
                    res[(name, round_, "hist")] = (obs.histogram.clone(), obs.grid())

        ema = MovingAverageMinMaxObserver(axis=1, averaging_constant=0.2)
        for x in ema_batches(rank):
            ema(x)
        res["ema"] = ema.calculate_qparams()
        res["ema_minmax"] = (ema.min_val.clone(), ema.max_val.clone())

        lsq = FakeQuantize(get_qconfig("int4_lsq").weight)  # training mode: initialisation averaged
        lsq(lsq_weight(rank))
        res["lsq"] = lsq.scale.detach().clone()

        # QAT under DDP (buffers not broadcast): the forward synchronises the activation observer
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), FakeQuantize(get_qconfig("int8").activation))
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(8, 4, generator=g) * (1 + 3 * rank)).sum().backward()
            opt.step()
        res["ddp"] = (model[1].scale.clone(), model[1].zero_point.clone(), model[0].weight.detach().clone())
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = str(tmp / "res")
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{_free_port()}", out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_ranks_identical(results):
    r0, r1 = results
    assert r0.keys() == r1.keys()
    for key in r0:
        if key == "ddp":
            continue
        assert_same(r0[key], r1[key])
    assert_same(r0["ddp"][:2], r1["ddp"][:2])


@pytest.mark.parametrize("name", list(CASES))
def test_equal_to_single_process_on_union(results, name):
    r0 = results[0]
    single = CASES[name]()
    for round_ in (0, 1):
        for rank in range(WORLD):
            for x in rank_batches(name, rank, round_):
                single(x)
        assert_same(r0[(name, round_)], single.calculate_qparams())
        assert_same(r0[(name, round_, "again")], r0[(name, round_)])
        if isinstance(single, HistogramObserver):
            assert_same(r0[(name, round_, "hist")], (single.histogram, single.grid()))


def test_ema_is_mean_of_rank_averages(results):
    singles = []
    for rank in range(WORLD):
        obs = MovingAverageMinMaxObserver(axis=1, averaging_constant=0.2)
        for x in ema_batches(rank):
            obs(x)
        singles.append(obs)
    lo = ((singles[0].min_val.double() + singles[1].min_val.double()) / 2).float()
    hi = ((singles[0].max_val.double() + singles[1].max_val.double()) / 2).float()
    assert_same(results[0]["ema_minmax"], (lo, hi))
    ref = MinMaxObserver(axis=1)
    ref(torch.stack([lo, hi]))
    assert_same(results[0]["ema"], ref.calculate_qparams())


def test_lsq_init_is_mean_of_rank_inits(results):
    inits = []
    for rank in range(WORLD):
        fq = FakeQuantize(get_qconfig("int4_lsq").weight)
        fq(lsq_weight(rank))
        inits.append(fq.scale.detach().double())
    assert_same(results[0]["lsq"], ((inits[0] + inits[1]) / WORLD).float())


def test_not_initialised_process_group_means_local():
    assert not dist.is_initialized()
    obs = MinMaxObserver()
    obs(torch.tensor([1.0, -2.0]))
    obs.synchronize()  # no-op without a process group
    assert obs.min_val.item() == -2.0
    assert QuantSpec().bits == 8

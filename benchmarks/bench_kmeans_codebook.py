#!/usr/bin/env python3
"""Benchmark qext's k-means codebook operators against plain PyTorch, in one process, on the CPU.

Cases (a float32 weight of --shape, k centroids, one codebook or one per row / column):
  dequantize          torch.ops.qext.kmeans_dequantize        vs centroids[labels] (take / gather with int64 labels)
  centroid grad sum   torch.ops.qext._kmeans_centroid_grad    vs zeros(C*k).index_add_(0, bins, grad) (float32)
  centroid grad mean  the same with mean=True                 vs index_add_ of grad and of ones, then a division
  pack / unpack       torch.ops.qext.pack_labels / unpack_labels at 4 bits  vs shifts and a sum over bytes in torch
The torch anchors get their int64 indices (and per-channel bins) precomputed, outside the timing; qext reads the
uint8 labels a converted layer stores. Both run with the same thread count (torch.set_num_threads, set
explicitly); the two are timed alternately in each repeat and the median of --repeats runs is reported after
--warmup runs. Before timing, the results of the two are compared (equal, or the largest difference for the sums).

Prints a Markdown table and writes JSON (default results/bench_kmeans_codebook.json). This is a program, not a
test: the machines are shared and noisy, so read the ratios, not lone absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import qext  # noqa: F401  (registers torch.ops.qext)
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

REPO_ROOT = Path(__file__).resolve().parent.parent
ops = torch.ops.qext


def parse_shape(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--shape needs two positive dimensions, got {text!r}")
    return parts[0], parts[1]


def codebook_bins(labels: torch.Tensor, k: int, axis):
    """Flat bin c * k + label of every weight, as int64 (torch's index ops need it)."""
    bins = labels.long()
    if axis is None:
        return bins.reshape(-1), 1
    shape = [1, 1]
    shape[axis] = labels.shape[axis]
    return (bins + torch.arange(labels.shape[axis]).view(shape) * k).reshape(-1), labels.shape[axis]


def make_cases(shape, k, gen):
    labels = torch.randint(0, k, shape, generator=gen, dtype=torch.uint8)
    grad = torch.randn(shape, generator=gen)
    cases = []
    for axis in (None, 0, 1):
        name = "per-tensor" if axis is None else f"axis {axis}"
        rows = 1 if axis is None else shape[axis]
        centroids = torch.randn((k,) if axis is None else (rows, k), generator=gen)
        bins, codebooks = codebook_bins(labels, k, axis)
        flat_table = centroids.reshape(-1)
        out_shape = centroids.shape

        def torch_dequantize(flat_table=flat_table, bins=bins):
            return flat_table.take(bins).view(shape)

        def qext_dequantize(centroids=centroids, axis=axis):
            return ops.kmeans_dequantize(centroids, labels, axis, False)

        def torch_sum(g=grad, bins=bins, codebooks=codebooks, out_shape=out_shape):
            return torch.zeros(codebooks * k, dtype=g.dtype).index_add_(0, bins, g.reshape(-1)).view(out_shape)

        def torch_mean(g=grad, bins=bins, codebooks=codebooks, out_shape=out_shape):
            sums = torch.zeros(codebooks * k, dtype=g.dtype).index_add_(0, bins, g.reshape(-1))
            sizes = torch.zeros_like(sums).index_add_(0, bins, torch.ones(1, dtype=g.dtype).expand(bins.numel()))
            return torch.where(sizes > 0, sums / sizes, torch.zeros_like(sums)).view(out_shape)

        def qext_grad(axis=axis, mean=False):
            return ops._kmeans_centroid_grad(grad, labels, k, axis, mean)

        # The gradient cases carry their float64 reference: the torch anchor on float64 gradients.
        cases += [
            (f"dequantize {name}", torch_dequantize, qext_dequantize, None),
            (f"centroid grad sum {name}", torch_sum, qext_grad, torch_sum(grad.double())),
            (f"centroid grad mean {name}", torch_mean, lambda axis=axis: qext_grad(axis, True), torch_mean(grad.double())),
        ]

    bits, per = 4, 2
    small = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    packed = ops.pack_labels(small, bits)

    def torch_pack():
        return (small.reshape(-1, per) << shifts).sum(1, dtype=torch.uint8)

    def torch_unpack():
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).view(shape)

    cases += [
        ("pack 4-bit", torch_pack, lambda: ops.pack_labels(small, bits), None),
        ("unpack 4-bit", torch_unpack, lambda: ops.unpack_labels(packed, bits, list(shape)), None),
    ]
    return cases


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(2048, 2048), help="weight shape (default 2048x2048)")
    parser.add_argument("--k", type=int, default=16, help="centroids per codebook (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both (default 2)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_kmeans_codebook.json")
    args = parser.parse_args()
    if args.shape[0] * args.shape[1] % 2:
        parser.error("--shape needs an even number of elements (the 4-bit pack anchor pairs labels)")

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, torch_fn, qext_fn, ref64 in make_cases(args.shape, args.k, gen):
        ref, got = torch_fn(), qext_fn()
        if ref64 is None:
            check = "equal" if torch.equal(got, ref) else "DIFFERENT"
        else:
            def err(x):
                return float((x.double() - ref64).abs().max())

            check = f"max error vs float64: torch {err(ref):.1e}, qext {err(got):.1e}"
        for _ in range(args.warmup):
            torch_fn()
            qext_fn()
        t_torch, t_qext = [], []
        for _ in range(args.repeats):
            t_torch.append(time_once(torch_fn))
            t_qext.append(time_once(qext_fn))
        mt, mq = statistics.median(t_torch), statistics.median(t_qext)
        rows.append({"case": name, "torch_ms": mt * 1e3, "qext_ms": mq * 1e3, "speedup": mt / mq, "check": check})

    print(f"shape {args.shape[0]}x{args.shape[1]}, k {args.k}, threads {args.threads}, median of {args.repeats}")
    print("| case | torch ms | qext ms | qext speed-up | results |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['torch_ms']:.2f} | {r['qext_ms']:.2f} | {r['speedup']:.2f}x | {r['check']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": args.shape, "k": args.k, "threads": args.threads, "repeats": args.repeats,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    args.json.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

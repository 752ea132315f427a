#!/usr/bin/env python3
"""1-D k-means of a large weight: ``torch.ops.qext.kmeans`` against a plain Lloyd loop in torch, one process.

Weight: ``torch.randn(4096, 4096)`` (16.8 M float32 values, one codebook), k = 16 and 256, ``--iters`` Lloyd
iterations from the same "linear" init (evenly spaced from the minimum to the maximum), the same thread count for
both (``--threads``, set explicitly; default 1).

  qext   torch.ops.qext.kmeans(w, k, None, "linear", iters): radix-tree order statistics, exact Lloyd steps,
         labels of the final centroids. Median of ``--reps`` calls (each call does everything: init, iterations,
         labels).
  plain  a chunked Lloyd loop: |x - c| for a chunk of 65536 values against all centroids, argmin, index_add of
         the values (float64 sums) and bincount; centroids updated in float64, an empty cluster keeps its
         centroid, stop when no centroid changes; then a final assignment for the labels. One call (it takes
         seconds to minutes). When its next iteration would end past ``--plain-budget`` seconds, it stops after the
         iterations that fit and its time is extrapolated linearly to ``--iters`` iterations (each iteration does
         the same work); the table says so.

"qext CPU s" is the process's CPU time per call (user + system, all threads): on a shared machine the wall time
also holds the time the call waited for a core.

SSE (sum of squared errors of the weight against its centroid, float64) is compared after the same number of
iterations: the plain loop's iterations and a qext call with that max_iters. "ratio" is plain / qext time
(> 1: qext is faster). Targets (issue 5): k = 16 in <= 0.3 s, k = 256 in <= 1 s on one core.

Prints a Markdown table and writes JSON (default results/bench_kmeans.json). A program, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_int8_cpu import table, write_json  # noqa: E402  (shared by the CPU benchmarks)

try:
    import qext  # noqa: F401  (registers torch.ops.qext)
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

CHUNK = 1 << 16
TARGETS = {16: 0.3, 256: 1.0}


def linear_init(w: torch.Tensor, k: int) -> torch.Tensor:
    """qext's "linear" init: lo + (hi - lo) * j / (k - 1) in float64."""
    lo, hi = float(w.min()), float(w.max())
    return torch.tensor([lo + (hi - lo) * j / (k - 1) for j in range(k)], dtype=torch.float64)


def assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each value (argmin of |x - c| over chunks; ties to the lower index)."""
    c32 = c.float()
    return torch.cat([(x[s:s + CHUNK, None] - c32[None, :]).abs_().argmin(1) for s in range(0, x.numel(), CHUNK)])


def plain_lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, budget: float):
    """The plain loop. Returns (centroids, labels, iterations run, seconds, stopped for the budget)."""
    k = c.numel()
    t0 = time.perf_counter()
    done = 0
    for it in range(iters):
        sums = torch.zeros(k, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.int64)
        c32 = c.float()
        for s in range(0, x.numel(), CHUNK):
            xc = x[s:s + CHUNK]
            labels = (xc[:, None] - c32[None, :]).abs_().argmin(1)
            sums.index_add_(0, labels, xc.double())
            counts += torch.bincount(labels, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        done = it + 1
        if torch.equal(new, c):
            break
        c = new
        elapsed = time.perf_counter() - t0
        if done < iters and elapsed / done * (done + 1) > budget:
            labels = assign(x, c)
            return c, labels, done, time.perf_counter() - t0, True
    labels = assign(x, c)
    return c, labels, done, time.perf_counter() - t0, False


def sse(x: torch.Tensor, c: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((x.double() - c.double()[labels.long()]) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ks", default="16,256")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--plain-budget", type=float, default=300.0, help="seconds for one plain run before it is cut")
    ap.add_argument("--json", default=str(REPO_ROOT / "results" / "bench_kmeans.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    x = w.flatten()
    result = {"threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "numel": w.numel(), "iters": args.iters, "rows": []}
    for k in (int(s) for s in args.ks.split(",")):
        run = lambda iters=args.iters: torch.ops.qext.kmeans(w, k, None, "linear", iters, 0)  # noqa: E731
        run()  # warm-up
        times, cpu = [], []
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            c, labels = run()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        q = statistics.median(times)
        all_iters = not torch.equal(c, run(args.iters - 1)[0])
        pc, plabels, done, pt, cut = plain_lloyd(x, linear_init(w, k), args.iters, args.plain_budget)
        plain_time = pt / done * args.iters if cut else pt
        qc, qlabels = (c, labels) if done == args.iters else run(done)
        q_sse, p_sse = sse(x, qc, qlabels.flatten()), sse(x, pc, plabels)
        row = {
            "k": k,
            "qext s (median)": f"{q:.3f}",
            "qext min..max": f"{min(times):.3f}..{max(times):.3f}",
            "qext CPU s (median)": f"{statistics.median(cpu):.3f}",
            "qext ran all iterations": "yes" if all_iters else "no (converged)",
            "plain s": f"{plain_time:.1f}" + (f" (extrapolated from {done} it.)" if cut else ""),
            "ratio plain/qext": f"{plain_time / q:.0f}x",
            "SSE after": f"{done} it.",
            "SSE qext": f"{q_sse:.6e}",
            "SSE plain": f"{p_sse:.6e}",
            "SSE rel. diff": f"{(q_sse - p_sse) / p_sse:+.1e}",
            "target s": TARGETS.get(k, ""),
        }
        result["rows"].append(row)
        print(table(f"k = {row['k']}", [row], list(row)), flush=True)
    print(f"\nthreads={args.threads}, torch {torch.__version__}, {w.numel()} float32 values, {args.iters} iterations\n")
    print(table("qext.kmeans vs a plain Lloyd loop", result["rows"], list(result["rows"][0])))
    write_json(args.json, result)


if __name__ == "__main__":
    main()

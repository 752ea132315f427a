#!/usr/bin/env python3
"""Look-up-table inference on packed k-means labels against the dense float layer, one process.

For each shape M x K -> N (1x4096->4096, 64x1024->1024, 256x512->512), label width (2, 4, 8 bits, full
codebooks k = 2^bits, one for the weight or with --codebook channel one per output channel) and thread count (1 and 2, set explicitly for both variants):
``torch.ops.qext.kmeans_linear`` on the packed labels vs ``F.linear`` on the decoded fp32 weight (MKL /
oneDNN), the same input, bias and output. Timings are medians of ``--reps`` calls taken round-robin (one
call of each variant in turn, so the machine's noise hits both alike). Weight traffic is the bytes each
variant must read for its weight (packed labels + codebooks, or the fp32 weight) per call; "ratio" is
F.linear's time over kmeans_linear's (> 1: the look-up-table kernel is faster).

Prints a Markdown table and writes JSON (default results/bench_kmeans_lut.json). A program, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    import qext  # noqa: F401  (registers torch.ops.qext)
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_int8_cpu import time_round_robin  # noqa: E402  (one round-robin timer for the CPU benchmarks)

ops = torch.ops.qext
SHAPES = ((1, 4096, 4096), (64, 1024, 1024), (256, 512, 512))


def pack_labels(labels: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    flat = labels.flatten().to(torch.int64).view(-1, per_byte)  # numel is a multiple of 8 here
    return (flat << (torch.arange(per_byte) * bits)).sum(1).to(torch.uint8)


def variants(M: int, K: int, N: int, bits: int, per_channel: bool):
    g = torch.Generator().manual_seed(M + K + N + bits)
    k = 1 << bits
    labels = torch.randint(0, k, (N, K), generator=g)
    centroids = torch.randn(N if per_channel else 1, k, generator=g) * 0.05
    dense = torch.gather(centroids.expand(N, k), 1, labels)
    if not per_channel:
        centroids = centroids[0]
    packed = pack_labels(labels, bits)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g)
    # Same bits as the dense layer's result up to BLAS order (the tests check this exactly).
    y = ops.kmeans_linear(x, packed, centroids, bits, [N, K], bias)
    torch.testing.assert_close(y, F.linear(x, dense, bias), rtol=1e-4, atol=1e-4)
    fns = {
        "kmeans_linear": lambda: ops.kmeans_linear(x, packed, centroids, bits, [N, K], bias),
        "F.linear fp32": lambda: F.linear(x, dense, bias),
    }
    traffic = {"kmeans_linear": packed.numel() + centroids.numel() * 4, "F.linear fp32": dense.numel() * 4}
    return fns, traffic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--codebook", choices=("tensor", "channel"), default="tensor",
                    help="one codebook for the weight, or one per output channel")
    ap.add_argument("--json", default=str(REPO_ROOT / "results" / "bench_kmeans_lut.json"))
    args = ap.parse_args()
    rows = []
    with torch.no_grad():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for M, K, N in SHAPES:
                for bits in (int(b) for b in args.bits.split(",")):
                    fns, traffic = variants(M, K, N, bits, args.codebook == "channel")
                    t = time_round_robin(fns, args.reps)
                    for name, sec in t.items():
                        rows.append({"threads": threads, "shape": f"{M}x{K}->{N}", "bits": bits, "variant": name,
                                     "us": round(sec * 1e6, 1), "weight MB": round(traffic[name] / 1e6, 2),
                                     "weight GB/s": round(traffic[name] / sec / 1e9, 1),
                                     "ratio": round(t["F.linear fp32"] / t["kmeans_linear"], 2)
                                     if name == "kmeans_linear" else 1.0})
    columns = ["threads", "shape", "bits", "variant", "us", "weight MB", "weight GB/s", "ratio"]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, median of {args.reps}, "
          f"codebook per {args.codebook}; ratio = F.linear time / kmeans_linear time")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "reps": args.reps, "codebook": args.codebook, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

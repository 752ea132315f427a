#!/usr/bin/env python3
"""GPU benchmark of qext's int8 quantized_linear (CUDA kernel: tensor-core u8 x s8 GEMM with the
fused requantization epilogue) against the anchors on the same M, N, K:

  int_mm   torch._int_mm (cuBLASLt int8 -> int32, no epilogue: it writes 4 bytes per output where
           quantized_linear writes 1), needs M > 16 and K, N multiples of 8
  bf16     torch.matmul of bfloat16 [M, K] x [K, N]

quantized_linear gets a torch.quint8 input and a per-channel packed weight (pack_quantized_weight on
the CPU, moved with .cuda()), writes torch.quint8 (--float-output: float32). Its weight_scale and
bias stay on the CPU, where int8_args reads them (on the GPU they would cost a device-to-host copy
per call); the per-channel parameters go to the GPU once per call (pinned, asynchronous).

Timing: torch.cuda.Event around --iters back-to-back calls, --repeats times after --warmup calls;
medians. Prints a table of times, TOPS (2 M N K / time) and ratios, and writes JSON (default
results/bench_int8_cuda.json). Targets (issue): >= 0.8x torch._int_mm on large shapes, >= 2x bf16
matmul where compute-bound. Exits with a message (status 0) when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

try:
    import qext  # noqa: F401  (registers torch.ops.qext)
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ["4096x4096x4096", "8192x8192x8192", "1024x4096x4096", "64x1024x1024", "1x4096x4096"]


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"shapes are MxNxK with positive sizes, got {text!r}")
    return parts[0], parts[1], parts[2]


def time_ms(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median over repeats of the mean time of `iters` back-to-back calls (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def bench_shape(M: int, N: int, K: int, args) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (M, K), generator=gen, dtype=torch.uint8)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(N, generator=gen) * 0.01 + 0.001
    bias = torch.randn(N, generator=gen)
    packed, row_sums = torch.ops.qext.pack_quantized_weight(w)
    packed, row_sums = packed.to(dev), row_sums.to(dev)
    x = torch._make_per_tensor_quantized_tensor(levels.to(dev), 0.02, 128)
    out_scale = None if args.float_output else 0.05

    def qext_fn():
        return torch.ops.qext.quantized_linear(x, packed, row_sums, [N, K], w_scale, bias, out_scale, 128,
                                               0, 255, False)

    row = {"M": M, "N": N, "K": K, "output": "float32" if args.float_output else "quint8"}
    ops = 2.0 * M * N * K
    row["qext_ms"] = time_ms(qext_fn, args.warmup, args.iters, args.repeats)

    a8 = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8).to(dev)
    b8 = w.to(dev).t()  # [K, N], column-major: cuBLASLt's preferred int8 layout
    if M > 16 and K % 8 == 0 and N % 8 == 0:
        row["int_mm_ms"] = time_ms(lambda: torch._int_mm(a8, b8), args.warmup, args.iters,
                                   args.repeats)
    else:
        row["int_mm_ms"] = None
    del a8

    a16 = torch.randn(M, K, generator=gen).to(dev, torch.bfloat16)
    b16 = torch.randn(K, N, generator=gen).to(dev, torch.bfloat16)
    row["bf16_ms"] = time_ms(lambda: torch.matmul(a16, b16), args.warmup, args.iters, args.repeats)
    del a16, b16

    for name in ("qext", "int_mm", "bf16"):
        t = row[f"{name}_ms"]
        row[f"{name}_tops"] = None if t is None else ops / (t * 1e-3) / 1e12
    row["qext_vs_int_mm"] = None if row["int_mm_ms"] is None else row["int_mm_ms"] / row["qext_ms"]
    row["qext_vs_bf16"] = row["bf16_ms"] / row["qext_ms"]
    torch.cuda.empty_cache()
    return row


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES], help="MxNxK ...")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples (median)")
    parser.add_argument("--float-output", action="store_true", help="float32 output (no requant)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench_int8_cuda.json")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_int8_cuda: no CUDA device here; nothing to measure (run it on the GPU machine)")
        return 0
    if not torch._C._dispatch_has_kernel_for_dispatch_key("qext::quantized_linear", "QuantizedCUDA"):
        print("bench_int8_cuda: this qext was built without its CUDA kernels")
        return 0

    rows = [bench_shape(M, N, K, args) for (M, N, K) in args.shapes]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    print("| M x N x K | qext ms | int_mm ms | bf16 ms | qext TOPS | int_mm TOPS | bf16 TFLOPS "
          "| qext / int_mm speed | qext / bf16 speed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']}x{r['N']}x{r['K']} | {r['qext_ms']:.4f} | {fmt(r['int_mm_ms'], '.4f')} "
              f"| {r['bf16_ms']:.4f} | {r['qext_tops']:.1f} | {fmt(r['int_mm_tops'], '.1f')} "
              f"| {r['bf16_tops']:.1f} | {fmt(r['qext_vs_int_mm'], '.2f')}x "
              f"| {r['qext_vs_bf16']:.2f}x |")
    result = {
        "benchmark": "bench_int8_cuda",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timing": {"warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
                   "statistic": "median of repeats of the mean over iters (torch.cuda.Event)"},
        "targets": {"qext_vs_int_mm_large": 0.8, "qext_vs_bf16_compute_bound": 2.0},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

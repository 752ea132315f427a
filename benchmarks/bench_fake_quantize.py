#!/usr/bin/env python3
"""Benchmark qext's fake-quantization operators against PyTorch's native ones, in one process.

Cases (float32 input, default shape 64x64x56x56, per-channel along axis 1):
  per-tensor fwd          qext.fake_quantize            vs torch.fake_quantize_per_tensor_affine
  per-channel fwd         qext.fake_quantize(axis=1)    vs torch.fake_quantize_per_channel_affine
  per-tensor fwd+bwd      the same, straight-through backward of a fixed upstream gradient
  per-channel fwd+bwd
  learnable per-tensor fwd+bwd   qext.fake_quantize_learnable vs torch._fake_quantize_learnable_per_tensor_affine
  learnable per-channel fwd+bwd  (axis=1)                     vs torch._fake_quantize_learnable_per_channel_affine
Learnable cases learn both scale and zero point (LSQ+), so both libraries compute the same gradients.

Both libraries get the same inputs, the same thread count (torch.set_num_threads, set explicitly) and the
same upstream gradient tensor; the two are timed alternately in each repeat (time.perf_counter, CUDA
synchronised around each timing) and the median of --repeats runs is reported, after --warmup runs.
Before timing, the outputs (and gradients) of the two are compared and the largest difference is reported.

Prints a Markdown table and writes JSON (default results/bench_fake_quantize.json).  This is a program,
not a test: the machines are shared and noisy, so read the ratios, not lone absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import qext
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

REPO_ROOT = Path(__file__).resolve().parent.parent

# glibc returns freed blocks over 32 MiB to the OS, so every 51 MB output of either library is
# page-faulted in afresh and the page faults, not the kernels, dominate the times. The benchmark
# re-runs itself with thresholds that keep freed memory for reuse, as a caching allocator (jemalloc,
# tcmalloc, or PyTorch's own on CUDA) would; --system-malloc measures glibc's defaults instead.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
QMIN, QMAX = 0, 255  # uint8 range for all cases


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().replace("x", ",").split(",")
    shape = tuple(int(p) for p in parts if p.strip())
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape needs at least two positive dimensions, got {text!r}")
    return shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_cases(x: torch.Tensor, axis: int):
    """Each case: name, kind ('fwd' or 'fwd+bwd'), and a factory returning (torch_fn, qext_fn, grads_fn).

    A fn runs one timed iteration and returns what is compared between the libraries (the output, and
    for backward cases the gradients)."""
    dev = x.device
    C = x.shape[axis]
    g = torch.Generator(device="cpu").manual_seed(1)
    # quantization parameters chosen so that a few percent of the values clip at each end
    amax = float(x.abs().amax())
    s_pt = 2 * amax / (QMAX - QMIN) * 0.9
    z_pt = (QMAX - QMIN + 1) // 2
    s_pc = (torch.rand(C, generator=g) * 0.5 + 0.75).mul_(s_pt).to(dev)
    z_pc = torch.randint(100, 156, (C,), generator=g, dtype=torch.int32).to(dev)
    upstream = torch.randn(x.shape, generator=g).to(dev)  # the same upstream gradient for both
    n_per_tensor = x.numel()
    gf_pt = 1.0 / math.sqrt(n_per_tensor * QMAX)
    gf_pc = 1.0 / math.sqrt(n_per_tensor / C * QMAX)

    def fwd(torch_op, qext_op):
        def run(op):
            def f():
                with torch.no_grad():
                    return (op(x),)
            return f
        return run(torch_op), run(qext_op)

    def fwd_bwd(torch_op, qext_op, params_factory):
        def run(op):
            xg = x.detach().clone().requires_grad_(True)
            params = params_factory()

            def f():
                xg.grad = None
                for p in params:
                    p.grad = None
                y = op(xg, *params)
                y.backward(upstream)
                return (y.detach(), xg.grad, *[p.grad for p in params])
            return f
        return run(torch_op), run(qext_op)

    no_params = lambda: []  # noqa: E731

    def learnable_params(scale, zero_point):
        return lambda: [scale.detach().clone().float().requires_grad_(True),
                        zero_point.detach().clone().float().requires_grad_(True)]

    s_pt_t = torch.tensor([s_pt], device=dev)
    z_pt_t = torch.tensor([float(z_pt)], device=dev)

    return [
        ("per-tensor", "fwd", lambda: fwd(
            lambda t: torch.fake_quantize_per_tensor_affine(t, s_pt, z_pt, QMIN, QMAX),
            lambda t: qext.fake_quantize(t, s_pt, z_pt, QMIN, QMAX))),
        ("per-channel", "fwd", lambda: fwd(
            lambda t: torch.fake_quantize_per_channel_affine(t, s_pc, z_pc, axis, QMIN, QMAX),
            lambda t: qext.fake_quantize(t, s_pc, z_pc, QMIN, QMAX, axis=axis))),
        ("per-tensor STE", "fwd+bwd", lambda: fwd_bwd(
            lambda t: torch.fake_quantize_per_tensor_affine(t, s_pt, z_pt, QMIN, QMAX),
            lambda t: qext.fake_quantize(t, s_pt, z_pt, QMIN, QMAX), no_params)),
        ("per-channel STE", "fwd+bwd", lambda: fwd_bwd(
            lambda t: torch.fake_quantize_per_channel_affine(t, s_pc, z_pc, axis, QMIN, QMAX),
            lambda t: qext.fake_quantize(t, s_pc, z_pc, QMIN, QMAX, axis=axis), no_params)),
        ("learnable per-tensor", "fwd+bwd", lambda: fwd_bwd(
            lambda t, s, z: torch._fake_quantize_learnable_per_tensor_affine(t, s, z, QMIN, QMAX, gf_pt),
            lambda t, s, z: qext.fake_quantize_learnable(t, s, z, QMIN, QMAX, grad_factor=gf_pt),
            learnable_params(s_pt_t, z_pt_t))),
        ("learnable per-channel", "fwd+bwd", lambda: fwd_bwd(
            lambda t, s, z: torch._fake_quantize_learnable_per_channel_affine(t, s, z, axis, QMIN, QMAX, gf_pc),
            lambda t, s, z: qext.fake_quantize_learnable(t, s, z, QMIN, QMAX, grad_factor=gf_pc, axis=axis),
            learnable_params(s_pc, z_pc))),
    ]


def max_diff(a: tuple, b: tuple) -> list[float]:
    """Largest |torch - qext| per compared tensor: absolute for the elementwise results (output, input
    gradient: the first two); for the reductions after them (scale and zero-point gradients) relative to
    the largest |torch| of that gradient.  The reductions sum millions of terms, so their results depend on
    the summation order: torch accumulates in float32, a difference of ~1e-3 of the largest entry is
    expected and is torch's rounding error, not necessarily qext's."""
    out = []
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            out.append(float("nan") if (u is None) != (v is None) else 0.0)
            continue
        d = float((u.double() - v.double()).abs().max())
        if i >= 2:
            d /= max(float(u.double().abs().max()), 1e-30)
        out.append(d)
    return out


def time_pair(torch_fn, qext_fn, device, warmup: int, repeats: int):
    for _ in range(warmup):
        torch_fn()
        qext_fn()
    sync(device)
    times = {"torch": [], "qext": []}
    fns = [("torch", torch_fn), ("qext", qext_fn)]
    for r in range(repeats):
        for name, fn in (fns if r % 2 == 0 else fns[::-1]):  # alternate the order against drift
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=(64, 64, 56, 56),
                   help="input shape, e.g. 64x64x56x56 or 64,64,56,56")
    p.add_argument("--axis", type=int, default=1, help="channel axis of the per-channel cases")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (both libraries)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", default="", help="comma-separated substrings; run only matching cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_fake_quantize.json")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc thresholds (large outputs page-faulted on every call)")
    args = p.parse_args(argv)

    if not args.system_malloc and os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x = torch.randn(args.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    numel = x.numel()
    axis = args.axis % x.dim()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, qext {getattr(qext, '__version__', '?')}, device {args.device} ({dev_name}), "
          f"threads {torch.get_num_threads()}, shape {'x'.join(map(str, args.shape))} float32 "
          f"({numel / 1e6:.1f} M elements), per-channel axis {axis} (C={x.shape[axis]}), "
          f"median of {args.repeats} after {args.warmup} warm-up, "
          f"malloc: {'glibc defaults' if args.system_malloc else 'freed blocks kept for reuse (' + MALLOC_TUNABLES + ')'}")

    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    rows = []
    for name, kind, factory in make_cases(x, axis):
        label = f"{name} {kind}"
        if wanted and not any(w in label for w in wanted):
            continue
        torch_fn, qext_fn = factory()
        diffs = max_diff(torch_fn(), qext_fn())
        times = time_pair(torch_fn, qext_fn, device, args.warmup, args.repeats)
        t_torch = statistics.median(times["torch"])
        t_qext = statistics.median(times["qext"])
        row = dict(case=label, torch_ms=1e3 * t_torch, qext_ms=1e3 * t_qext,
                   qext_gelem_s=numel / t_qext / 1e9, torch_gelem_s=numel / t_torch / 1e9,
                   speedup=t_torch / t_qext, max_diff=diffs,
                   torch_ms_all=[1e3 * t for t in times["torch"]], qext_ms_all=[1e3 * t for t in times["qext"]])
        if device.type == "cuda" and kind == "fwd":
            bytes_moved = numel * x.element_size() * 2  # read x, write y
            row["qext_gb_s"] = bytes_moved / t_qext / 1e9
            row["torch_gb_s"] = bytes_moved / t_torch / 1e9
        rows.append(row)
        print(f"  {label:32s} torch {row['torch_ms']:9.3f} ms  qext {row['qext_ms']:9.3f} ms  "
              f"speedup {row['speedup']:.2f}x  max diff {', '.join(f'{d:.2g}' for d in diffs)}", flush=True)

    gbs = device.type == "cuda"
    print()
    head = "| case | torch ms | qext ms | qext G elem/s | torch G elem/s | speedup (torch/qext) |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if gbs:
        head += " qext GB/s | torch GB/s |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for r in rows:
        line = (f"| {r['case']} | {r['torch_ms']:.3f} | {r['qext_ms']:.3f} | {r['qext_gelem_s']:.3f} | "
                f"{r['torch_gelem_s']:.3f} | {r['speedup']:.2f}x |")
        if gbs:
            line += (f" {r['qext_gb_s']:.0f} | {r['torch_gb_s']:.0f} |" if "qext_gb_s" in r else " - | - |")
        print(line)
    if gbs:
        print("\nGB/s (forward only): bytes read + written (4 B in, 4 B out per element) / median time.")
    print("max diff (per case, printed above): max |torch - qext| of the output and the input gradient, then of "
          "the scale and zero-point gradients relative to their largest |torch| entry (float32 sums over "
          "many elements: these differ by summation order).")

    result = dict(
        benchmark="bench_fake_quantize",
        config=dict(shape=list(args.shape), axis=axis, threads=torch.get_num_threads(), device=args.device,
                    device_name=dev_name, repeats=args.repeats, warmup=args.warmup, quant_range=[QMIN, QMAX],
                    seed=args.seed),
        environment=dict(torch=torch.__version__, qext=getattr(qext, "__version__", None),
                         python=platform.python_version(), cpu_count=os.cpu_count(),
                         cuda=torch.version.cuda),
        rows=rows,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Integer-only CPU inference: qext's int8 kernels against PyTorch's own int8 engines and fp32, one process.

Sections (every variant gets the same inputs, the same thread count, set explicitly; timings are medians of
``--reps`` calls taken round-robin, one call of each variant in turn, so that the machine's noise hits all
alike):

  linear   quantized Linear on M x K -> N = 1x1024->1024, 64x1024->1024, 256x512->512: qext
           ``quantized_linear`` (the ISA qext picks, and each ISA this CPU runs) vs torch.ao.nn.quantized.Linear
           on the fbgemm, x86 and onednn engines, and fp32 F.linear (MKL). uint8 input, per-channel int8
           weights, requantized uint8 output for all int8 variants. Also GMAC/s against the AVX2 int8 peak:
           the nominal one (32 MAC / cycle / core at ``--ghz``) and the one measured on this machine in the
           same round-robin by the loops of benchmarks/avx2_peak.cpp (libqext_avx2_peak, built with the
           project: a register-only vpmaddubsw / vpmaddwd / vpaddd loop, and a dependent-add loop for the
           clock). The input has levels 0..255; "qext[avx2] 7-bit" feeds the
           same x as 7-bit levels 0..127 (the int8_avx2 preset), which the AVX2 path runs with vpmaddubsw.
  conv     3x3 convolution 8x64x56x56 -> 64 (padding 1), channels-last and NCHW inputs, the same engines.
  convs    other convolutions on channels-last inputs (OTHER_CONVS: stride 2, 1x1, a 7x7 stem, grouped,
           depthwise): qext against the fastest torch int8 engine, and fp32.
  pool     MaxPool2d(2) on a quint8 64x64x24x24 input (the CNN's first pool at batch 64), channels-last (what
           converted convolutions write) and NCHW: qext.nn.quantized.MaxPool2d (``quantized_max_pool2d``) vs
           torch.nn.MaxPool2d (torch's quantized max_pool2d). GB/s: input bytes read per second.
  model    the Fashion-MNIST CNN of examples/fashion_mnist_workflow.py (32-64-64 conv-BN-ReLU, two
           max-pools, 128-unit hidden layer) at batch 1 and 64: fp32 eval model, qext.convert of its
           calibrated qext.prepare model, torch.ao's converted model (x86 engine) of the same net.

Targets (issue 4): linear >= 1.0x the fastest torch int8 engine at M >= 64 and >= 70% of the AVX2 peak;
conv >= 1.0x the fastest torch int8 conv; model >= 2x fp32 and >= 1.0x torch.ao's converted model.

Prints Markdown tables and writes JSON (default results/bench_int8_cpu.json). A program, not a test.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "examples"))

try:
    import qext
except ImportError as exc:  # pragma: no cover - a set-up problem
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first")

from fashion_mnist_workflow import AO_FUSE_GROUPS, make_cnn, to_ao_stubs  # noqa: E402

ops = torch.ops.qext
ENGINES = [e for e in ("fbgemm", "x86", "onednn") if e in torch.backends.quantized.supported_engines]


def time_round_robin(fns: dict, reps: int, warmup: int = 3) -> dict:
    """Median seconds per call of each fn, calls interleaved. Each round runs the fns in a new (seeded) random
    order: in a fixed order each fn would always follow the same one, e.g. always find its data evicted by
    the fp32 model, or always find the caches as another fn of its own left them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def with_engine(engine: str, fn):
    def run():
        torch.backends.quantized.engine = engine
        return fn()

    return run


def with_isa(isa: str, fn):
    def run():
        qext._C.set_int8_isa(isa)
        try:
            return fn()
        finally:
            qext._C.set_int8_isa("auto")

    return run


# ------------------------------------------------------------------------------------------- linear
PEAK_LOOP, CLOCK_LOOP = "AVX2 peak loop", "clock loop"
PEAK_ITERS, CLOCK_ITERS = 100_000, 100_000  # 128 MACs / 8 cycles per iteration


def avx2_peak_loops() -> dict:
    """The loops of benchmarks/avx2_peak.cpp as round-robin variants (none when the library was not built, e.g.
    not x86)."""
    path = Path(os.environ.get("QEXT_BUILD_DIR", REPO_ROOT / "build")) / "libqext_avx2_peak.so"
    if not path.exists():
        return {}
    lib = ctypes.CDLL(str(path))
    lib.qext_avx2_peak_loop.argtypes = lib.qext_clock_loop.argtypes = [ctypes.c_int64]
    return {PEAK_LOOP: lambda: lib.qext_avx2_peak_loop(PEAK_ITERS), CLOCK_LOOP: lambda: lib.qext_clock_loop(CLOCK_ITERS)}


def linear_variants(M: int, K: int, N: int) -> dict:
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    w_scale = (w.abs().amax(1) / 127).double()
    qx = torch.quantize_per_tensor(x, float(x.abs().max() / 127), 128, torch.quint8)
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros(N, dtype=torch.long), 0, torch.qint8)
    out_scale = float((x @ w.t()).abs().max() / 127)
    packed, sums = ops.pack_quantized_weight(qw.int_repr(), 1)
    ws = w_scale.float()

    qx7 = torch.quantize_per_tensor(x, float(x.abs().max() / 63), 64, torch.quint8)  # levels 0..127

    def qext_linear(qx=qx):
        # Each variant its own copy of the packed weight, as each torch engine has its own: in the round-robin
        # every variant then starts with its weight out of L2 (evicted by the others), not just the first.
        packed_copy, sums_copy = packed.clone(), sums.clone()
        return lambda: ops.quantized_linear(qx, packed_copy, sums_copy, [N, K], ws, bias, out_scale, 128, 0, 255, False)

    fns = {"qext": qext_linear()}
    for isa in qext._C.supported_int8_isas():
        if isa != "scalar":
            fns[f"qext[{isa}]"] = with_isa(isa, qext_linear())
    if "avx2" in qext._C.supported_int8_isas():
        fns["qext[avx2] 7-bit"] = with_isa("avx2", qext_linear(qx7))
    for eng in ENGINES:
        torch.backends.quantized.engine = eng
        lin = torch.ao.nn.quantized.Linear(K, N)
        lin.set_weight_bias(qw, bias)
        lin.scale, lin.zero_point = out_scale, 128
        fns[f"torch {eng}"] = with_engine(eng, lambda lin=lin: lin(qx))
    fns["fp32"] = lambda: F.linear(x, w, bias)
    fns.update(avx2_peak_loops())
    return fns


def conv_variants(channels_last: bool, shape: tuple = (8, 64, 56, 64, 3, 1, 1, 1)) -> dict:
    """``shape``: (batch, C, H = W, OC, k, stride, padding, groups)."""
    N, C, H, OC, k, stride, pad, groups = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, C, H, H, generator=g)
    w = torch.randn(OC, C // groups, k, k, generator=g) * 0.05
    bias = torch.randn(OC, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    qx = torch.quantize_per_tensor(x, 0.03, 128, torch.quint8).contiguous(memory_format=fmt)
    w_scale = (w.abs().amax((1, 2, 3)) / 127).double()
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros(OC, dtype=torch.long), 0, torch.qint8)
    packed, sums = ops.pack_quantized_weight(qw.int_repr(), groups)
    ws = w_scale.float()
    fns = {
        "qext": lambda: ops.quantized_conv2d(qx, packed, sums, list(w.shape), ws, bias, [stride] * 2, [pad] * 2,
                                            [1, 1], groups, 0.2, 128, 0, 255, False)
    }
    for eng in ENGINES:
        torch.backends.quantized.engine = eng
        conv = torch.ao.nn.quantized.Conv2d(C, OC, k, stride=stride, padding=pad, groups=groups)
        conv.set_weight_bias(qw, bias)
        conv.scale, conv.zero_point = 0.2, 128
        fns[f"torch {eng}"] = with_engine(eng, lambda conv=conv: conv(qx))
    xf = x.contiguous(memory_format=fmt)
    fconv = torch.nn.Conv2d(C, OC, k, stride=stride, padding=pad, groups=groups).eval()
    with torch.no_grad():
        fconv.weight.copy_(w)
        fconv.bias.copy_(bias)
    fconv = fconv.to(memory_format=fmt)
    fns["fp32"] = lambda: fconv(xf)
    return fns


# Other convolutions (channels-last input): (name, (batch, C, H = W, OC, k, stride, padding, groups)).
OTHER_CONVS = [
    ("3x3 stride 2, 8x64x56x56 -> 128", (8, 64, 56, 128, 3, 2, 1, 1)),
    ("1x1, 8x64x56x56 -> 256", (8, 64, 56, 256, 1, 1, 0, 1)),
    ("1x1 stride 2, 8x256x56x56 -> 512", (8, 256, 56, 512, 1, 2, 0, 1)),
    ("7x7 stride 2 stem, 1x3x224x224 -> 64", (1, 3, 224, 64, 7, 2, 3, 1)),
    ("3x3 4 groups, 8x64x56x56 -> 64", (8, 64, 56, 64, 3, 1, 1, 4)),
    ("3x3 32 groups, 8x128x28x28 -> 128", (8, 128, 28, 128, 3, 1, 1, 32)),
    ("3x3 32 groups stride 2, 8x128x56x56 -> 128", (8, 128, 56, 128, 3, 2, 1, 32)),
    ("3x3 32 groups, 8x512x14x14 -> 512", (8, 512, 14, 512, 3, 1, 1, 32)),
    ("3x3 32 groups, 8x1024x7x7 -> 1024", (8, 1024, 7, 1024, 3, 1, 1, 32)),
    ("3x3 depthwise, 1x32x112x112", (1, 32, 112, 32, 3, 1, 1, 32)),
    ("3x3 depthwise, 8x128x28x28", (8, 128, 28, 128, 3, 1, 1, 128)),
]


# --------------------------------------------------------------------------------------------- pool
def pool_variants(channels_last: bool) -> dict:
    g = torch.Generator().manual_seed(11)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    qx = torch.quantize_per_tensor(torch.randn(64, 64, 24, 24, generator=g), 0.05, 128, torch.quint8)
    qx = qx.contiguous(memory_format=fmt)
    ours, theirs = qext.nn.quantized.MaxPool2d(2), torch.nn.MaxPool2d(2)
    return {"qext": lambda: ours(qx), "torch": lambda: theirs(qx)}


# -------------------------------------------------------------------------------------------- model
def model_variants(batch: int, calib: torch.Tensor) -> dict:
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    fp32 = make_cnn().eval()
    with torch.no_grad():  # settle the BN statistics on the calibration images
        fp32.train()
        fp32(calib)
        fp32.eval()
    prepared = qext.prepare(qext.fuse(copy.deepcopy(fp32)), qext.get_qconfig("int8"))
    qext.calibrate(prepared, [calib])
    ours = qext.convert(prepared)

    torch.backends.quantized.engine = "x86"
    ao = to_ao_stubs(fp32).eval()
    ao = tq.fuse_modules(ao, AO_FUSE_GROUPS)
    ao.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare(ao, inplace=True)
        ao(calib)
        tq.convert(ao, inplace=True)

    x = calib[:batch].clone()
    return {
        "qext int8": lambda: ours(x),
        "torch.ao x86": with_engine("x86", lambda: ao(x)),
        "fp32": lambda: fp32(x),
    }


def write_json(path: str, result: dict) -> None:
    """Writes a benchmark's results (creating the folder) and says where."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


def table(title: str, rows: list, columns: list) -> str:
    out = [f"\n### {title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--ghz", type=float, default=3.0, help="clock for the AVX2 peak (32 MAC/cycle/core)")
    ap.add_argument("--sections", default="linear,conv,convs,pool,model")
    ap.add_argument("--json", default=str(REPO_ROOT / "results" / "bench_int8_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    peak = 32 * args.ghz * args.threads
    result = {"threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "qext_isas": qext._C.supported_int8_isas(), "avx2_peak_gmacs": peak}

    report = [f"threads={args.threads}, torch {torch.__version__}, qext ISAs {qext._C.supported_int8_isas()}"]

    with torch.no_grad():
        if "linear" in sections:
            rows = []
            for M, K, N in ((1, 1024, 1024), (64, 1024, 1024), (256, 512, 512)):
                t = time_round_robin(linear_variants(M, K, N), args.reps)
                best_torch = min(v for k, v in t.items() if k.startswith("torch"))
                # The loops run on one thread: scaled by --threads like the nominal peak.
                measured = 128 * PEAK_ITERS * args.threads / t.pop(PEAK_LOOP) / 1e9 if PEAK_LOOP in t else None
                ghz = 8 * CLOCK_ITERS / t.pop(CLOCK_LOOP) / 1e9 if CLOCK_LOOP in t else None
                for k, v in t.items():
                    gmacs = M * K * N / v / 1e9
                    rows.append({"shape": f"{M}x{K}->{N}", "variant": k, "us": f"{v * 1e6:.1f}",
                                 "GMAC/s": f"{gmacs:.1f}", "% AVX2 peak": f"{100 * gmacs / peak:.0f}",
                                 "% measured AVX2 peak": f"{100 * gmacs / measured:.0f}" if measured else "n/a",
                                 "vs fastest torch int8": f"{best_torch / v:.2f}x"})
                if measured:
                    rows.append({"shape": f"{M}x{K}->{N}", "variant": f"({PEAK_LOOP}: {measured / args.threads / ghz:.1f} "
                                 f"MAC/cycle at {ghz:.2f} GHz)", "GMAC/s": f"{measured:.1f}",
                                 "% AVX2 peak": f"{100 * measured / peak:.0f}", "% measured AVX2 peak": "100"})
            result["linear"] = rows
            report.append(table("int8 Linear", rows, ["shape", "variant", "us", "GMAC/s", "% AVX2 peak", "% measured AVX2 peak",
                                                      "vs fastest torch int8"]))
        if "conv" in sections:
            rows = []
            macs = 8 * 64 * 56 * 56 * 64 * 9
            for cl in (True, False):
                t = time_round_robin(conv_variants(cl), max(5, args.reps // 3))
                best_torch = min(v for k, v in t.items() if k.startswith("torch"))
                for k, v in t.items():
                    rows.append({"input": "channels_last" if cl else "NCHW", "variant": k, "ms": f"{v * 1e3:.2f}",
                                 "GMAC/s": f"{macs / v / 1e9:.1f}", "vs fastest torch int8": f"{best_torch / v:.2f}x"})
            result["conv"] = rows
            report.append(table("3x3 conv 8x64x56x56 -> 64", rows, ["input", "variant", "ms", "GMAC/s", "vs fastest torch int8"]))
        if "convs" in sections:
            rows = []
            for name, shape in OTHER_CONVS:
                N, C, H, OC, k, stride, pad, groups = shape
                out = (H + 2 * pad - k) // stride + 1
                macs = N * out * out * OC * (C // groups) * k * k
                t = time_round_robin(conv_variants(True, shape), max(5, args.reps // 3))
                best_torch = min(v for key, v in t.items() if key.startswith("torch"))
                rows.append({"convolution": name, "qext ms": f"{t['qext'] * 1e3:.3f}",
                             "fastest torch int8 ms": f"{best_torch * 1e3:.3f}",
                             "qext GMAC/s": f"{macs / t['qext'] / 1e9:.1f}",
                             "vs fastest torch int8": f"{best_torch / t['qext']:.2f}x",
                             "fp32 ms": f"{t['fp32'] * 1e3:.3f}"})
            result["convs"] = rows
            report.append(table("Other convolutions, channels-last", rows,
                                ["convolution", "qext ms", "fastest torch int8 ms", "qext GMAC/s",
                                 "vs fastest torch int8", "fp32 ms"]))
        if "pool" in sections:
            rows = []
            for cl in (True, False):
                t = time_round_robin(pool_variants(cl), args.reps)
                for k, v in t.items():
                    rows.append({"input": "channels_last" if cl else "NCHW", "variant": k, "us": f"{v * 1e6:.1f}",
                                 "GB/s": f"{64 * 64 * 24 * 24 / v / 1e9:.1f}", "vs torch": f"{t['torch'] / v:.2f}x"})
            result["pool"] = rows
            report.append(table("MaxPool2d(2), quint8 64x64x24x24", rows, ["input", "variant", "us", "GB/s", "vs torch"]))
        if "model" in sections:
            rows = []
            calib = torch.randn(64, 1, 28, 28)
            for batch in (1, 64):
                t = time_round_robin(model_variants(batch, calib), args.reps)
                for k, v in t.items():
                    rows.append({"batch": batch, "variant": k, "ms": f"{v * 1e3:.3f}",
                                 "speed-up vs fp32": f"{t['fp32'] / v:.2f}x",
                                 "vs torch.ao": f"{t['torch.ao x86'] / v:.2f}x"})
            result["model"] = rows
            report.append(table("Fashion-MNIST CNN end to end", rows, ["batch", "variant", "ms", "speed-up vs fp32", "vs torch.ao"]))
    print("\n".join(report))
    write_json(args.json, result)


if __name__ == "__main__":
    main()

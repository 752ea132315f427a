#!/usr/bin/env python3
"""QAT training-step overhead on CPU: fp32 vs qext QAT vs torch.ao QAT, one process, the same CNN and data.

The model is the CNN of ``examples/fashion_mnist_workflow.py`` (QuantStub, 3 x Conv-BN-ReLU with two
max-pools, Linear-ReLU, Linear, DeQuantStub). Variants, each its own copy of the same fp32 weights:

  fp32          the float model in train mode
  qext int8     qext.prepare_qat(qext.fuse(model), get_qconfig("int8"))   (BN folded with batch-statistics
                correction, per-channel int8 weights, EMA-observed uint8 activations)
  torch.ao x86  torch.ao.quantization eager mode: fuse_modules_qat + get_default_qat_qconfig("x86") +
                prepare_qat
  qext int4 LSQ qext.prepare_qat(..., get_qconfig("int4_lsq"))            (extra row, no target)

Phases: "observing" (as after prepare_qat: BN statistics updated, observers on) and "frozen" (BN statistics
frozen, observers off: the end of a QAT schedule); fp32 is the same in both (its BN always updates).

One step = zero_grad + forward + cross-entropy + backward + Adam step, on a batch of real Fashion-MNIST
images (random images if the Debian package is missing). Every variant gets the same batches, the same
thread count (torch.set_num_threads, set explicitly), ``--warmup`` untimed steps, then ``--steps`` timed
steps taken round-robin (one step of each variant in turn, so that the machine's noise hits all alike);
the median is reported with the ratio to fp32. Target: qext int8 / fp32 <= 1.3.

With ``--profile`` (or automatically when the qext int8 ratio exceeds the target) the qext int8 step is
profiled with torch.profiler (top operators by self CPU time) and cProfile (top Python functions by
own time) and the tables are printed and stored in the JSON.

Prints a Markdown table and writes JSON (default results/bench_qat_step.json). This is a program, not a
test: the machines are shared and noisy, so read the ratios, not lone absolute times.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
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

from fashion_mnist_qat import DEFAULT_DATA_DIR, read_idx_gz  # noqa: E402
from fashion_mnist_workflow import AO_FUSE_GROUPS, make_cnn, to_ao_stubs  # noqa: E402

TARGET = 1.3


def load_batches(data_dir: Path, batch_size: int, n: int, seed: int):
    """``n`` batches of Fashion-MNIST training images (normalised) and labels; random data if absent."""
    g = torch.Generator().manual_seed(seed)
    img_path = data_dir / "train-images-idx3-ubyte.gz"
    lbl_path = data_dir / "train-labels-idx1-ubyte.gz"
    if img_path.is_file() and lbl_path.is_file():
        images = torch.from_numpy(read_idx_gz(img_path).copy()).float().div_(255.0)
        labels = torch.from_numpy(read_idx_gz(lbl_path).astype("int64"))
        mean, std = images.mean(), images.std()
        idx = torch.randperm(len(images), generator=g)[: batch_size * n]
        x = ((images[idx] - mean) / std).unsqueeze(1)
        y = labels[idx]
        source = str(data_dir)
    else:
        x = torch.randn(batch_size * n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch_size * n,), generator=g)
        source = "random (Fashion-MNIST not found)"
    return [(x[i * batch_size:(i + 1) * batch_size].contiguous(), y[i * batch_size:(i + 1) * batch_size].contiguous())
            for i in range(n)], source


class Variant:
    def __init__(self, name: str, model: torch.nn.Module, lr: float):
        self.name = name
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.times: list[float] = []

    def step(self, x, y) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def build_variants(fp32: torch.nn.Module, phase: str, lr: float, lsq: bool, init_batch):
    import torch.ao.quantization as tq
    import torch.ao.nn.intrinsic.qat as nniqat

    def observe_once(model):
        # before freezing: one forward in train mode so that every quantizer has ranges / LSQ scales
        with torch.no_grad():
            model.train()(init_batch)
        return model

    variants = [Variant("fp32", copy.deepcopy(fp32), lr)]

    q = qext.prepare_qat(qext.fuse(fp32), qext.get_qconfig("int8"))
    if phase == "frozen":
        observe_once(q)
        qext.freeze_bn_stats(q)
        qext.enable_observer(q, False)
    variants.append(Variant("qext int8 QAT", q, lr))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = tq.fuse_modules_qat(to_ao_stubs(fp32).train(), AO_FUSE_GROUPS)
        ao.qconfig = tq.get_default_qat_qconfig("x86")
        ao = tq.prepare_qat(ao)
    if phase == "frozen":
        observe_once(ao)
        ao.apply(nniqat.freeze_bn_stats)
        ao.apply(tq.disable_observer)
    variants.append(Variant("torch.ao QAT x86", ao, lr))

    if lsq:
        q4 = qext.prepare_qat(qext.fuse(fp32), qext.get_qconfig("int4_lsq"))
        if phase == "frozen":
            observe_once(q4)
            qext.freeze_bn_stats(q4)
            qext.enable_observer(q4, False)
        variants.append(Variant("qext int4 LSQ QAT", q4, lr))
    return variants


def run_phase(fp32, phase, batches, args):
    variants = build_variants(fp32, phase, args.lr, not args.no_lsq, batches[0][0])
    nb = len(batches)
    for i in range(args.warmup):
        for v in variants:
            v.step(*batches[i % nb])
    for i in range(args.steps):
        x, y = batches[(args.warmup + i) % nb]
        for v in variants:
            v.times.append(v.step(x, y))
    return variants


def profile_step(model: torch.nn.Module, batches, lr: float, steps: int, top: int) -> dict:
    """torch.profiler (self CPU time per operator) and cProfile (own time per Python function) over
    ``steps`` training steps of ``model``."""
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()

    def one(i):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for i in range(3):
        one(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            one(i)
    avgs = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in avgs)
    ops = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)
    op_rows = [dict(op=e.key, calls=e.count, self_cpu_ms_per_step=e.self_cpu_time_total / 1000 / steps,
                    self_pct=100 * e.self_cpu_time_total / total_self if total_self else 0.0) for e in ops]

    pr = cProfile.Profile()
    pr.enable()
    for i in range(steps):
        one(i)
    pr.disable()
    st = pstats.Stats(pr)
    entries = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    total_tt = sum(v[2] for v in st.stats.values())
    py_rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in entries:
        short = fname
        for marker in ("site-packages/", "python/"):
            if marker in fname:
                short = fname.split(marker, 1)[1]
                break
        py_rows.append(dict(function=f"{short}:{line}({func})", calls=nc, own_ms_per_step=1000 * tt / steps,
                            cumulative_ms_per_step=1000 * ct / steps, own_pct=100 * tt / total_tt if total_tt else 0.0))
    return dict(steps=steps, total_self_cpu_ms_per_step=total_self / 1000 / steps, operators=op_rows[:top],
                all_operators=op_rows, python=py_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (all variants)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--widths", type=str, default="32,64,64")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--phases", type=str, default="observing,frozen", help="observing and/or frozen")
    p.add_argument("--no-lsq", action="store_true", help="leave out the qext int4 LSQ row")
    p.add_argument("--profile", action="store_true", help="profile the qext int8 step even if within target")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_qat_step.json")
    args = p.parse_args(argv)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    for ph in phases:
        if ph not in ("observing", "frozen"):
            p.error(f"--phases: unknown phase {ph!r}")
    widths = tuple(int(w) for w in args.widths.split(","))

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(args.seed)
    batches, source = load_batches(args.data_dir, args.batch_size, 8, args.seed)
    fp32 = make_cnn(widths, args.hidden).train()
    # a few float steps first, so that BN statistics and weights are not at their initial values
    opt = torch.optim.Adam(fp32.parameters(), lr=1e-3)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(fp32(x), y).backward()
        opt.step()
    print(f"torch {torch.__version__}, qext {qext.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, data {source}; {args.warmup} warm-up + {args.steps} timed steps per variant, "
          f"round-robin", flush=True)

    rows = []
    for phase in phases:
        t0 = time.perf_counter()
        variants = run_phase(fp32, phase, batches, args)
        base = statistics.median(variants[0].times)
        for v in variants:
            med = statistics.median(v.times)
            q1, _, q3 = statistics.quantiles(v.times, n=4)
            rows.append(dict(phase=phase, variant=v.name, median_ms=1000 * med, q1_ms=1000 * q1, q3_ms=1000 * q3,
                             ratio_vs_fp32=med / base, steps=len(v.times)))
        print(f"phase {phase}: {time.perf_counter() - t0:.1f} s", flush=True)

    print(f"\n## QAT training-step time, CPU, {args.threads} threads, batch {args.batch_size} "
          f"(median of {args.steps} steps)\n")
    print("| phase | variant | median ms | IQR ms | ratio vs fp32 |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['variant']} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | "
              f"{r['ratio_vs_fp32']:.2f}x |")
    print("\nobserving: as after prepare_qat (BN statistics updated with the batch-statistics correction, "
          "observers on); frozen: BN statistics frozen and observers off.")
    verdicts = []
    for phase in phases:
        q = next(r for r in rows if r["phase"] == phase and r["variant"] == "qext int8 QAT")
        a = next(r for r in rows if r["phase"] == phase and r["variant"] == "torch.ao QAT x86")
        ok = q["ratio_vs_fp32"] <= TARGET
        verdicts.append(dict(phase=phase, qext_ratio=q["ratio_vs_fp32"], torch_ao_ratio=a["ratio_vs_fp32"],
                             target=TARGET, passed=ok))
        print(f"- {phase}: qext/fp32 {q['ratio_vs_fp32']:.2f}x, torch.ao/fp32 {a['ratio_vs_fp32']:.2f}x, "
              f"qext/torch.ao {q['median_ms'] / a['median_ms']:.2f}x; target qext <= {TARGET}x: "
              f"{'PASS' if ok else 'FAIL'}")

    profiles = {}
    if args.profile or not all(v["passed"] for v in verdicts):
        # observing phase (as after prepare_qat): the phase that pays for the batch-statistics correction
        print(f"\n## Profile of one training step, observing phase ({args.profile_steps} steps each)\n")
        for v in build_variants(fp32, "observing", args.lr, False, batches[0][0]):
            profiles[v.name] = profile_step(v.model, batches, args.lr, args.profile_steps, args.profile_top)
        q, f, a = profiles["qext int8 QAT"], profiles["fp32"], profiles["torch.ao QAT x86"]
        by_op = {name: {r["op"]: r for r in prof["all_operators"]} for name, prof in profiles.items()}
        print("Top operators of the qext int8 step by self CPU time (torch.profiler), ms per step "
              "(calls per step), next to the same operator in the fp32 and torch.ao steps:\n")
        print("| operator | qext int8 | fp32 | torch.ao x86 | qext - fp32 |")
        print("|---|---:|---:|---:|---:|")

        def cell(name, op):
            r = by_op[name].get(op)
            return (0.0, "-") if r is None else (r["self_cpu_ms_per_step"],
                                                f"{r['self_cpu_ms_per_step']:.2f} ({r['calls'] / args.profile_steps:g})")

        for r in q["operators"]:
            qv, qs = cell("qext int8 QAT", r["op"])
            fv, fs = cell("fp32", r["op"])
            _, as_ = cell("torch.ao QAT x86", r["op"])
            print(f"| {r['op']} | {qs} | {fs} | {as_} | {qv - fv:+.2f} |")
        print(f"| total self CPU | {q['total_self_cpu_ms_per_step']:.1f} | {f['total_self_cpu_ms_per_step']:.1f} | "
              f"{a['total_self_cpu_ms_per_step']:.1f} | "
              f"{q['total_self_cpu_ms_per_step'] - f['total_self_cpu_ms_per_step']:+.1f} |")
        print("\nTop Python functions of the qext int8 step by own time (cProfile; C++ calls appear as "
              "built-ins):\n")
        print("| function | calls / step | own ms / step | cumulative ms / step |")
        print("|---|---:|---:|---:|")
        for r in q["python"]:
            print(f"| {r['function']} | {r['calls'] / args.profile_steps:g} | {r['own_ms_per_step']:.2f} | "
                  f"{r['cumulative_ms_per_step']:.2f} |")

    result = dict(
        benchmark="bench_qat_step",
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        environment=dict(torch=torch.__version__, qext=qext.__version__, python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads(), cpu_count=os.cpu_count()),
        data=source,
        rows=rows,
        verdicts=verdicts,
        profiles=profiles,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The qext QAT / PTQ workflow end to end on Fashion-MNIST, side by side with PyTorch's torch.ao.quantization.

One small CNN with batch norm (QuantStub, 3 x [Conv2d-BatchNorm2d-ReLU] with two max-pools, Linear-ReLU,
Linear, DeQuantStub) is trained in fp32 (``--epochs`` over the 60k training images) and evaluated on the
10k test images. Every quantized variant below starts from those same fp32 weights:

  qext int8 QAT       qext.fuse + qext.prepare_qat(model, get_qconfig("int8"), freeze_bn_step=...),
                      fine-tuned ``--qat-epochs``; observers frozen after ``--freeze-observer-frac`` of
                      the fine-tuning; evaluated as the QAT (fake-quant) model in eval mode and as
                      qext.convert(...) of it (the reference integer model)
  qext PTQ int8       qext.prepare + qext.calibrate (``--calib-batches`` training batches) + qext.convert,
                      with the "int8" preset and, if present, "int8_histogram"
  qext 4-bit LSQ QAT  get_qconfig("int4_lsq"), same fine-tuning budget and schedule as int8 QAT: every weight
                      4-bit; the activations between layers 4-bit, the network input (QuantStub) and the
                      logits (fc2's output) 8-bit (``--lsq-io-bits``; the LSQ paper keeps the first and
                      last layers at 8 bits): with the preset everywhere, switching the 4-bit logits'
                      quantizer off after training alone recovered 0.4-1.0 points in our runs
  torch.ao QAT        eager mode: QuantStub/DeQuantStub, fuse_modules_qat, get_default_qat_qconfig("x86"),
                      prepare_qat, same fine-tuning budget and schedule (freeze_bn_stats, disable_observer
                      at the same steps), convert with the x86 engine
  torch.ao PTQ        fuse_modules, get_default_qconfig("x86"), prepare, same calibration batches, convert

Prints one Markdown table (accuracy, delta vs fp32 in points, fine-tune / calibration wall time, model
size) with the issue's targets and their pass / fail in the footer, and writes the same as JSON to
results/fashion_mnist_workflow.json. ``--quick`` runs everything on small subsets (smoke test, ~1 min).

Model size: ``qext.model_size(model).quantized_bytes`` for qext models (what the converted model stores;
``float_bytes`` for the fp32 row); for torch.ao's converted models the bytes of the tensors in their
state dict (packed parameters unpacked; per-channel scales / zero points counted at their stored dtype).

Data: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), read with the loader
of ``examples/fashion_mnist_qat.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_qat import (  # noqa: E402  (also checks that qext imports, with a helpful message)
    DEFAULT_DATA_DIR,
    BatchStream,
    load_normalized,
)

import qext  # noqa: E402
import qext.nn as qnn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# The accuracy targets: largest allowed drop below fp32, in accuracy points.
TARGETS = {
    "qext int8 QAT": 0.3,
    "qext PTQ static int8": 1.0,
    "qext 4-bit LSQ QAT": 1.5,
}


# --------------------------------------------------------------------------------------------- model
def make_cnn(widths=(32, 64, 64), hidden: int = 128, stubs: str = "qext") -> nn.Sequential:
    """conv(1->c1,3)-BN-ReLU - conv(c1->c2,3)-BN-ReLU-maxpool - conv(c2->c3,3)-BN-ReLU-maxpool - flatten -
    linear(c3*5*5->hidden)-ReLU - linear(hidden->10), between a QuantStub and a DeQuantStub (qext's or
    torch.ao's, ``stubs``). The stubs are the identity in the float model."""
    if stubs == "qext":
        quant, dequant = qnn.QuantStub(), qnn.DeQuantStub()
    else:
        import torch.ao.quantization as tq

        quant, dequant = tq.QuantStub(), tq.DeQuantStub()
    c1, c2, c3 = widths
    return nn.Sequential(OrderedDict(
        quant=quant,
        conv1=nn.Conv2d(1, c1, 3), bn1=nn.BatchNorm2d(c1), relu1=nn.ReLU(),                            # 26x26
        conv2=nn.Conv2d(c1, c2, 3), bn2=nn.BatchNorm2d(c2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),    # 12x12
        conv3=nn.Conv2d(c2, c3, 3), bn3=nn.BatchNorm2d(c3), relu3=nn.ReLU(), pool3=nn.MaxPool2d(2),    # 5x5
        flatten=nn.Flatten(),
        fc1=nn.Linear(c3 * 5 * 5, hidden), relu4=nn.ReLU(),
        fc2=nn.Linear(hidden, 10),
        dequant=dequant,
    ))


# torch.ao's eager mode needs the fusion groups spelled out
AO_FUSE_GROUPS = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3", "relu3"], ["fc1", "relu4"]]


def to_ao_stubs(model: nn.Sequential) -> nn.Sequential:
    """A copy of the float model with torch.ao's QuantStub / DeQuantStub in place of qext's."""
    import torch.ao.quantization as tq

    m = copy.deepcopy(model)
    m.quant = tq.QuantStub()
    m.dequant = tq.DeQuantStub()
    return m


# ------------------------------------------------------------------------------------- train / eval
def train(model: nn.Module, stream: BatchStream, steps: int, lr: float, tag: str, log_every: int,
          cosine: bool = False, on_step=None) -> float:
    """Adam for ``steps`` mini-batches (cosine-decayed learning rate if ``cosine``); ``on_step(step)`` runs
    before each step (1-based). Returns the wall time."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    model.train()
    t0 = time.perf_counter()
    running, n = 0.0, 0
    for step in range(1, steps + 1):
        if on_step is not None:
            on_step(step)
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        running += loss.item()
        n += 1
        if log_every and (step % log_every == 0 or step == steps):
            print(f"  [{tag}] step {step:5d}/{steps}  loss {running / n:.4f}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
            running, n = 0.0, 0
    return time.perf_counter() - t0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, float]:
    """Top-1 predictions over ``x`` (model in eval mode) and the wall time."""
    model.eval()
    t0 = time.perf_counter()
    preds = []
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        if out.is_quantized:
            out = out.dequantize()
        preds.append(out.argmax(dim=1))
    return torch.cat(preds), time.perf_counter() - t0


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item()


def calibration_batches(x: torch.Tensor, batch_size: int, n: int, seed: int) -> list:
    """The same ``n`` training batches for every PTQ variant."""
    stream = BatchStream(x, x, batch_size, seed)
    return [stream.next()[0] for _ in range(n)]


# --------------------------------------------------------------------------------------------- sizes
def torch_state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (recursing into packed (weight, bias) tuples);
    a quantized tensor counts its integer values plus, when per channel, its scales and zero points."""

    def nbytes(v) -> int:
        if isinstance(v, torch.Tensor):
            if v.is_quantized:
                b = v.numel() * v.element_size()
                if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                   torch.per_channel_affine_float_qparams):
                    s, z = v.q_per_channel_scales(), v.q_per_channel_zero_points()
                    b += s.numel() * s.element_size() + z.numel() * z.element_size()
                else:
                    b += 8 + 8  # one double scale, one int64 zero point
                return b
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(nbytes(e) for e in v)
        return 0

    return sum(nbytes(v) for v in model.state_dict().values())


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=float, default=2.0, help="fp32 training epochs over the training set")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="fine-tuning epochs of each QAT variant")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the fp32 training (cosine decay)")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate of QAT fine-tuning (constant)")
    p.add_argument("--freeze-bn-frac", type=float, default=0.5,
                   help="freeze the batch-norm statistics after this fraction of the fine-tuning steps")
    p.add_argument("--freeze-observer-frac", type=float, default=0.75,
                   help="freeze the observers (activation / weight ranges) after this fraction of the fine-tuning")
    p.add_argument("--calib-batches", type=int, default=32, help="training batches for PTQ calibration")
    p.add_argument("--lsq-io-bits", type=int, default=8,
                   help="bits of the network input and of the logits in the 4-bit LSQ row (4: the preset everywhere)")
    p.add_argument("--widths", type=str, default="32,64,64", help="output channels of the three convolutions")
    p.add_argument("--hidden", type=int, default=128, help="width of the hidden linear layer")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="evaluate on the first N test images (0: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4096 training / 2000 test images, 1 fp32 epoch, 1 QAT epoch, 4 calibration batches")
    p.add_argument("--skip", type=str, default="",
                   help="comma-separated parts to skip: qat, ptq, lsq, ao_qat, ao_ptq")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--log-every", type=int, default=100, help="print the training loss every N steps (0: never)")
    p.add_argument("--json", type=Path, default=None,
                   help="output file (default results/fashion_mnist_workflow.json; with --quick "
                        "results/fashion_mnist_workflow_quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_subset = args.train_subset or 4096
        args.test_subset = args.test_subset or 2000
        args.epochs, args.qat_epochs = 1.0, 1.0
        args.calib_batches = min(args.calib_batches, 4)
        args.log_every = 0 if args.log_every == 100 else args.log_every
    if args.json is None:
        args.json = REPO_ROOT / "results" / f"fashion_mnist_workflow{'_quick' if args.quick else ''}.json"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    widths = tuple(int(w) for w in args.widths.split(","))
    if len(widths) != 3:
        p.error("--widths takes three integers")

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    x_train, y_train, x_test, y_test, mean, std = load_normalized(args.data_dir)
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    if args.test_subset:
        x_test, y_test = x_test[:args.test_subset], y_test[:args.test_subset]
    steps_per_epoch = len(x_train) // args.batch_size
    fp32_steps = max(1, round(args.epochs * steps_per_epoch))
    qat_steps = max(1, round(args.qat_epochs * steps_per_epoch))
    freeze_bn_at = max(1, round(args.freeze_bn_frac * qat_steps))
    freeze_obs_at = max(1, round(args.freeze_observer_frac * qat_steps))
    print(f"Fashion-MNIST from {args.data_dir}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")
    print(f"torch {torch.__version__}, qext {qext.__version__}, threads {torch.get_num_threads()}, seed {args.seed}; "
          f"{steps_per_epoch} steps per epoch at batch {args.batch_size}")

    rows: list[dict] = []
    preds: dict[str, torch.Tensor] = {}

    def add_row(method: str, model: nn.Module, time_s: float, time_kind: str, size_bytes, family: str, **extra):
        pred, eval_s = predict(model, x_test)
        preds[method] = pred
        acc = accuracy(pred, y_test)
        rows.append(dict(method=method, family=family, accuracy=acc, time_s=time_s, time_kind=time_kind,
                         size_bytes=size_bytes, eval_s=eval_s, **extra))
        print(f"  {method}: test accuracy {100 * acc:.2f}%  (eval {eval_s:.1f} s)", flush=True)
        return acc

    def qat_schedule(model: nn.Module, library: str):
        """Freeze BN statistics (torch.ao; qext does it itself via freeze_bn_step) and observers at the
        same steps for both libraries."""
        def on_step(step: int):
            if library == "ao" and step == freeze_bn_at + 1:
                import torch.ao.nn.intrinsic.qat as nniqat

                model.apply(nniqat.freeze_bn_stats)
            if step == freeze_obs_at + 1:
                if library == "qext":
                    qext.enable_observer(model, False)
                else:
                    import torch.ao.quantization as tq

                    model.apply(tq.disable_observer)
        return on_step

    # ------------------------------------------------------------------ 1. fp32
    torch.manual_seed(args.seed)
    fp32 = make_cnn(widths, args.hidden)
    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"\n== fp32: {fp32_steps} steps ({args.epochs:g} epochs), Adam lr {args.lr} cosine, {n_params} parameters")
    fp32_s = train(fp32, BatchStream(x_train, y_train, args.batch_size, args.seed), fp32_steps, args.lr, "fp32",
                   args.log_every, cosine=True)
    fp32.eval()
    fp32_acc = add_row("fp32", fp32, fp32_s, "train", qext.model_size(fp32).float_bytes, "fp32")

    calib = calibration_batches(x_train, args.batch_size, args.calib_batches, args.seed + 7)
    ft = dict(steps=qat_steps, lr=args.qat_lr, freeze_bn_step=freeze_bn_at, freeze_observer_step=freeze_obs_at)
    print(f"\nQAT fine-tuning: {qat_steps} steps ({args.qat_epochs:g} epochs), Adam lr {args.qat_lr}, batch-norm "
          f"statistics frozen after step {freeze_bn_at}, observers after step {freeze_obs_at}; the same training "
          f"batches for every QAT variant")

    # ------------------------------------------------------------------ 2. qext int8 QAT
    def qext_qat(name: str, preset: str, tag: str, overrides=None, **extra):
        print(f"\n== {name}: qext.fuse + qext.prepare_qat(get_qconfig({preset!r}), freeze_bn_step={freeze_bn_at}"
              f"{f', overrides for {sorted(overrides)}' if overrides else ''})")
        qat = qext.prepare_qat(qext.fuse(fp32), qext.get_qconfig(preset), overrides=overrides,
                               freeze_bn_step=freeze_bn_at)
        s = train(qat, BatchStream(x_train, y_train, args.batch_size, args.seed + 1), qat_steps, args.qat_lr, tag,
                  args.log_every, on_step=qat_schedule(qat, "qext"))
        qat.eval()
        qext.enable_observer(qat, False)  # evaluation must not move the ranges
        size = qext.model_size(qat).quantized_bytes
        add_row(f"{name} (fake-quant, eval)", qat, s, "fine-tune", size, "qext", preset=preset, **ft, **extra)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                int_model = qext.convert(qat)
        except Exception as exc:  # keep going: report it in the table
            print(f"  qext.convert failed: {type(exc).__name__}: {exc}")
            rows.append(dict(method=f"{name} -> qext.convert", family="qext", accuracy=None, time_s=s,
                             time_kind="fine-tune", size_bytes=None, error=f"{type(exc).__name__}: {exc}"))
            return
        convert_s = time.perf_counter() - t0
        add_row(f"{name} -> qext.convert (integer)", int_model, s, "fine-tune",
                qext.model_size(int_model).quantized_bytes, "qext", preset=preset, convert_s=convert_s,
                target_method=name, **ft, **extra)
        a, b = preds[f"{name} (fake-quant, eval)"], preds[f"{name} -> qext.convert (integer)"]
        rows[-1]["top1_disagreement_with_fake_quant"] = int((a != b).sum())
        print(f"  converted vs fake-quant: top-1 differs on {int((a != b).sum())} of {len(a)} test images")

    if "qat" not in skip:
        qext_qat("qext int8 QAT", "int8", "qext int8")

    # ------------------------------------------------------------------ 3. qext PTQ
    if "ptq" not in skip:
        presets = ["int8"] + (["int8_histogram"] if "int8_histogram" in qext.qconfig.QCONFIG_PRESETS else [])
        for preset in presets:
            name = "qext PTQ static int8" + ("" if preset == "int8" else f" ({preset})")
            print(f"\n== {name}: qext.prepare + qext.calibrate ({len(calib)} batches) + qext.convert")
            t0 = time.perf_counter()
            prepared = qext.prepare(qext.fuse(fp32), qext.get_qconfig(preset))
            qext.calibrate(prepared, calib)
            int_model = qext.convert(prepared)
            s = time.perf_counter() - t0
            add_row(name, int_model, s, "calibrate+convert", qext.model_size(int_model).quantized_bytes, "qext",
                    preset=preset, calib_batches=len(calib),
                    target_method="qext PTQ static int8" if preset == "int8" else None)

    # ------------------------------------------------------------------ 4. qext 4-bit LSQ QAT
    if "lsq" not in skip:
        lsq = qext.get_qconfig("int4_lsq")
        io = qext.QConfig(activation=lsq.activation.replace(bits=args.lsq_io_bits), weight=lsq.weight)
        overrides = None if args.lsq_io_bits == lsq.activation.bits else {"quant": io, "fc2": io}
        qext_qat("qext 4-bit LSQ QAT", "int4_lsq", "qext int4_lsq", overrides, lsq_io_bits=args.lsq_io_bits)

    # ------------------------------------------------------------------ 5. torch.ao QAT / PTQ
    try:
        import torch.ao.quantization as tq
    except ImportError:  # pragma: no cover - a torch without torch.ao
        tq = None
        print("\ntorch.ao.quantization is not available in this torch: no torch.ao rows")
    if tq is not None:
        torch.backends.quantized.engine = "x86"
        if "ao_qat" not in skip:
            print(f"\n== torch.ao QAT: fuse_modules_qat + get_default_qat_qconfig('x86') + prepare_qat, "
                  f"convert (engine {torch.backends.quantized.engine})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = to_ao_stubs(fp32).train()
                ao = tq.fuse_modules_qat(ao, AO_FUSE_GROUPS)
                ao.qconfig = tq.get_default_qat_qconfig("x86")
                ao = tq.prepare_qat(ao)
            s = train(ao, BatchStream(x_train, y_train, args.batch_size, args.seed + 1), qat_steps, args.qat_lr,
                      "torch.ao QAT", args.log_every, on_step=qat_schedule(ao, "ao"))
            ao.eval()
            ao.apply(tq.disable_observer)
            add_row("torch.ao QAT x86 (fake-quant, eval)", ao, s, "fine-tune", None, "torch.ao", **ft)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao_int = tq.convert(copy.deepcopy(ao).eval())
            add_row("torch.ao QAT x86 -> convert (int8)", ao_int, s, "fine-tune", torch_state_dict_bytes(ao_int),
                    "torch.ao", **ft)
        if "ao_ptq" not in skip:
            print(f"\n== torch.ao PTQ static: fuse_modules + get_default_qconfig('x86') + prepare + "
                  f"{len(calib)} batches + convert")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = tq.fuse_modules(to_ao_stubs(fp32).eval(), AO_FUSE_GROUPS)
                ao.qconfig = tq.get_default_qconfig("x86")
                ao = tq.prepare(ao)
                with torch.no_grad():
                    for xb in calib:
                        ao(xb)
                ao_int = tq.convert(ao)
            s = time.perf_counter() - t0
            add_row("torch.ao PTQ static x86 (int8)", ao_int, s, "calibrate+convert", torch_state_dict_bytes(ao_int),
                    "torch.ao", calib_batches=len(calib))

    # ------------------------------------------------------------------ table
    for r in rows:
        r["delta_points"] = None if r["accuracy"] is None else 100 * (r["accuracy"] - fp32_acc)
    targets = []
    for method, allowed in TARGETS.items():
        # judged on the integer model where there is one (the deliverable), else on the fake-quant model
        cands = [r for r in rows if r.get("target_method") == method and r["accuracy"] is not None]
        if not cands:
            cands = [r for r in rows if r["method"].startswith(method) and r["accuracy"] is not None]
        if not cands:
            targets.append(dict(method=method, allowed_drop=allowed, judged_on=None, delta_points=None, passed=None))
            continue
        r = cands[0]
        targets.append(dict(method=method, allowed_drop=allowed, judged_on=r["method"], delta_points=r["delta_points"],
                            passed=bool(r["delta_points"] >= -allowed)))

    n_test = len(x_test)
    print(f"\n## Fashion-MNIST: fp32 vs qext vs torch.ao quantization ({n_test} test images)\n")
    print("| method | accuracy | delta vs fp32 (points) | fine-tune / calibration wall s | model size (bytes) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        acc = "failed" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        delta = "-" if r["delta_points"] is None or r["method"] == "fp32" else f"{r['delta_points']:+.2f}"
        t = f"{r['time_s']:.1f} ({r['time_kind']})"
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes']:,}"
        print(f"| {r['method']} | {acc} | {delta} | {t} | {size} |")
    print()
    print(f"fp32: {fp32_steps} steps of batch {args.batch_size} ({args.epochs:g} epochs{' of a subset' if args.train_subset else ''}). "
          f"QAT rows: {qat_steps} fine-tuning steps from the fp32 weights, Adam lr {args.qat_lr}, BN frozen after "
          f"step {freeze_bn_at}, observers after step {freeze_obs_at}. PTQ rows: {len(calib)} calibration batches. "
          "Wall times are single runs on a shared machine (threads "
          f"{torch.get_num_threads()}). Sizes: qext.model_size(...).quantized_bytes (fp32: float_bytes); torch.ao: "
          "state-dict tensor bytes of the converted model.")
    print("qext int8 / int8_histogram: per-channel symmetric int8 weights, uint8 activations (EMA min/max, "
          "entropy histogram); torch.ao x86: per-channel int8 weights, 7-bit (reduce_range) uint8 activations, "
          "EMA observers (QAT) / histogram (PTQ).")
    if "lsq" not in skip:
        print(f"qext 4-bit LSQ: learnable per-channel 4-bit weights in every layer, learnable 4-bit activations "
              f"between layers; network input and logits {args.lsq_io_bits}-bit.")
    for r in rows:
        if "top1_disagreement_with_fake_quant" in r:
            print(f"{r['method']}: top-1 differs from its fake-quant model on "
                  f"{r['top1_disagreement_with_fake_quant']} of {n_test} test images.")
    print("Targets (drop below fp32, judged on the converted integer model where there is one):")
    for t in targets:
        if t["passed"] is None:
            print(f"- {t['method']}: within {t['allowed_drop']} points: not run")
        else:
            print(f"- {t['method']}: within {t['allowed_drop']} points: {t['delta_points']:+.2f} "
                  f"({t['judged_on']}) -> {'PASS' if t['passed'] else 'FAIL'}")
    total_s = time.perf_counter() - t_start
    print(f"Total wall time {total_s:.0f} s.")

    result = dict(
        example="fashion_mnist_workflow",
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        environment=dict(torch=torch.__version__, qext=qext.__version__, python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads(), cpu_count=os.cpu_count()),
        data=dict(train=len(x_train), test=n_test, normalization=dict(mean=mean, std=std)),
        model=dict(widths=list(widths), hidden=args.hidden, parameters=n_params),
        schedule=dict(fp32_steps=fp32_steps, qat_steps=qat_steps, freeze_bn_step=freeze_bn_at,
                      freeze_observer_step=freeze_obs_at, calib_batches=len(calib)),
        rows=rows,
        targets=targets,
        total_wall_s=total_s,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

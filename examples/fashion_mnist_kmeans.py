#!/usr/bin/env python3
"""K-means weight quantization (Deep Compression) of a Fashion-MNIST CNN at 8, 4 and 2 bits.

The CNN of ``examples/fashion_mnist_workflow.py`` (3 x Conv-BN-ReLU, two max-pools, Linear-ReLU, Linear) is
trained in fp32 (``--epochs``). Then, for every bit width b of ``--bits``, from the same fp32 weights:

1. ``qext.prepare_qat(model, get_qconfig(f"kmeans{b}"))`` clusters the weights of every Conv2d and Linear
   into 2^b centroids per layer (linear initialisation, exact 1-D Lloyd); batch norms stay float;
2. the clustered model is evaluated on the 10k test images ("before QAT");
3. threshold-triggered QAT, as in the Deep Compression lab: only if the accuracy dropped more than
   ``--threshold`` points below fp32, the codebooks (through their centroid gradients), biases and batch
   norms are fine-tuned for ``--qat-epochs``; the labels stay fixed;
4. ``qext.convert`` packs the labels at b bits per weight next to the float32 codebook; the converted model
   (look-up-table kernels) is evaluated and its size measured with ``qext.model_size``.

Prints one Markdown table (size in MiB, accuracy before / after QAT and converted, deltas vs fp32 and the
issue's targets: 4-bit within 0.5 points of fp32 after QAT, 2-bit within 2 points, size about b/32 of fp32
plus the codebook), writes it as JSON (results/fashion_mnist_kmeans.json) and plots accuracy and size
against bits (results/fashion_mnist_kmeans.png). ``--quick``: small subsets, a smoke test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_qat import DEFAULT_DATA_DIR, BatchStream, load_normalized  # noqa: E402
from fashion_mnist_workflow import accuracy, make_cnn, predict, train  # noqa: E402

import qext  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = float(1 << 20)
# Largest allowed drop below fp32 after QAT, in points (the targets).
TARGETS = {4: 0.5, 2: 2.0}


def plot(rows: list, fp32_acc: float, fp32_mib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in rows]
    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(bits, [100 * r["acc_before"] for r in rows], "o--", label="clustered, before QAT")
    ax_acc.plot(bits, [100 * r["acc_after"] for r in rows], "o-", label="after threshold-triggered QAT")
    ax_acc.axhline(100 * fp32_acc, color="gray", linestyle=":", label="fp32")
    ax_acc.set_xlabel("bits per weight")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_xticks(bits)
    ax_acc.legend()
    ax_size.plot(bits, [r["size_bytes"] / MIB for r in rows], "o-", label="k-means (packed labels + codebook)")
    ax_size.axhline(fp32_mib, color="gray", linestyle=":", label="fp32")
    ax_size.set_xlabel("bits per weight")
    ax_size.set_ylabel("model size (MiB)")
    ax_size.set_xticks(bits)
    ax_size.legend()
    fig.suptitle("Fashion-MNIST CNN, k-means weight quantization (qext)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bits", type=str, default="8,4,2", help="label widths to try")
    p.add_argument("--epochs", type=float, default=2.0, help="fp32 training epochs")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="k-means fine-tuning epochs (when triggered)")
    p.add_argument("--threshold", type=float, default=0.25,
                   help="fine-tune only when clustering lost more than this many accuracy points")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the fp32 training (cosine decay)")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate of the k-means fine-tuning (cosine)")
    p.add_argument("--per-channel", action="store_true", help="one codebook per output channel")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 4096 training / 2000 test images, 1 epoch")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.json = args.json or REPO_ROOT / "results" / f"fashion_mnist_kmeans{suffix}.json"
    args.plot = args.plot or REPO_ROOT / "results" / f"fashion_mnist_kmeans{suffix}.png"
    bits_list = [int(b) for b in args.bits.split(",")]

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test, _, _ = load_normalized(args.data_dir)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:4096], y_train[:4096], x_test[:2000], y_test[:2000]
        args.epochs = args.qat_epochs = 1.0
        args.log_every = 0
    steps_per_epoch = len(x_train) // args.batch_size
    print(f"Fashion-MNIST: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}; torch {torch.__version__}, "
          f"qext {qext.__version__}, threads {torch.get_num_threads()}")

    fp32 = make_cnn()
    fp32_steps = max(1, round(args.epochs * steps_per_epoch))
    print(f"\n== fp32: {fp32_steps} steps")
    train(fp32, BatchStream(x_train, y_train, args.batch_size, args.seed), fp32_steps, args.lr, "fp32",
          args.log_every, cosine=True)
    fp32_acc = accuracy(predict(fp32, x_test)[0], y_test)
    fp32_bytes = qext.model_size(fp32).float_bytes
    print(f"  fp32: {100 * fp32_acc:.2f}%, {fp32_bytes / MIB:.4f} MiB")

    rows = []
    qat_steps = max(1, round(args.qat_epochs * steps_per_epoch))
    for bits in bits_list:
        qconfig = qext.QConfig(weight=qext.KMeansSpec(bits=bits, per_channel=args.per_channel))
        t0 = time.perf_counter()
        clustered = qext.prepare_qat(fp32, qconfig)
        cluster_s = time.perf_counter() - t0
        acc_before = accuracy(predict(clustered, x_test)[0], y_test)
        drop = 100 * (fp32_acc - acc_before)
        retrained = drop > args.threshold
        print(f"\n== k-means {bits}-bit: clustered in {cluster_s:.2f} s, {100 * acc_before:.2f}% "
              f"({-drop:+.2f} points){'; fine-tuning ' + str(qat_steps) + ' steps' if retrained else '; no retraining'}")
        qat_s = 0.0
        if retrained:
            qat_s = train(clustered, BatchStream(x_train, y_train, args.batch_size, args.seed + 1), qat_steps,
                          args.qat_lr, f"kmeans{bits}", args.log_every, cosine=True)
        qat_pred = predict(clustered, x_test)[0]
        acc_after = accuracy(qat_pred, y_test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = qext.convert(clustered)
        conv_pred, eval_s = predict(converted, x_test)
        size = qext.model_size(converted)
        rows.append(dict(bits=bits, size_bytes=size.quantized_bytes, ratio=fp32_bytes / size.quantized_bytes,
                         acc_before=acc_before, acc_after=acc_after, acc_converted=accuracy(conv_pred, y_test),
                         converted_vs_qat_top1_differ=int((conv_pred != qat_pred).sum()), retrained=retrained,
                         cluster_s=cluster_s, qat_s=qat_s, qat_steps=qat_steps if retrained else 0,
                         converted_eval_s=eval_s))
        r = rows[-1]
        print(f"  after: {100 * acc_after:.2f}%, converted {100 * r['acc_converted']:.2f}% (top-1 differs from the "
              f"QAT model on {r['converted_vs_qat_top1_differ']} images), {size.quantized_bytes / MIB:.4f} MiB")

    lines = [
        f"fp32: {100 * fp32_acc:.2f}%, {fp32_bytes / MIB:.4f} MiB. Threshold {args.threshold:g} points, "
        f"{'per-channel' if args.per_channel else 'per-layer'} codebooks, {len(y_test)} test images.",
        "",
        "| bits | size (MiB) | fp32 / size | before QAT | retrained | after QAT | Δ vs fp32 | converted | target |",
        "|---:|---:|---:|---:|:---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        delta = 100 * (r["acc_after"] - fp32_acc)
        target = TARGETS.get(r["bits"])
        verdict = "" if target is None else f"≥ −{target:g}: {'PASS' if -delta <= target else 'FAIL'}"
        lines.append(
            f"| {r['bits']} | {r['size_bytes'] / MIB:.4f} | {r['ratio']:.1f}× | {100 * r['acc_before']:.2f} | "
            f"{'yes' if r['retrained'] else 'no'} | {100 * r['acc_after']:.2f} | {delta:+.2f} | "
            f"{100 * r['acc_converted']:.2f} | {verdict} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    plot(rows, fp32_acc, fp32_bytes / MIB, args.plot)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(fp32_accuracy=fp32_acc, fp32_bytes=fp32_bytes, rows=rows, table=table,
                                         args={k: str(v) for k, v in vars(args).items()},
                                         python=platform.python_version(), torch=torch.__version__,
                                         wall_s=time.perf_counter() - t_start), indent=2))
    print(f"\nwrote {args.json} and {args.plot} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

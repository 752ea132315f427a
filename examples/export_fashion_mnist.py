#!/usr/bin/env python3
"""Train, quantize and export a Fashion-MNIST classifier for C++ (examples/cpp/classify_fashion_mnist.cpp).

1. Trains a small CNN of ``make_cnn``'s shape (examples/fashion_mnist_workflow.py: QuantStub,
   3 x conv-BN-ReLU with two max-pools, Linear-ReLU, Linear, DeQuantStub) in fp32 for one epoch over a
   subset of the training images, then fine-tunes it with qext int8 QAT (``qext.fuse``,
   ``qext.prepare_qat(model, qext.get_qconfig("int8"))``) for a few hundred steps, and converts it with
   ``qext.convert`` (integer model). The default run takes well under a minute on two cores; ``--full``
   trains the default-width net on all 60k images (2 fp32 epochs + 1 QAT epoch).
2. Saves the converted model with ``qext.save_torchscript`` to ``<out>/model.pt`` (traced, checked bit for
   bit against the eager model, with the input normalisation stored in the archive as
   ``normalization.txt``).
3. Writes ``<out>/predictions_python.txt``: the predicted class of each of the first ``--limit`` test
   images, one per line, computed by the *eager* converted model, and prints its accuracy.

The C++ program should then print the same accuracy and write identical predictions:

    classify_fashion_mnist <out>/model.pt t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz \\
        <out>/predictions_cpp.txt --limit N

(the CTest test ``cpp_example_find_package`` runs both and compares the files).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_qat import DEFAULT_DATA_DIR, BatchStream, load_normalized  # noqa: E402
from fashion_mnist_workflow import accuracy, make_cnn, predict, train  # noqa: E402

import qext  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--limit", type=int, default=10000, help="predict the first N test images (0: all)")
    p.add_argument("--full", action="store_true",
                   help="train the default-width net on all 60k images (2 fp32 epochs, 1 QAT epoch; minutes)")
    p.add_argument("--train-subset", type=int, default=10000, help="training images used without --full")
    p.add_argument("--qat-steps", type=int, default=300, help="QAT fine-tuning steps without --full")
    p.add_argument("--widths", type=str, default="16,32,32", help="conv widths without --full")
    p.add_argument("--hidden", type=int, default=64, help="hidden linear width without --full")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (this small net gains little from more, and loses much when the "
                        "cores are shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test, mean, std = load_normalized(args.data_dir)
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]

    if args.full:
        widths, hidden, batch = (32, 64, 64), 128, 128
        steps_per_epoch = len(x_train) // batch
        fp32_steps, qat_steps, lr, qat_lr = 2 * steps_per_epoch, steps_per_epoch, 2e-3, 1e-4
    else:
        widths, hidden, batch = tuple(int(w) for w in args.widths.split(",")), args.hidden, args.batch_size
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
        fp32_steps, qat_steps, lr, qat_lr = max(1, len(x_train) // batch), args.qat_steps, 3e-3, 3e-4
    print(f"Fashion-MNIST from {args.data_dir}: train {len(x_train)}, test {len(x_test)}; torch {torch.__version__}, "
          f"qext {qext.__version__}, {torch.get_num_threads()} threads, seed {args.seed}")

    # 1. fp32, then int8 QAT from the same weights, then the integer model
    torch.manual_seed(args.seed)
    model = make_cnn(widths, hidden)
    print(f"fp32: {fp32_steps} steps at batch {batch}, widths {widths}, hidden {hidden}")
    fp32_s = train(model, BatchStream(x_train, y_train, batch, args.seed), fp32_steps, lr, "fp32", 0, cosine=True)
    fp32_acc = accuracy(predict(model, x_test)[0], y_test)

    freeze_bn = max(1, qat_steps // 2)
    qat = qext.prepare_qat(qext.fuse(model.eval()), qext.get_qconfig("int8"), freeze_bn_step=freeze_bn)
    freeze_obs = max(1, (3 * qat_steps) // 4)

    def on_step(step: int):
        if step == freeze_obs + 1:
            qext.enable_observer(qat, False)

    print(f"qext int8 QAT: {qat_steps} steps (batch-norm statistics frozen after {freeze_bn}, observers after "
          f"{freeze_obs})")
    qat_s = train(qat, BatchStream(x_train, y_train, batch, args.seed + 1), qat_steps, qat_lr, "qat", 0,
                  on_step=on_step)
    qat.eval()
    qext.enable_observer(qat, False)
    qat_acc = accuracy(predict(qat, x_test)[0], y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qext.QuantizationWarning)
        int_model = qext.convert(qat)

    # 2. save: traced, checked against the eager model on a test batch, another batch size and training data
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "model.pt"
    example = x_test[:64] if len(x_test) >= 64 else x_train[:64]
    qext.save_torchscript(int_model, example, model_path, check_inputs=[x_train[:37], x_train[-5:]],
                          extra_files={"normalization.txt": f"mean {mean!r}\nstd {std!r}\n"})

    # 3. predictions of the eager converted model (what the C++ program must reproduce)
    pred, eval_s = predict(int_model, x_test, batch_size=256)
    pred_path = args.out / "predictions_python.txt"
    pred_path.write_text("".join(f"{int(c)}\n" for c in pred))
    int_acc = accuracy(pred, y_test)
    loaded = qext.load_torchscript(model_path)
    with torch.no_grad():
        ts_pred, ts_s = predict(loaded, x_test, batch_size=256)
    same = int((ts_pred == pred).sum())

    n = len(x_test)
    print(f"training: fp32 {fp32_s:.1f} s, QAT {qat_s:.1f} s")
    print(f"test accuracy on {n} images: fp32 {100 * fp32_acc:.2f}%, int8 QAT (fake-quant) {100 * qat_acc:.2f}%, "
          f"converted integer model {100 * int_acc:.2f}%")
    print(f"eager converted model: {n / eval_s:.0f} images/s; TorchScript file in Python: {n / ts_s:.0f} images/s, "
          f"same prediction on {same} of {n} images")
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes; input normalisation mean {mean!r}, std {std!r}) "
          f"and {pred_path}  [{time.perf_counter() - t_start:.1f} s]")
    if same != n:
        print("error: the TorchScript file predicts differently from the eager model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""End-to-end quantization-aware training on Fashion-MNIST with qext's fake-quantization operators.

1. Train a small CNN in fp32 (``--steps``), evaluate on the full 10k test set.  As a control, fine-tune
   a copy in fp32 for ``--qat-steps`` more steps (the QAT rows get that much extra training too).
2. Fine-tune a copy with int8 fake quantization (``--qat-steps``): weights per output channel, symmetric
   int8 in [-127, 127] with scale = max|w| / 127; activations per tensor, affine uint8 in [0, 255] from an
   EMA min/max observer; straight-through gradients (``qext.fake_quantize``).
3. Fine-tune another copy with 4-bit LSQ (``qext.fake_quantize_learnable``): learnable step sizes,
   weights per output channel in [-8, 7], activations per tensor in [0, 15] (after ReLU) and the network
   input in [0, 15] with a learnable zero point (LSQ+), scale initialised 2*mean|v|/sqrt(qmax), gradient
   scale 1/sqrt(numel*qmax).
4. Print a Markdown table and write it as JSON to results/fashion_mnist_qat.json.

Data: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); run
``bash scripts/setup_env.sh`` (or ``bash scripts/run_main.sh``, which runs this file) to install it.

Batch norm is kept as a separate float op in the QAT models (it is not folded into the conv weights);
the fake-quant models simulate quantized conv/linear weights and quantized activations between layers.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import qext
except ImportError as exc:  # pragma: no cover - a set-up problem, not a code path
    sys.exit(f"error: cannot import qext ({exc}); run `bash scripts/setup_env.sh` first "
             "(it builds qext and installs it into .venv)")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# --------------------------------------------------------------------------------------------- data
def read_idx_gz(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) into a numpy array of its stored dtype."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4]!r})")
    dtype, ndim = np.dtype(dtypes[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {shape} but payload has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def load_fashion_mnist(data_dir: Path):
    files = {split: (data_dir / f"{split}-images-idx3-ubyte.gz", data_dir / f"{split}-labels-idx1-ubyte.gz")
             for split in ("train", "t10k")}
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        sys.exit("error: Fashion-MNIST files not found:\n  " + "\n  ".join(missing) +
                 "\nInstall them with `bash scripts/setup_env.sh` (Debian package dataset-fashion-mnist), "
                 "or point --data-dir at a directory holding the four *-ubyte.gz files.")
    out = {}
    for split, (img_path, lbl_path) in files.items():
        images, labels = read_idx_gz(img_path), read_idx_gz(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: unexpected shapes {images.shape} / {labels.shape}")
        out[split] = (images, labels)
    return out["train"], out["t10k"]


def to_tensors(images: np.ndarray, labels: np.ndarray, mean: float, std: float):
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - mean) / std
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_normalized(data_dir: Path):
    """(x_train, y_train, x_test, y_test, mean, std): the images as float32 [N, 1, 28, 28] normalised with
    the training set's pixel mean and std (the numbers a deployed model must apply too)."""
    (train_img, train_lbl), (test_img, test_lbl) = load_fashion_mnist(data_dir)
    mean = float(train_img.mean() / 255.0)
    std = float(train_img.std() / 255.0)
    x_train, y_train = to_tensors(train_img, train_lbl, mean, std)
    x_test, y_test = to_tensors(test_img, test_lbl, mean, std)
    return x_train, y_train, x_test, y_test, mean, std


# --------------------------------------------------------------------------------------------- model
def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


# ------------------------------------------------------------------------- int8 fake quant (STE)
class Int8WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 weights: scale_c = max|w_c| / 127, zero point 0, range [-127, 127]."""

    quant_min, quant_max = -127, 127

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            max_abs = w.detach().abs().flatten(1).amax(dim=1)
            scale = (max_abs / self.quant_max).clamp_min(torch.finfo(torch.float32).eps)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return qext.fake_quantize(w, scale, zero_point, self.quant_min, self.quant_max, axis=0)


class Int8ActFakeQuant(nn.Module):
    """Per-tensor affine uint8 [0, 255] with an EMA min/max observer (updated in training mode only)."""

    quant_min, quant_max = 0, 255

    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        self.averaging_constant = averaging_constant
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        if torch.isinf(self.min_val):  # first batch initialises the EMA
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            c = self.averaging_constant
            self.min_val.mul_(1 - c).add_(c * lo)
            self.max_val.mul_(1 - c).add_(c * hi)

    @torch.no_grad()
    def qparams(self):
        lo = self.min_val.clamp(max=0.0)  # the range always contains 0, so 0 is exactly representable
        hi = self.max_val.clamp(min=0.0)
        scale = ((hi - lo) / (self.quant_max - self.quant_min)).clamp_min(torch.finfo(torch.float32).eps)
        zero_point = (self.quant_min - torch.round(lo / scale)).clamp(self.quant_min, self.quant_max)
        return scale.reshape(1), zero_point.to(torch.int32).reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if torch.isinf(self.min_val):
            return x  # never observed anything: nothing to quantize with yet
        scale, zero_point = self.qparams()
        return qext.fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max)


# ------------------------------------------------------------------------------ 4-bit LSQ / LSQ+
class LsqFakeQuant(nn.Module):
    """Learned step size quantization (Esser et al. 2020), optionally with a learnable offset (LSQ+).

    The step size is initialised from the first tensor seen, 2*mean|v|/sqrt(qmax), and its gradient is
    scaled by 1/sqrt(n*qmax), n = elements per scale (per channel for weights, per batch for activations).
    """

    eps = torch.finfo(torch.float32).eps  # smallest step size (as torch.ao's _LearnableFakeQuantize)

    def __init__(self, quant_min: int, quant_max: int, channels: int = 1, axis: int | None = None,
                 learn_zero_point: bool = False):
        super().__init__()
        self.quant_min, self.quant_max, self.axis = quant_min, quant_max, axis
        self.scale = nn.Parameter(torch.ones(channels))
        self.zero_point = nn.Parameter(torch.zeros(channels), requires_grad=learn_zero_point)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_from(self, v: torch.Tensor) -> None:
        if self.axis is None:
            mean_abs = v.abs().mean().reshape(1)
        else:
            mean_abs = v.abs().transpose(0, self.axis).flatten(1).mean(dim=1)
        self.scale.copy_((2 * mean_abs / math.sqrt(self.quant_max)).clamp_min(self.eps))
        if self.zero_point.requires_grad:  # LSQ+: start with the tensor's minimum mapped to quant_min
            lo = v.min().clamp(max=0.0)
            self.zero_point.fill_(float(self.quant_min) - float(lo) / float(self.scale.mean()))
            self.zero_point.clamp_(self.quant_min, self.quant_max)
        self.initialized.fill_(True)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._init_from(v.detach())
        with torch.no_grad():  # an optimizer step can push a step size to <= 0; qext requires it positive
            self.scale.clamp_(min=self.eps)
        per_scale = v.numel() // self.scale.numel()
        grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)
        return qext.fake_quantize_learnable(v, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                            grad_factor=grad_factor, axis=self.axis)


# ------------------------------------------------------------------- fake-quant conv / linear
class FakeQuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight goes through a fake-quant module on every forward."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_fake_quant: nn.Module) -> "FakeQuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode)
        new.load_state_dict(conv.state_dict())
        new.weight_fake_quant = weight_fake_quant
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight goes through a fake-quant module on every forward."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_fake_quant: nn.Module) -> "FakeQuantLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.load_state_dict(linear.state_dict())
        new.weight_fake_quant = weight_fake_quant
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)


def prepare_qat(model: nn.Sequential, scheme: str) -> nn.Sequential:
    """Copy of `model` with fake-quantized weights and activations.

    Activations are fake-quantized at the network input and after every ReLU (the tensors an integer
    model would hand from layer to layer); the logits stay float.
    """
    if scheme == "int8":
        weight_fq = lambda m: Int8WeightFakeQuant()  # noqa: E731
        input_fq = lambda: Int8ActFakeQuant()  # noqa: E731
        relu_fq = lambda: Int8ActFakeQuant()  # noqa: E731
    elif scheme == "lsq4":
        weight_fq = lambda m: LsqFakeQuant(-8, 7, channels=m.weight.shape[0], axis=0)  # noqa: E731
        input_fq = lambda: LsqFakeQuant(0, 15, learn_zero_point=True)  # noqa: E731
        relu_fq = lambda: LsqFakeQuant(0, 15)  # noqa: E731
    else:
        raise ValueError(f"unknown scheme {scheme!r}")

    layers: list[nn.Module] = [input_fq()]
    for m in copy.deepcopy(model):
        if isinstance(m, nn.Conv2d):
            layers.append(FakeQuantConv2d.from_float(m, weight_fq(m)))
        elif isinstance(m, nn.Linear):
            layers.append(FakeQuantLinear.from_float(m, weight_fq(m)))
        else:
            layers.append(m)
            if isinstance(m, nn.ReLU):
                layers.append(relu_fq())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------ train / evaluate
class BatchStream:
    """Endless shuffled mini-batches from in-memory tensors, reproducible from a seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(x)), 0

    def next(self):
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.x)), 0
        idx = torch.from_numpy(self.order[self.pos:self.pos + self.batch_size])
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]


def train(model: nn.Module, stream: BatchStream, steps: int, lr: float, log_every: int, tag: str) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if log_every and (step % log_every == 0 or step == steps):
            n = step % log_every or log_every
            print(f"  [{tag}] step {step:4d}/{steps}  loss {running / n:.4f}  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            running = 0.0
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
    model.eval()
    t0 = time.perf_counter()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum().item()
    return correct / len(x), time.perf_counter() - t0


@torch.no_grad()
def calibrate(model: nn.Module, stream: BatchStream, batches: int) -> None:
    """Run a few batches so observers / LSQ scales see real data; batch-norm statistics stay frozen."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for _ in range(batches):
        model(stream.next()[0])


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="fp32 training steps")
    p.add_argument("--qat-steps", type=int, default=200, help="fine-tuning steps for each QAT variant")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (fp32 training)")
    p.add_argument("--qat-lr", type=float, default=1e-3, help="Adam learning rate (QAT fine-tuning)")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="batches run through each QAT model before fine-tuning (observer/scale init)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--log-every", type=int, default=50, help="print the training loss every N steps (0: never)")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "fashion_mnist_qat.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    x_train, y_train, x_test, y_test, mean, std = load_normalized(args.data_dir)
    print(f"Fashion-MNIST from {args.data_dir}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}; "
          f"normalised with mean {mean:.4f}, std {std:.4f}")
    print(f"torch {torch.__version__}, qext {getattr(qext, '__version__', '?')} ({qext.__file__}), "
          f"threads {torch.get_num_threads()}, seed {args.seed}")

    rows = []

    # 1. fp32
    model = make_cnn()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== fp32: {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, {n_params} parameters")
    train_s = train(model, BatchStream(x_train, y_train, args.batch_size, args.seed), args.steps, args.lr,
                    args.log_every, "fp32")
    acc, eval_s = evaluate(model, x_test, y_test)
    print(f"  fp32 test accuracy {acc:.4f}")
    rows.append(dict(model="fp32", quantization="none", steps=args.steps, accuracy_before_finetune=None,
                     accuracy=acc, train_s=train_s, eval_s=eval_s))

    # control: the fp32 model fine-tuned for as many steps as each QAT variant, so that the QAT rows are
    # compared with an fp32 model that saw the same amount of training
    print(f"\n== fp32 control: {args.qat_steps} more fp32 steps, Adam lr {args.qat_lr}")
    control = copy.deepcopy(model)
    train_s = train(control, BatchStream(x_train, y_train, args.batch_size, args.seed + 100), args.qat_steps,
                    args.qat_lr, args.log_every, "fp32 control")
    acc, eval_s = evaluate(control, x_test, y_test)
    print(f"  fp32 control test accuracy {acc:.4f}")
    rows.append(dict(model="fp32 + fine-tuning (control)", quantization="none",
                     steps=args.qat_steps, accuracy_before_finetune=rows[0]["accuracy"],
                     accuracy=acc, train_s=train_s, eval_s=eval_s))
    del control

    # QAT variants, each fine-tuned from the fp32 model
    variants = [
        ("int8 fake-quant QAT", "int8",
         "W int8 per-channel symmetric, A uint8 per-tensor EMA min/max, straight-through"),
        ("4-bit LSQ QAT", "lsq4",
         "W 4-bit per-channel, A 4-bit per-tensor, learnable scales (input: learnable zero point)"),
    ]
    for i, (name, scheme, desc) in enumerate(variants, start=1):
        print(f"\n== {name}: {desc}; {args.qat_steps} steps, Adam lr {args.qat_lr}")
        qmodel = prepare_qat(model, scheme)
        stream = BatchStream(x_train, y_train, args.batch_size, args.seed + i)
        t0 = time.perf_counter()
        calibrate(qmodel, stream, args.calib_batches)
        calib_s = time.perf_counter() - t0
        acc0, _ = evaluate(qmodel, x_test, y_test)
        print(f"  after calibration ({args.calib_batches} batches), before fine-tuning: accuracy {acc0:.4f}")
        train_s = train(qmodel, stream, args.qat_steps, args.qat_lr, args.log_every, scheme) + calib_s
        acc, eval_s = evaluate(qmodel, x_test, y_test)
        print(f"  {name} test accuracy {acc:.4f}")
        rows.append(dict(model=name, quantization=desc, steps=args.qat_steps, accuracy_before_finetune=acc0,
                         accuracy=acc, train_s=train_s, eval_s=eval_s))

    # table
    print("\n## Fashion-MNIST results (10k test images)\n")
    print("| model | steps | test accuracy | accuracy before fine-tuning | train wall s | eval wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        before = "-" if r["accuracy_before_finetune"] is None else f"{100 * r['accuracy_before_finetune']:.2f}%"
        print(f"| {r['model']} | {r['steps']} | {100 * r['accuracy']:.2f}% | {before} | "
              f"{r['train_s']:.1f} | {r['eval_s']:.2f} |")
    print("\nThe control and QAT rows start from the fp32 model; their train time is (calibration +) "
          "fine-tuning only. Wall times are single runs on a shared machine.")

    result = dict(
        example="fashion_mnist_qat",
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        environment=dict(torch=torch.__version__, qext=getattr(qext, "__version__", None),
                         python=platform.python_version(), machine=platform.machine(),
                         threads=torch.get_num_threads(), cpu_count=os.cpu_count()),
        normalization=dict(mean=mean, std=std),
        parameters=n_params,
        rows=rows,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

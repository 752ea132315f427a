"""K-means (Deep Compression) training modules: Linear and Conv2d whose weight is a trained codebook plus
fixed labels, ``weight = centroids[labels]``.

``from_float`` clusters the float weight with :func:`qext.kmeans` as the qconfig's :class:`KMeansSpec`
says. The codebook (``centroids``, a Parameter) is trained through its own gradient, the sum (or mean) of
the gradients of the weights in each cluster; the labels are a buffer. With ``reassign_every = n`` the
module also keeps the float weights (``weight``, trained with the straight-through gradient of the
clustered weight) and every n training steps moves each weight to its nearest centroid's cluster.
An activation spec in the qconfig fake-quantizes the output (after the ReLU of ``relu=True`` layers),
as the other QAT modules do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..clustering import kmeans, kmeans_assign, kmeans_dequantize
from ..qconfig import KMeansSpec
from .qat import _check_type, _conv_args, _QATMixin


class _KMeansMixin(_QATMixin):
    """Codebook, labels and (optionally) the float weights used for re-assignment."""

    relu: bool = False

    @property
    def spec(self) -> KMeansSpec:
        return self.qconfig.weight

    @property
    def codebook_axis(self) -> Optional[int]:
        return 0 if self.spec.per_channel else None

    def _init_kmeans(self, float_mod: nn.Module, qconfig, relu: bool):
        spec = getattr(qconfig, "weight", None)
        if not isinstance(spec, KMeansSpec):
            raise TypeError(
                f"{type(self).__name__}.from_float: qconfig.weight must be a KMeansSpec, got {type(spec).__name__}"
            )
        self._init_fake_quant(qconfig, weight=False)
        float_weight = float_mod.weight.detach()
        # A layer with fewer weights (per codebook) than 2^bits gets one centroid per weight.
        per_codebook = float_weight[0].numel() if spec.per_channel else float_weight.numel()
        with torch.no_grad():
            centroids, labels = kmeans(float_weight, k=min(spec.k, per_codebook), per_channel=spec.per_channel,
                                       init=spec.init, iters=spec.iters, seed=spec.seed)
        del self.weight  # the meta-device placeholder of the float layer's constructor
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("labels", labels)
        if spec.reassign_every is None:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(float_weight.clone())
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.int64, device=float_weight.device))
        self.bias = float_mod.bias
        self.relu = relu
        if self.activation_post_process is not None:
            self.activation_post_process.to(float_weight.device)
        self.train(float_mod.training)
        return self

    def reassign(self) -> None:
        """Moves every float weight to the cluster of its nearest centroid (needs ``reassign_every``)."""
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__}.reassign: the qconfig has no reassign_every, so the "
                               f"float weights were not kept")
        self.labels.copy_(kmeans_assign(self.weight.detach(), self.centroids.detach(), self.codebook_axis))

    def clustered_weight(self) -> torch.Tensor:
        """``centroids[labels]``, differentiable in the centroids (and, with re-assignment, passing the
        same gradient straight through to the float weights)."""
        w = kmeans_dequantize(self.centroids, self.labels, self.codebook_axis, self.spec.grad == "mean")
        if self.weight is not None:
            w = w + (self.weight - self.weight.detach())
        return w

    def _count_step(self) -> None:
        if not self.training:
            return
        n = self.spec.reassign_every
        if n is not None:
            steps = int(self.training_steps)  # reads the counter once (a device sync on CUDA)
            if steps > 0 and steps % n == 0:
                self.reassign()
        self.training_steps += 1

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return self._fq_output(F.relu(y) if self.relu else y)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{super().extra_repr()}, kmeans_bits={s.bits}, per_channel={s.per_channel}, relu={self.relu}, "
                f"reassign_every={s.reassign_every}")


class KMeansLinear(_KMeansMixin, nn.Linear):
    """``nn.Linear`` with a k-means clustered weight (optionally fused with a ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count_step()
        return self._finish(F.linear(x, self.clustered_weight(), self.bias))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig, relu: bool = False):
        _check_type(mod, (nn.Linear,), cls.__name__)
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, device="meta")
        return new._init_kmeans(mod, qconfig, relu)


class KMeansConv2d(_KMeansMixin, nn.Conv2d):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) with a k-means clustered
    weight (optionally fused with a ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count_step()
        return self._finish(self._conv_forward(x, self.clustered_weight(), self.bias))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig, relu: bool = False):
        _check_type(mod, (nn.Conv2d,), cls.__name__)
        new = cls(**_conv_args(mod), device="meta")
        return new._init_kmeans(mod, qconfig, relu)


KMEANS_MODULES = (KMeansLinear, KMeansConv2d)

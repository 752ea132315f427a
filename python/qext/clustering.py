"""K-means weight quantization (Deep Compression): clustering, the trainable codebook, packed labels.

A clustered weight is a codebook of ``k`` float centroids (one per tensor, or one per output channel)
and one label per weight: ``weight = centroids[labels]``. Training moves the centroids by the gradient
of their cluster (:func:`kmeans_dequantize`); storage packs the labels at 1, 2, 4 or 8 bits
(:func:`pack_labels`). The operators live in C++ (``torch.ops.qext.*``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .qconfig import KMEANS_INITS, PACKED_LABEL_BITS

__all__ = ["kmeans", "kmeans_assign", "kmeans_dequantize", "pack_labels", "unpack_labels"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def kmeans(
    weight: torch.Tensor,
    bits: Optional[int] = None,
    k: Optional[int] = None,
    per_channel: bool = False,
    init: str = "linear",
    iters: int = 30,
    seed: int = 0,
    axis: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of the values of ``weight`` → ``(centroids, labels)``.

    Give ``bits`` (1..8, ``k = 2^bits``) or ``k`` (1..256). ``per_channel``: one codebook per index along
    ``axis`` (centroids ``[C, k]``), else one for the tensor (``[k]``). Centroids are sorted ascending and
    have the weight's dtype; labels are uint8 of the weight's shape, each the nearest centroid (ties to
    the lower one). ``init``: "linear" (evenly spaced over [min, max]), "density" (evenly spaced
    quantiles) or "kmeans++" (seeded by ``seed``); then at most ``iters`` exact Lloyd iterations, each
    k lookups in a lazily split radix index of the values (not O(n k) distance computations).
    Deterministic: the same input and seed give the same result on every run, thread count and device.
    The weight is clustered as data: no gradient flows through the clustering.
    """
    if (bits is None) == (k is None):
        raise ValueError(f"qext.kmeans: give exactly one of bits and k, got bits={bits!r} and k={k!r}")
    if bits is not None:
        if not _is_int(bits) or not 1 <= bits <= 8:
            raise ValueError(f"qext.kmeans: bits must be an integer in 1..8, got {bits!r}")
        k = 1 << bits
    if not _is_int(k):
        raise ValueError(f"qext.kmeans: k must be an integer, got {k!r}")
    if init not in KMEANS_INITS:
        raise ValueError(f"qext.kmeans: init must be one of {', '.join(map(repr, KMEANS_INITS))}, got {init!r}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"qext.kmeans: per_channel must be a bool, got {per_channel!r}")
    return torch.ops.qext.kmeans(weight.detach(), k, axis if per_channel else None, init, iters, seed)


def kmeans_dequantize(
    centroids: torch.Tensor, labels: torch.Tensor, axis: Optional[int] = None, mean: bool = False
) -> torch.Tensor:
    """``centroids[labels]`` (per-channel: ``centroids[c, labels]`` for the index c along ``axis``), with
    the codebook gradient ``dL/dC_k = sum_j dL/dW_j * [label_j = k]`` (``mean=True``: divided by the
    cluster's size; 0 for an empty cluster) computed in one deterministic pass. Labels get no gradient."""
    return torch.ops.qext.kmeans_dequantize(centroids, labels, axis, mean)


def kmeans_assign(weight: torch.Tensor, centroids: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """uint8 labels of the nearest centroid of every weight (ties to the lower index), for a codebook
    ``[k]`` or ``[C, k]`` along ``axis``; the centroids need not be sorted."""
    if centroids.dim() not in (1, 2) or (centroids.dim() == 2) != (axis is not None):
        raise ValueError(
            f"qext.kmeans_assign: centroids must be [k] without axis or [C, k] with one, got shape "
            f"{list(centroids.shape)} and axis={axis!r}"
        )
    with torch.no_grad():
        rows = centroids.reshape(-1, centroids.shape[-1]).to(weight.dtype)
        values, order = rows.sort(dim=1, stable=True)
        midpoints = (values[:, 1:] + values[:, :-1]) / 2
        if axis is None:
            idx = torch.bucketize(weight, midpoints[0])
            return order[0][idx].to(torch.uint8)
        moved = weight.movedim(axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        if flat.shape[0] != rows.shape[0]:
            raise ValueError(
                f"qext.kmeans_assign: weight has {flat.shape[0]} channels along axis {axis}, centroids have "
                f"{rows.shape[0]} rows"
            )
        idx = torch.searchsorted(midpoints.contiguous(), flat.contiguous())
        labels = torch.gather(order, 1, idx)
        return labels.reshape(moved.shape).movedim(0, axis).contiguous().to(torch.uint8)


def pack_labels(labels: torch.Tensor, bits: int) -> torch.Tensor:
    """Labels packed at ``bits`` (1, 2, 4 or 8) per label into a 1-D uint8 tensor of
    ``ceil(numel * bits / 8)`` bytes: row-major order, label i in byte ``i // (8 // bits)`` at bit
    ``(i % (8 // bits)) * bits`` (little-endian within the byte), padding bits zero."""
    if bits not in PACKED_LABEL_BITS:
        raise ValueError(f"qext.pack_labels: bits must be one of {PACKED_LABEL_BITS}, got {bits!r}")
    return torch.ops.qext.pack_labels(labels, bits)


def unpack_labels(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """uint8 labels of ``shape`` from :func:`pack_labels`' format; the length of ``packed`` must match."""
    if bits not in PACKED_LABEL_BITS:
        raise ValueError(f"qext.unpack_labels: bits must be one of {PACKED_LABEL_BITS}, got {bits!r}")
    return torch.ops.qext.unpack_labels(packed, bits, list(shape))

"""Batched K-means in plain torch, sized for VQ codebooks of short sub-vectors.

The VQ codec fits one codebook per layer, per head or per (head, group) of dimensions; those are
``b`` independent K-means problems over points of ``d ≤ 8`` dimensions, up to ~100K points and
4,096 centroids each.  The full ``n × k`` distance matrix of one such problem would take 1.6 GB,
so distances are computed in row chunks whose size keeps every temporary near ``_CHUNK_ELEMENTS``
floats, whatever ``b``, ``n`` and ``k`` are.

Initialisation samples ``k`` distinct points per problem (seeded, so fits are reproducible).
k-means++ would give slightly better starts but needs ``k`` sequential passes over the data —
4,096 passes is far more than the dozen Lloyd iterations that follow, so random sampling plus
re-seeding of empty clusters is the better trade here.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 20
"""Upper bound on the floats of one chunk's distance block on a CPU (4 MiB in float32, cache-friendly)."""
_DEVICE_CHUNK_ELEMENTS = 1 << 26
"""The same on an accelerator (256 MiB): there each chunk costs kernel launches, and a 16K-row append
of 8 heads x 64 sub-vectors would otherwise take 2,048 chunks of 512 points."""


def augment(centroids: torch.Tensor) -> torch.Tensor:
    """``(b, k, d)`` → ``(b, d + 1, k)``: the −2-scaled centroids over their ``|c|²``, the right operand of
    ``_nearest``'s matmul (a codec that assigns often keeps it rather than rebuild it per call)."""
    return torch.cat([-2.0 * centroids, (centroids * centroids).sum(-1, keepdim=True)], dim=-1).transpose(1, 2)


def _nearest(x: torch.Tensor, c_aug: torch.Tensor, with_dist: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Index of (and, ``with_dist``, squared distance to) the nearest centroid of every point, chunked
    over points; ``c_aug`` is ``augment(centroids)``.

    Uses ``|x|² − 2 x·c + |c|²``: with a constant 1 appended to every point, one batched matmul with
    ``c_aug`` yields ``|c|² − 2 x·c`` for a whole chunk and one ``min`` finds the winner; the per-point
    ``|x|²`` does not change the argmin and is added only to the returned distance.
    """
    b = x.shape[0]
    ones = torch.ones(b, 1, 1, device=x.device)
    chunk = max(1, (_CHUNK_ELEMENTS if x.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS) // (b * c_aug.shape[2]))
    labels, dists = [], []
    for part in x.split(chunk, dim=1):
        best, idx = torch.bmm(torch.cat([part, ones.expand(-1, part.shape[1], -1)], dim=-1), c_aug).min(dim=-1)
        labels.append(idx)
        if with_dist:
            dists.append((best + (part * part).sum(-1)).clamp_(min=0.0))
    return torch.cat(labels, dim=1), torch.cat(dists, dim=1) if with_dist else None


def assign(x: torch.Tensor, centroids: torch.Tensor | None = None, *, augmented: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Nearest centroid of every point: ``x (b, n, d)``, ``centroids (b, k, d)`` (or their ``augment``)
    → ``LongTensor (b, n)``."""
    if augmented is None:
        if centroids is None:
            raise ValueError("assign: pass centroids or augmented")
        augmented = augment(centroids.float())
    return _nearest(x.float(), augmented, with_dist=False)[0]


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Fit ``k`` centroids to each of ``b`` independent point sets ``x (b, n, d)`` → ``(b, k, d)`` float32.

    Runs ``iters`` Lloyd iterations from ``k`` distinct points sampled with ``seed``.  A cluster
    left empty by an iteration is re-seeded with the points farthest from their current centroid
    (distinct points per problem), which is where the codebook is doing worst.

    With fewer points than centroids (``n ≤ k``) no clustering is needed: the points themselves
    are the optimal codebook (zero error).  They are returned in order and the remaining
    ``k − n`` slots repeat them cyclically, so the shape stays ``(b, k, d)``; the duplicates are
    harmless because equal centroids decode to the same point whichever one an assignment picks.
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans: x must be (b, n, d), got shape {tuple(x.shape)}")
    b, n, _ = x.shape
    if n == 0:
        raise ValueError("kmeans: x has no points (n=0)")
    if k < 1:
        raise ValueError(f"kmeans: k={k} must be >= 1")
    if iters < 1:
        raise ValueError(f"kmeans: iters={iters} must be >= 1")
    x = x.float()
    if n <= k:
        return x[:, torch.arange(k, device=x.device) % n].contiguous()

    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.rand(b, n, generator=gen).argsort(dim=1)[:, :k].to(x.device)
    centroids = torch.gather(x, 1, start.unsqueeze(-1).expand(-1, -1, x.shape[2])).contiguous()
    offsets = (torch.arange(b, device=x.device) * k).unsqueeze(1)  # flat cluster id = problem * k + label
    flat_x = x.reshape(b * n, -1)
    for _ in range(iters):
        labels, dist = _nearest(x, augment(centroids))
        flat = (labels + offsets).reshape(-1)
        sums = torch.zeros(b * k, x.shape[2], device=x.device).index_add_(0, flat, flat_x)
        counts = torch.bincount(flat, minlength=b * k).view(b, k, 1)
        centroids = torch.where(counts > 0, sums.view(b, k, -1) / counts.clamp(min=1), centroids)
        centroids = _reseed_empty(x, centroids, counts.squeeze(-1) == 0, dist)
    return centroids


def _reseed_empty(x: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Move empty clusters onto far points: a problem's r-th empty cluster takes its r-th farthest point."""
    most = int(empty.sum(dim=1).max())
    if most == 0:
        return centroids
    far = dist.topk(most, dim=1).indices  # (b, most)
    rank = (empty.cumsum(dim=1) - 1).clamp(min=0, max=most - 1)  # (b, k)
    point = torch.gather(far, 1, rank)
    replacement = torch.gather(x, 1, point.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return torch.where(empty.unsqueeze(-1), replacement, centroids)

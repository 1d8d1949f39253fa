"""Rotation matrices for `rotate`: Hadamard, random orthogonal, KLT and KLT-then-Hadamard.

- hadamard: Q = diag(s) R, R the normalized Hadamard matrix of `qcompiler.hadamard`, s random
  signs (QuaRot's randomized Hadamard); it spreads every channel over all channels, so an
  outlier channel costs every channel a little instead of one channel a lot.
- random: Q from the QR decomposition of a Gaussian matrix (signs fixed so Q is unique).
- klt: the eigenvectors of the calibration activations' covariance C = E[x^T x], sorted by
  decreasing eigenvalue (Karhunen-Loeve transform: decorrelates the channels).
- klt-hadamard: Q = K R, the KLT followed by a Hadamard rotation (MambaQuant's KLT-enhanced
  rotation: the KLT adapts the rotation to the data, the Hadamard then evens out the
  eigenvalues' very different magnitudes).
All are float64 and orthogonal (Q^T Q = I); y = x Q.
"""

from __future__ import annotations

import torch

from qcompiler.errors import TransformError
from qcompiler.hadamard import hadamard_matrix, small_orders, supported

KINDS = ("hadamard", "random", "klt", "klt-hadamard")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_signs(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=_gen(seed)).double() * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).reshape(1, -1)


def klt_basis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a covariance matrix as columns, largest eigenvalue first, each with
    its largest entry positive (a deterministic sign)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    evecs = evecs[:, torch.argsort(evals, descending=True)]
    idx = evecs.abs().argmax(0)
    return evecs * torch.sign(evecs[idx, torch.arange(evecs.shape[1])]).reshape(1, -1)


def need_hadamard(n: int, where: str) -> None:
    if not supported(n):
        raise TransformError(
            f"{where}: no Hadamard matrix of order {n}; sizes must be 2^k times one of "
            f"{small_orders()[:12]}...; use kind=random or kind=klt for this size")


def rotation(kind: str, n: int, seed: int, cov: torch.Tensor | None = None, where: str = "rotate") -> torch.Tensor:
    if kind in ("hadamard", "klt-hadamard"):
        need_hadamard(n, where)
        h = random_signs(n, seed).reshape(-1, 1) * hadamard_matrix(n)
    if kind == "hadamard":
        return h
    if kind == "random":
        return random_orthogonal(n, seed)
    k = klt_basis(cov)
    return k if kind == "klt" else k @ h


class Covariance:
    """Accumulates E[x^T x] over the rows of every value it is given (last dim = channels)."""

    def __init__(self, n: int):
        self.sum = torch.zeros(n, n, dtype=torch.float64)
        self.count = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

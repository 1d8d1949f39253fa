"""Hadamard matrices of any order 2^k * m with a known small Hadamard factor m, and the
fast transform that `qc.hadamard` computes.

The normalized transform of length n = m * p (p = 2^k, m in `small_orders()`) is

    R = (H_m kron H_p) / sqrt(n),     y = x R   (along the last dim of x),

which is orthogonal (R R^T = I). H_p is Sylvester's matrix in natural order, applied by the
fast Walsh-Hadamard butterflies (log2 p stages of (a + b, a - b)); H_m comes from Paley's
constructions (I: q+1 for a prime q = 3 mod 4; II: 2(q+1) for a prime q = 1 mod 4), so
e.g. 576 = 36 * 16 and 1536 = 12 * 128. With index i = a*p + b, x R reshapes x to
X[a, b] and computes H_m^T X H_p.

`hadamard_reference` fixes the order of every float operation (butterflies, then the
H_m mix accumulated a = 0..m-1 from 0, then one multiply by float32(1/sqrt(n))) so that a
backend computing the same operations in the same order matches it bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q+1, q prime = 3 mod 4: H = I + S with S skew ([[0, 1^T], [-1, Q]])."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1), q prime = 1 mod 4, from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def _small_table(limit: int = 256) -> dict[int, torch.Tensor]:
    table = {1: torch.ones(1, 1, dtype=torch.float64)}
    for q in range(3, limit):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= limit:
            table.setdefault(q + 1, _paley1(q))
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            table.setdefault(2 * (q + 1), _paley2(q))
    for m, h in table.items():  # every construction is checked, not trusted
        assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)), m
    return table


def small_orders() -> list[int]:
    """Orders m of the small Hadamard factors available (1 and Paley orders up to 256)."""
    return sorted(_small_table())


def factor(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and m the smallest available factor; None if
    no Hadamard matrix of order n is known here."""
    for m in small_orders():
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def supported(n: int) -> bool:
    return n >= 1 and factor(n) is not None


def small_matrix(m: int) -> torch.Tensor:
    return _small_table()[m].clone()


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthogonal R = (H_m kron H_p) / sqrt(n) of `qc.hadamard` (y = x R)."""
    fm = factor(n)
    if fm is None:
        raise ValueError(f"no Hadamard matrix of order {n}: sizes are 2^k times one of {small_orders()}")
    m, p = fm
    hp = torch.ones(1, 1, dtype=torch.float64)
    while hp.shape[0] < p:
        hp = torch.cat([torch.cat([hp, hp], 1), torch.cat([hp, -hp], 1)], 0)
    return (torch.kron(_small_table()[m], hp) / math.sqrt(n)).to(dtype)


CHUNK_ELEMENTS = 1 << 17  # rows are transformed in chunks of about this many floats (512 KB) that stay in cache


def _butterflies(t: torch.Tensor, p: int) -> torch.Tensor:
    """Walsh-Hadamard butterflies (a, b) -> (a + b, a - b) along the last dim of (rows, m, p)."""
    h = 1
    while h < p:
        v = t.view(t.shape[0], t.shape[1], p // (2 * h), 2, h)
        out = torch.empty_like(t)
        o = out.view(v.shape)
        torch.add(v[..., 0, :], v[..., 1, :], out=o[..., 0, :])
        torch.sub(v[..., 0, :], v[..., 1, :], out=o[..., 1, :])
        t, h = out, h * 2
    return t


def hadamard_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """y = x R per block of `size` consecutive elements of the last dim (float32 in, out).

    Every float operation is in the order the module docstring fixes; rows are independent,
    so they are done in cache-sized chunks, which changes no result bit."""
    m, p = factor(size)
    flat = x.reshape(-1, m, p)
    out = torch.empty_like(flat)
    hm = small_matrix(m).to(flat.dtype)
    inv = torch.tensor(1.0 / math.sqrt(size), dtype=flat.dtype)
    rows = max(1, CHUNK_ELEMENTS // size)
    for r in range(0, flat.shape[0], rows):
        t = _butterflies(flat[r : r + rows], p)
        if m > 1:  # y[:, c, :] = sum_a H_m[a, c] * t[:, a, :], in order a = 0..m-1 from 0 (H_m is +-1: exact products)
            acc = torch.zeros_like(t)
            for a in range(m):
                acc.addcmul_(hm[a].reshape(1, m, 1), t[:, a : a + 1, :])
            t = acc
        torch.mul(t, inv, out=out[r : r + rows])
    return out.reshape(x.shape)

"""Hadamard matrices (``H H^T = n I``, entries ±1) for the orders lowbit's rotations need.

- Sylvester: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` (orders 2^k; symmetric);
- Paley I for ``q = 11`` (``q ≡ 3 mod 4`` prime): the Jacobsthal matrix ``J_ij = chi(j - i)``
  (``chi`` the quadratic character mod q) and ``S = [[0, 1^T], [-1, J]]`` give ``H_12 = I + S``
  (not symmetric);
- Kronecker products ``H_a ⊗ H_b`` (a Hadamard matrix of order ab): every order ``12^a * 2^k``.
  SmolLM2 needs 576 = 12·12·4 (hidden), 1536 = 12·128 (MLP), 64 = 2^6 (head dim).

``hadamard(n)`` is the orthogonal ``H_n / sqrt(n)``; ``random_hadamard(n, seed)`` is QuaRot's
randomised ``D H_n / sqrt(n)`` with ``D`` a seeded ±1 diagonal. The fast transform ``x @ H`` lives in
:mod:`lowbit.kernels.hadamard`.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import ConfigError

PALEY_Q = 11  # Paley I construction of order q + 1 = 12


def _quadratic_character(q: int) -> list[int]:
    """``chi(a)`` for a in 0..q-1: 0 at 0, +1 on nonzero squares mod q, -1 otherwise (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    return [0 if a == 0 else (1 if a in squares else -1) for a in range(q)]


@functools.lru_cache(maxsize=None)
def paley_hadamard(q: int = PALEY_Q) -> torch.Tensor:
    """Paley I: a ±1 Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    if q % 4 != 3 or any(q % p == 0 for p in range(2, int(q ** 0.5) + 1)):
        raise ConfigError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    chi = _quadratic_character(q)
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            s[1 + i, 1 + j] = chi[(j - i) % q]  # Jacobsthal matrix, skew-symmetric for q = 3 mod 4
    return s + torch.eye(n, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def sylvester_hadamard(n: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def split_order(n: int) -> tuple[int, int]:
    """``n = m * 2^k`` with ``m`` a product of 12s (1, 12, 144, ...): returns ``(m, 2^k)``."""
    if n < 1:
        raise ConfigError(f"Hadamard order must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    m = n // p
    r = m
    while r % 3 == 0 and p % 4 == 0:  # each factor 12 = 3 * 4 takes a 3 and a 4
        r //= 3
        p //= 4
    if r != 1:
        raise ConfigError(f"no Hadamard matrix of order {n} here: orders are 12^a * 2^k (Paley q=11, Sylvester, "
                          "Kronecker products)")
    return n // p, p


@functools.lru_cache(maxsize=None)
def small_factor(m: int) -> torch.Tensor:
    """±1 Hadamard of order ``m = 12^a`` as a Kronecker power of Paley's H_12."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.kron(h, paley_hadamard())
    return h


@functools.lru_cache(maxsize=None)
def hadamard_pm1(n: int) -> torch.Tensor:
    """±1 Hadamard matrix of order ``n = m * 2^k``: ``H_m ⊗ H_{2^k}`` (float64, ``H H^T = n I``)."""
    m, p = split_order(n)
    return torch.kron(small_factor(m), sylvester_hadamard(p))


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonal Hadamard ``H_n / sqrt(n)``."""
    return (hadamard_pm1(n) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomised Hadamard ``Q = D H_n / sqrt(n)``, ``D`` a ±1 diagonal drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_pm1(n) / math.sqrt(n)).to(dtype)


__all__ = ["PALEY_Q", "paley_hadamard", "sylvester_hadamard", "split_order", "small_factor", "hadamard_pm1",
           "hadamard", "random_hadamard"]

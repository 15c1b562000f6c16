"""A seeded pseudo-random permutation of 0..n-1 computed per index, in O(1) memory.

A global shuffle of every sequence of a 600B-token corpus would be an array of hundreds of
millions of indices to build, store and reload. A small Feistel network over the next power of
two, with cycle-walking back into [0, n), is a bijection on [0, n) that maps any position to its
sequence independently: no state beyond (n, seed), the same on every rank and worker.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_MULTIPLIER = np.uint64(0x9E3779B1)


class Permutation:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng([seed, n]).integers(0, 2**32, size=_ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        x = (right ^ key) * _MULTIPLIER
        x ^= x >> np.uint64(16)
        x = x * _MULTIPLIER
        x ^= x >> np.uint64(13)
        return x & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << shift) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.atleast_1d(np.asarray(index, dtype=np.uint64))
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} out of range for a permutation of {self.n}")
        with np.errstate(over="ignore"):
            y = self._feistel(x)
            outside = y >= self.n
            while outside.any():  # cycle-walk: at most a few steps, the domain is < 4n
                y[outside] = self._feistel(y[outside])
                outside = y >= self.n
        return y.astype(np.int64)

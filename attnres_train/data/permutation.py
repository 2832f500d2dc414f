"""A seeded pseudo-random permutation of ``[0, n)`` evaluated index by index, in O(1) memory.

An epoch of a large corpus visits every packed window once in a shuffled order. Materialising that order
(``rng.permutation(n)``) costs 8 bytes per window on every rank and a pass over all of them at start-up:
200 MB and a second per rank for 100B tokens at 4K context, growing with the corpus. A keyed bijection
computes the ``i``-th element directly, so memory and start-up stay constant and resuming at any position is
arithmetic.

Construction: a balanced Feistel network on ``2h`` bits (``4**h >= n``) is a bijection of ``[0, 4**h)`` for
any round function; "cycle walking" (re-encrypting values that land outside ``[0, n)``) turns it into a
bijection of ``[0, n)``. Since ``4**h < 4n``, the expected number of walks per index is below 4. The round
function is the splitmix64 finaliser of the half-block xor a round key, a strong 64-bit mixer.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """``perm(i)`` for arrays of indices ``i`` in ``[0, n)``: a bijection of ``[0, n)`` chosen by ``key``.

    ``key`` is any sequence of non-negative ints (e.g. ``(seed, source, epoch)``); equal keys give equal
    permutations on every machine (only integer arithmetic is involved).
    """

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 0:
            raise ValueError(f"n={n}: expected >= 0")
        self.n = int(n)
        self.half_bits = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(_ROUNDS, dtype=np.uint64)
        self._round_keys = [np.uint64(k) for k in state]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self._mask
        for round_key in self._round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self._mask)
        return (left << shift) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"permutation of [0, {self.n}) indexed outside its range")
        if self.n <= 1:
            return index.copy()
        with np.errstate(over="ignore"):  # uint64 products wrap around by design
            out = self._encrypt(index.astype(np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)

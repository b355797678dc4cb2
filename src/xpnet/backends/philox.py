"""Philox4x32-10, the counter-based generator every backend draws dropout's masks from.

A counter-based generator is a pure function: four 32-bit counter words and a two-word key give
four random 32-bit words (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as
1, 2, 3", SC 2011; Random123's philox4x32_R with R = 10, the generator of cuRAND's Philox and
of PyTorch's CUDA dropout). So a draw is a function of where it sits in a run, not of what was
drawn before: NumPy, Numba and CUDA compute the same bits with no state to carry, resume from
any step, and let `xpnet verify` compare masks across backends. This module is the NumPy
reference; numba_kernels.philox and cupy_backend's PHILOX are the same rounds, word for word.

Where a draw sits (Draw): the key is the run's seed (its low and high 32 bits); the counter is
(element // 4, step within the epoch, layer, epoch), and element % 4 picks the word.
"""

from typing import NamedTuple

import numpy

from xpnet.errors import ArgumentError

# The round's multipliers and the key's increments (Weyl sequence), as Random123 defines them.
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
# A counter's first word numbers blocks of four elements: an array holds at most this many.
MAX_ELEMENTS = 4 << 32


class Draw(NamedTuple):
    """Where one array of random words sits in a training run: the run's seed (the key, below
    2**64), and the epoch, step within it and layer (three counter words, each below 2**32)."""

    seed: int
    epoch: int
    step: int
    layer: int = 0

    def key(self):
        """The key's two words: the seed's low and high 32 bits."""
        return self.seed & MASK32, self.seed >> 32

    def check(self):
        """self, if every field fits its word(s); else ArgumentError naming the field."""
        for name, value in self._asdict().items():
            bits = 64 if name == "seed" else 32
            if not (isinstance(value, (int, numpy.integer)) and 0 <= value < 2**bits):
                raise ArgumentError(f"a draw's {name} must be an integer in [0, 2**{bits}), got {value!r}")
        return self


def philox4x32(counters, key):
    """The four words of Philox4x32-10 for each counter: counters is (4, n) integers below 2**32,
    key two of them; returns (4, n) uint32. Products are taken in uint64 (exact below 2**64):
    the high word is the product's top 32 bits, the low word its bottom 32."""
    c0, c1, c2, c3 = (numpy.asarray(word, numpy.uint64) & numpy.uint64(MASK32) for word in counters)
    k0, k1 = (int(word) & MASK32 for word in key)
    for round_number in range(ROUNDS):
        if round_number:  # the key is bumped before every round but the first
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = c0 * numpy.uint64(M0), c2 * numpy.uint64(M1)
        c0, c1, c2, c3 = (
            (p1 >> numpy.uint64(32)) ^ c1 ^ numpy.uint64(k0),
            p1 & numpy.uint64(MASK32),
            (p0 >> numpy.uint64(32)) ^ c3 ^ numpy.uint64(k1),
            p0 & numpy.uint64(MASK32),
        )
    return numpy.stack([c0, c1, c2, c3]).astype(numpy.uint32)


def words(draw, size):
    """The draw's first `size` random words, element e's at e: e // 4 counts the counter, e % 4
    picks its word."""
    blocks = numpy.arange(-(-size // 4), dtype=numpy.uint64)
    counters = (
        blocks,
        *(numpy.full(len(blocks), value, numpy.uint64) for value in (draw.step, draw.layer, draw.epoch)),
    )
    return philox4x32(counters, draw.key()).T.reshape(-1)[:size]


def keep_threshold(p):
    """The smallest word that keeps an element when each is dropped with probability p: a word
    below floor(p * 2**32) drops it (p * 2**32 is exact in float64), so an element is dropped
    with probability within 2**-32 below p."""
    return int(p * 2.0**32)


def keep_scale(p, dtype):
    """What a kept element is multiplied by (inverted dropout: the expectation is unchanged),
    1 / (1 - p) rounded once to dtype."""
    return numpy.dtype(dtype).type(1.0 / (1.0 - p))

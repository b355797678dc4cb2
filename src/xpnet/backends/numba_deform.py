"""Numba's deformation kernel: deform.py's reference, image by image, in parallel over images.

Every float64 quantity is computed in the reference's order, without fast-math, so the CPU
backends give the same bits. Unlike numba_kernels, this kernel runs on Numba's threads: the
trainer calls it once at an epoch's start, before any product, so no BLAS thread competes.
"""

import math

import numpy
from numba import prange

from xpnet.backends import numba_kernels
from xpnet.backends.deform import AFFINE_WORDS, DEFORM_STREAM
from xpnet.backends.numba_kernels import kernel

WORD_SCALE = 2.0**-23
STREAM = numpy.uint64(DEFORM_STREAM)
EIGHT = numpy.uint64(8)


@kernel
def symmetric(word):
    """A word's top 24 bits over 2**23, less 1: uniform in [-1, 1), as deform.symmetric."""
    return float(word >> EIGHT) * WORD_SCALE - 1.0


@kernel
def smooth(field, weights, side):
    """deform.smooth: the taps along rows, then along columns, zero beyond the edges. Each sum
    takes its taps in the reference's order; the loops run over a row's elements innermost, so
    that they vectorise."""
    radius = len(weights) // 2
    padded = numpy.zeros((side, side + 2 * radius))
    padded[:, radius : radius + side] = field
    rows = numpy.zeros((side + 2 * radius, side))
    for r in range(side):
        for k in range(len(weights)):
            for j in range(side):
                rows[radius + r, j] += weights[k] * padded[r, k + j]
    out = numpy.zeros((side, side))
    for r in range(side):
        for k in range(len(weights)):
            for j in range(side):
                out[r, j] += weights[k] * rows[r + k, j]
    return out


@kernel
def read(image, row, column, side, background):
    return image[row * side + column] if 0 <= row < side and 0 <= column < side else background


@kernel(parallel=True)
def deform_rows(source, rows, side, ranges, weights, seed_words, epoch, background, out):
    """out[i] = source[rows[i]] deformed, as deform.deform; ranges = (angle in radians, scale,
    shear, shift in pixels, alpha), weights the Gaussian's taps (alpha 0: no elastic field)."""
    angle_range, scale_range, shear_range, shift_range, alpha = ranges
    k0, k1 = seed_words
    centre = (side - 1) / 2
    n = side * side
    for i in prange(len(rows)):
        index = numpy.uint64(rows[i])
        first = numba_kernels.philox(numpy.uint64(0), index, STREAM, epoch, k0, k1)
        second = numba_kernels.philox(numpy.uint64(1), index, STREAM, epoch, k0, k1)
        angle = angle_range * symmetric(first[0])
        scale_x, scale_y = 1.0 + scale_range * symmetric(first[1]), 1.0 + scale_range * symmetric(first[2])
        shear = shear_range * symmetric(first[3])
        shift_x, shift_y = shift_range * symmetric(second[0]), shift_range * symmetric(second[1])
        cos, sin = math.cos(angle), math.sin(angle)
        dx = dy = numpy.zeros((1, 1))  # unread without an elastic field
        if alpha != 0:
            fields = numpy.empty((2, side, side))
            for e in range(0, 2 * n, 4):
                words = numba_kernels.philox(numpy.uint64((AFFINE_WORDS + e) // 4), index, STREAM, epoch, k0, k1)
                for lane in range(min(4, 2 * n - e)):
                    k = e + lane
                    fields[k // n, (k % n) // side, k % side] = symmetric(words[lane])
            dx, dy = smooth(fields[0], weights, side), smooth(fields[1], weights, side)
        image = source[rows[i]]
        for r in range(side):
            for j in range(side):
                v, u = r - centre, j - centre
                a, b = (u + shear * v) * scale_x, v * scale_y
                x = (cos * a - sin * b) + (centre + shift_x)
                y = (sin * a + cos * b) + (centre + shift_y)
                if alpha != 0:
                    x = x + alpha * dx[r, j]
                    y = y + alpha * dy[r, j]
                x0, y0 = math.floor(x), math.floor(y)
                fx, fy = x - x0, y - y0
                c0, r0 = int(x0), int(y0)
                top = (1 - fx) * read(image, r0, c0, side, background) + fx * read(image, r0, c0 + 1, side, background)
                bottom = (1 - fx) * read(image, r0 + 1, c0, side, background) + fx * read(
                    image, r0 + 1, c0 + 1, side, background
                )
                out[i, r * side + j] = (1 - fy) * top + fy * bottom

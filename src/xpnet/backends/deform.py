"""Deformations drawn afresh for every training image in every epoch: the NumPy reference.

Each output pixel reads the source image at a displaced point, by bilinear interpolation, with
the background (the normalised value of a blank pixel) outside the image. The displacement is
an affine map about the image's centre (rotation, scaling per axis, horizontal shear,
translation) plus an elastic field (Simard, Steinkraus and Platt, ICDAR 2003): a uniform random
displacement in [-1, 1) per pixel and axis, smoothed by a Gaussian of width sigma (zero beyond
the image, truncated at 4 sigma) and scaled by alpha. Every quantity is a float64 computed in
the order written here; numba_deform.py and cupy_deform.py compute the same, image by image.

Random numbers come from Philox (philox.py) at Draw(seed, epoch, image index, DEFORM_STREAM):
word 0 to 5 the affine parameters, then the x field's words and the y field's. So an image is
deformed the same way on every backend, whatever batch it falls in, and a resumed run deforms
it as the uninterrupted run would have.
"""

import math
from typing import NamedTuple

import numpy

import xpnet.backends.philox as philox
from xpnet.errors import ArgumentError

# The draw's layer word for deformations: above any dropout layer's number.
DEFORM_STREAM = 1 << 31
MAX_SIDE = 32  # the largest square image the kernels deform (the GPU's holds its fields in shared memory)
AFFINE_WORDS = 8  # six parameters, in two counters
TRUNCATE = 4.0  # the Gaussian's radius in widths (scipy.ndimage.gaussian_filter's default)


# Each range's bounds: a scale below 1 keeps 1 - scale positive; sigma up to an image's side.
LIMITS = {
    "rotation": (0, 180),
    "scale": (0, 0.9),
    "shear": (0, 60),
    "translation": (0, 0.5),
    "sigma": (0, 28),
    "alpha": (0, 1000),
}


class Deformation(NamedTuple):
    """The deformations' ranges: each affine parameter is drawn uniformly from [-range, range)
    (rotation and horizontal shear in degrees, as Cireşan et al. give them; scaling per axis
    and translation as fractions, of 1 and of the side), and the elastic field has width sigma
    and scale alpha, in pixels (alpha 0: none)."""

    rotation: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    translation: float = 0.0
    sigma: float = 0.0
    alpha: float = 0.0

    def problem(self):
        """What makes these ranges unusable, or None."""
        for name, value in self._asdict().items():
            low, high = LIMITS[name]
            if not (isinstance(value, (int, float)) and low <= value <= high):
                return f"the deformation's {name} must be a number in [{low}, {high}], got {value!r}"
        if self.alpha and not self.sigma:
            return "an elastic deformation (alpha above 0) needs a sigma above 0, e.g. 4 (Simard's)"
        return None

    def check(self):
        problem = self.problem()
        if problem is not None:
            raise ArgumentError(problem)
        return self


def gaussian_weights(sigma):
    """The smoothing kernel's taps from -radius to radius, exp(-k^2 / (2 sigma^2)) over their sum,
    in float64; [1] for sigma 0."""
    radius = int(math.ceil(TRUNCATE * sigma)) if sigma > 0 else 0
    taps = numpy.exp(-0.5 * (numpy.arange(-radius, radius + 1) / sigma) ** 2) if sigma > 0 else numpy.ones(1)
    return taps / taps.sum()


def symmetric(words):
    """Uniform numbers in [-1, 1) from words: the top 24 bits over 2**23, less 1 (exact in float64)."""
    return (words >> numpy.uint32(8)).astype(numpy.float64) * 2.0**-23 - 1.0


def smooth(field, weights):
    """field convolved with the taps along rows, then along columns, zero beyond the edges."""
    radius, side = len(weights) // 2, field.shape[0]
    padded = numpy.zeros((side, side + 2 * radius))
    padded[:, radius : radius + side] = field
    rows = sum(weights[k] * padded[:, k : k + side] for k in range(len(weights)))
    padded = numpy.zeros((side + 2 * radius, side))
    padded[radius : radius + side] = rows
    return sum(weights[k] * padded[k : k + side] for k in range(len(weights)))


class Ranges(NamedTuple):
    """A Deformation as the kernels take it, for images of a side: float64s in their units."""

    angle: float  # radians
    scale: float
    shear: float  # the tangent of the shear angle: horizontal shift per row
    shift: float  # pixels
    alpha: float  # 0 where there is no elastic field


def kernel_ranges(spec, side):
    """The Ranges every backend's kernel reads, computed once on the host."""
    shear = math.tan(math.radians(spec.shear))
    ranges = (math.radians(spec.rotation), spec.scale, shear, spec.translation * side, spec.alpha)
    return Ranges(*map(float, ranges))  # floats all: a kernel is compiled again for each type


def source_points(spec, words, side):
    """(x, y): where each output pixel (row i, column j) reads the source, for one image's words."""
    s, ranges = symmetric(words[:AFFINE_WORDS]), kernel_ranges(spec, side)
    angle = ranges.angle * s[0]
    scale_x, scale_y = 1.0 + ranges.scale * s[1], 1.0 + ranges.scale * s[2]
    shear = ranges.shear * s[3]
    shift_x, shift_y = ranges.shift * s[4], ranges.shift * s[5]
    centre = (side - 1) / 2
    v, u = numpy.mgrid[0:side, 0:side].astype(numpy.float64) - centre
    a, b = (u + shear * v) * scale_x, v * scale_y
    cos, sin = math.cos(angle), math.sin(angle)
    x = (cos * a - sin * b) + (centre + shift_x)
    y = (sin * a + cos * b) + (centre + shift_y)
    if ranges.alpha:
        n, weights = side * side, gaussian_weights(spec.sigma)
        fields = symmetric(words[AFFINE_WORDS : AFFINE_WORDS + 2 * n]).reshape(2, side, side)
        x = x + ranges.alpha * smooth(fields[0], weights)
        y = y + ranges.alpha * smooth(fields[1], weights)
    return x, y


def bilinear(image, x, y, background):
    """image read at (x, y) (columns, rows) by bilinear interpolation, background outside it."""
    side = image.shape[0]
    x0, y0 = numpy.floor(x), numpy.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(numpy.int64), y0.astype(numpy.int64)

    def pixel(row, column):
        inside = (row >= 0) & (row < side) & (column >= 0) & (column < side)
        return numpy.where(inside, image[row.clip(0, side - 1), column.clip(0, side - 1)], background)

    top = (1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1)
    bottom = (1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)
    return (1 - fy) * top + fy * bottom


def words_needed(spec, side):
    """How many Philox words one image's deformation reads."""
    return AFFINE_WORDS + (2 * side * side if spec.alpha else 0)


def deform(image, spec, seed, epoch, index, background):
    """One image (side x side, any float or integer type) deformed as the index-th training image
    in this epoch: float64, its pixels where the source is read (bilinear, background outside)."""
    side = image.shape[0]
    draw = philox.Draw(seed, epoch, index, DEFORM_STREAM)
    x, y = source_points(spec, philox.words(draw, words_needed(spec, side)), side)
    return bilinear(image.astype(numpy.float64), x, y, background)


def error_bound(dtype, reference, images, background, spec):
    """How far a backend's deformed rows may lie from the float64 reference's (rows, shaped like
    reference), element by element, for source images (rows) and their background: the final
    rounding to dtype, eps * |reference|, plus what float64 arithmetic may move. A source point
    passes through at most 16 roundings, and sin and cos are within 2 ulp (libm, CUDA), each
    relative to its coordinate's size, at most side * (1 + translation) + alpha (the smoothed
    fields lie within [-1, 1]). The bilinear read moves by at most twice the largest step between
    neighbours (a pixel and the background included) per unit moved, and rounds 6 times, each
    relative to the largest value."""
    eps64 = numpy.finfo(numpy.float64).eps
    side = math.isqrt(numpy.shape(images)[-1])
    values = numpy.asarray(images, numpy.float64).reshape(-1, side, side)
    steps = max(numpy.abs(numpy.diff(values, axis=axis)).max(initial=0.0) for axis in (1, 2))
    steps = max(steps, numpy.abs(values - background).max(initial=0.0))
    largest = max(numpy.abs(values).max(initial=0.0), abs(background))
    coordinate = side * (1 + spec.translation) + spec.alpha
    moved = 2 * steps * 16 * eps64 * coordinate + 6 * eps64 * largest
    return numpy.finfo(dtype).eps * numpy.abs(reference) + moved

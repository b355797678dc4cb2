"""Deformations (backends/deform.py): the reference against SciPy's independent Gaussian filter
and bilinear interpolation, known moves, every backend against the reference within the derived
bound, draws that depend on (seed, epoch, image) alone, and the settings' checks."""

import dataclasses
import math
import re

import numpy
import pytest

import xpnet
from xpnet.backends import deform, get_backend, philox
from xpnet.backends.deform import Deformation
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import ArgumentError, ConfigError

ndimage = pytest.importorskip("scipy.ndimage", reason="SciPy is the tests' independent reference (pip install scipy)")

SIDE = 28
AFFINE = Deformation(rotation=15, scale=0.15, shear=15, translation=0.1)
ELASTIC = Deformation(sigma=4, alpha=34)
BOTH = Deformation(rotation=15, scale=0.2, shear=15, translation=0.05, sigma=6, alpha=36)
SPECS = {"affine": AFFINE, "elastic": ELASTIC, "both": BOTH}


def digits(n=6, seed=0):
    """Blurred blobs on a blank background, as handwriting looks: smooth strokes, sharp edges."""
    rng = numpy.random.default_rng(seed)
    images = numpy.zeros((n, SIDE, SIDE))
    for image in images:
        rows, columns = rng.integers(6, 22, 12), rng.integers(6, 22, 12)
        image[rows, columns] = 255
    return ndimage.gaussian_filter(images, (0, 1, 1)) * 4


def scipy_deform(image, spec, seed, epoch, index, background):
    """The deformation from its description with SciPy: the affine map as a matrix, the fields by
    gaussian_filter (zero outside, 4 widths), the read by map_coordinates (order 1, background
    beyond the edges)."""
    words = philox.words(philox.Draw(seed, epoch, index, deform.DEFORM_STREAM), deform.words_needed(spec, SIDE))
    s = (words >> 8).astype(numpy.float64) / 2**23 - 1
    angle = math.radians(spec.rotation) * s[0]
    rotate = numpy.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = numpy.diag([1 + spec.scale * s[1], 1 + spec.scale * s[2]])
    shear = numpy.array([[1, math.tan(math.radians(spec.shear)) * s[3]], [0, 1]])
    centre = (SIDE - 1) / 2
    rows, columns = numpy.mgrid[0:SIDE, 0:SIDE] - centre
    x, y = numpy.einsum("ij,jrc->irc", rotate @ scale @ shear, numpy.stack([columns, rows]))
    x, y = x + centre + spec.translation * SIDE * s[4], y + centre + spec.translation * SIDE * s[5]
    if spec.alpha:
        fields = s[8:].reshape(2, SIDE, SIDE)
        smooth = [ndimage.gaussian_filter(f, spec.sigma, mode="constant", cval=0.0, truncate=4.0) for f in fields]
        x, y = x + spec.alpha * smooth[0], y + spec.alpha * smooth[1]
    return ndimage.map_coordinates(image, [y, x], order=1, mode="grid-constant", cval=background)


@pytest.mark.parametrize("name", SPECS)
def test_the_reference_is_the_deformation_scipy_computes(name):
    images, background = digits(), -0.4
    for index, image in enumerate(images):
        got = deform.deform(image, SPECS[name], 7, 3, index, background)
        expected = scipy_deform(image, SPECS[name], 7, 3, index, background)
        numpy.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * 1020)
        assert not numpy.allclose(got, image, atol=1)  # something moved


def test_no_deformation_gives_every_image_back_exactly(backend):
    for dtype in ("float32", "float64"):
        images = digits().reshape(6, -1).astype(dtype)
        rows = numpy.array([4, 0, 5, 5])
        got = backend.deform_rows(backend.asarray(images), backend.asarray(rows), Deformation(), 1, 0, -0.4)
        assert numpy.array_equal(backend.to_numpy(got), images[rows])


def test_a_quarter_turn_moves_each_pixel_where_it_should():
    """Words whose top bits are 0 draw -1 for each range: a rotation range of 90 degrees turns by
    -90, and output pixel (r, j) reads the source at row 27 - j, column r."""
    image, words = digits(1)[0], numpy.zeros(deform.AFFINE_WORDS, numpy.uint32)
    x, y = deform.source_points(Deformation(rotation=90), words, SIDE)
    got = deform.bilinear(image, x, y, background=0.0)
    expected = numpy.array([[image[SIDE - 1 - j, r] for j in range(SIDE)] for r in range(SIDE)])
    numpy.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * image.max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SPECS)
def test_every_backend_deforms_as_the_reference_within_the_bound(backend, name, dtype):
    images, rows, background = digits(8).reshape(8, -1).astype(dtype), numpy.array([7, 2, 2, 0, 5]), -0.4
    spec = SPECS[name]
    got = backend.to_numpy(backend.deform_rows(backend.asarray(images), backend.asarray(rows), spec, 11, 4, background))
    reference = numpy.array([deform.deform(images[r].reshape(SIDE, SIDE), spec, 11, 4, r, background) for r in rows])
    reference = reference.reshape(len(rows), -1)
    bound = deform.error_bound(dtype, reference, images, background, spec)
    assert got.dtype == dtype and numpy.all(numpy.abs(got - reference) <= bound)
    assert numpy.array_equal(got[1], got[2])  # one image, one epoch: one deformation


def test_an_images_draws_depend_on_the_seed_epoch_and_image_only():
    numba, images = get_backend("numba"), digits(6).reshape(6, -1)

    def deformed(rows, seed=3, epoch=1):
        return numba.deform_rows(images, numpy.array(rows), BOTH, seed, epoch, 0.0)

    assert numpy.array_equal(deformed([5, 1])[0], deformed([2, 3, 5])[2])  # wherever it sits in a batch
    assert numpy.array_equal(deformed([5, 1]), deformed([5, 1]))
    for other in (deformed([5, 1], seed=4), deformed([5, 1], epoch=2)):
        assert not numpy.allclose(other, deformed([5, 1]))


def test_each_epoch_trains_on_its_own_deformed_images_on_numpy_and_numbas_compiled_loop():
    config = xpnet.TrainConfig(batch_size=32, hidden=(16,), lr=0.05, dtype="float64", augment="affine,elastic")
    data = synthetic_splits(n_train=300)
    numba, numpy_run = xpnet.Trainer("numba", data, config, compiled=True), xpnet.Trainer("numpy", data, config)
    assert numba.compiled_steps is not None
    assert numpy_run.epoch_x is None  # the reference loop deforms each batch's rows, not the whole set
    numpy.testing.assert_allclose(numba.run_steps(3), numpy_run.run_steps(3), rtol=1e-9, atol=0)
    x = numba.batch(3)[0].copy()
    assert numpy.array_equal(x, numpy_run.batch(3)[0])  # the same images, deformed the same way
    assert not numpy.allclose(x, numba.train_x[numba.rows(3)])  # and deformed
    first = numba.epoch_x.copy()
    numba.run_steps()  # the rest of the epoch: the next one deforms afresh
    numba.run_steps(1)
    assert not numpy.allclose(first, numba.epoch_x)


def test_the_config_draws_each_augmentation_with_its_own_ranges():
    config = xpnet.TrainConfig(augment="affine", rotation=10, scaling=0.2, shear=5, translation=0.1)
    assert config.deformation() == Deformation(rotation=10, scale=0.2, shear=5, translation=0.1)
    elastic = dataclasses.replace(config, augment="elastic", elastic_sigma=6.0, elastic_alpha=36.0)
    assert elastic.deformation() == Deformation(sigma=6.0, alpha=36.0)
    assert xpnet.TrainConfig().deformation() is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rotation": 400.0}, "rotation must be a number in [0, 180], got 400.0"),
        ({"elastic_sigma": -1.0}, "elastic_sigma must be a number in [0, 28], got -1.0"),
        ({"scaling": 1.0}, "scaling must be a number in [0, 0.9], got 1.0"),
        ({"augment": "elastic", "elastic_alpha": 0.0}, "an elastic deformation needs elastic_sigma and elastic_alpha"),
        ({"augment": "rotate"}, "augment must be one of 'none', 'affine', 'elastic', 'affine,elastic'"),
    ],
)
def test_unusable_deformation_settings_are_one_line_before_any_work(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        xpnet.TrainConfig(**settings)


def test_bad_deformation_arguments_are_refused_alike_on_every_backend(backend):
    images = backend.asarray(numpy.zeros((4, 784), numpy.float32))
    rows = backend.asarray(numpy.array([0, 1]))
    with pytest.raises(ArgumentError, match=re.escape("deformations take square images of at most 32x32")):
        backend.deform_rows(backend.asarray(numpy.zeros((4, 30), numpy.float32)), rows, AFFINE, 0, 0, 0.0)
    with pytest.raises(ArgumentError, match=re.escape("the deformation's rotation must be a number in [0, 180]")):
        backend.deform_rows(images, rows, Deformation(rotation=400), 0, 0, 0.0)
    with pytest.raises(ArgumentError, match="spec must be a deform.Deformation"):
        backend.deform_rows(images, rows, (15, 0, 0, 0, 0, 0), 0, 0, 0.0)
    with pytest.raises(ArgumentError, match=re.escape("rows must lie in [0, 4)")):
        backend.to_numpy(backend.deform_rows(images, backend.asarray(numpy.array([0, 4])), AFFINE, 0, 0, 0.0))

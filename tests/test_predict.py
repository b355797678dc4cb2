"""`xpnet predict` on real test digits written out as image files, as a user would have them."""

import struct
import subprocess
import sys
import zlib

import numpy
import pytest

Image = pytest.importorskip("PIL.Image", reason="predict needs Pillow (the test extras install it)")

from xpnet.data.images import mnist_like  # noqa: E402
from xpnet.nn.model import load_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(mnist_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "model.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xpnet",
            "train",
            "--backend",
            "numba",
            "--epochs",
            "3",
            "--save",
            str(path),
            "--data-dir",
            str(mnist_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return path


def confident_digits(checkpoint, mnist_splits, count=6):
    """Test digits the model gets right with probability > 0.99 as they are stored."""
    probabilities = load_model(checkpoint, "numpy").predict_proba(mnist_splits.test.images[:200])
    good = [
        i
        for i in range(200)
        if probabilities[i].argmax() == mnist_splits.test.labels[i] and probabilities[i].max() > 0.99
    ]
    return good[:count]


def write_as_user_image(image, path, variant):
    """Plain; black on white and 4x larger; on a wider light canvas, as a phone photo might be."""
    picture = Image.fromarray(image)
    if variant == "inverted-large":
        picture = Image.fromarray(255 - image).resize((112, 112), Image.BICUBIC)
    if variant == "light-canvas":
        canvas = Image.new("L", (90, 60), color=230)
        canvas.paste(Image.fromarray(255 - image).resize((42, 42)), (30, 8))
        picture = canvas
    picture.save(path)


def test_predict_reads_real_digits_back(checkpoint, mnist_splits, tmp_path):
    paths, labels = [], []
    variants = ["plain", "inverted-large", "light-canvas"]
    for k, index in enumerate(confident_digits(checkpoint, mnist_splits)):
        path = tmp_path / f"digit{index}.png"
        write_as_user_image(mnist_splits.test.images[index], path, variants[k % 3])
        paths.append(str(path))
        labels.append(int(mnist_splits.test.labels[index]))
    assert len(paths) == 6
    result = subprocess.run(
        [sys.executable, "-m", "xpnet", "predict", "--checkpoint", str(checkpoint), *paths],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    predicted = [int(line.split(": ")[1].split()[0]) for line in result.stdout.strip().splitlines()]
    assert predicted == labels
    assert all(line.count(":") == 4 for line in result.stdout.strip().splitlines())  # path and top three


def test_preprocessing_centres_the_digit_like_mnist(mnist_splits, tmp_path):
    original = mnist_splits.test.images[0]
    path = tmp_path / "zero.png"
    write_as_user_image(original, path, "inverted-large")
    frame = mnist_like(path).astype(numpy.float64)
    assert frame.shape == (28, 28)
    rows, cols = numpy.nonzero(frame > 0.15 * frame.max())
    assert max(numpy.ptp(rows), numpy.ptp(cols)) + 1 == 20  # the longer side is 20 pixels, as in MNIST
    centre = [numpy.average(numpy.indices(frame.shape)[axis], weights=frame) for axis in (0, 1)]
    assert centre == pytest.approx([14, 14], abs=1.0)


def float_tiff_with_nan(path):
    """A float TIFF of a bright square with a patch of NaN in one corner (64 pixels)."""
    from PIL import Image

    pixels = numpy.zeros((28, 28), numpy.float32)
    pixels[8:20, 8:20] = 1.0
    pixels[:8, :8] = numpy.nan
    Image.fromarray(pixels, mode="F").save(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, not an image\n", "not an image Pillow can read"),
        (None, "file not found"),
        (float_tiff_with_nan, "64 of its 784 pixels are NaN or infinite; fill or crop them"),
    ],
    ids=["not-an-image", "missing", "float-with-nan"],
)
def test_bad_image_files_are_one_line_errors(checkpoint, tmp_path, content, message):
    path = tmp_path / ("digit.tiff" if callable(content) else "digit.png")
    if callable(content):
        content(path)
    elif content is not None:
        path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "xpnet", "predict", "--checkpoint", str(checkpoint), str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def photographed(digit, variant, rng):
    """A 28 x 28 MNIST digit as people have digits: (the image, Pillow's save options, suffix)."""
    big = Image.fromarray(255 - digit).resize((112, 112), Image.BICUBIC)  # dark ink on white, 4x
    if variant == "exif-rotated-jpeg":  # stored turned, with EXIF orientation 6 saying how to turn it back
        exif = Image.Exif()
        exif[0x0112] = 6
        return big.rotate(90, expand=True).convert("RGB"), {"exif": exif.tobytes(), "quality": 95}, ".jpg"
    if variant == "16-bit-png":
        return Image.fromarray((numpy.asarray(big, numpy.float64) * 257).astype(numpy.uint16)), {}, ".png"
    if variant in ("rgba-on-clear-black", "rgba-on-clear-white"):  # black ink, the paper fully transparent
        pixels = numpy.zeros((112, 112, 4), numpy.uint8)
        pixels[..., 3] = 255 - numpy.asarray(big)
        pixels[..., :3] = numpy.where(pixels[..., 3:] > 0, 0, 0 if variant.endswith("black") else 255)
        return Image.fromarray(pixels, "RGBA"), {}, ".png"
    if variant == "float-tiff":  # white on black, floats in [0, 1]
        return Image.fromarray((digit / 255).astype(numpy.float32)), {}, ".tif"
    assert variant == "grey-paper-photo"  # grey paper lit from one side, sensor noise, a dark pen
    rows, cols = numpy.mgrid[0:300, 0:400]
    page = 150 + 70 * cols / 400 + 20 * rows / 300 + rng.normal(0, 6, (300, 400))
    pen = numpy.asarray(Image.fromarray(digit).resize((160, 160), Image.BICUBIC), numpy.float64) / 255
    page[70:230, 90:250] *= 1 - 0.8 * pen
    return Image.fromarray(numpy.clip(page, 0, 255).astype(numpy.uint8)), {}, ".png"


VARIANTS = ["exif-rotated-jpeg", "16-bit-png", "rgba-on-clear-black", "rgba-on-clear-white", "float-tiff",
            "grey-paper-photo"]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_reads_each_kind_of_image_as_its_digit(checkpoint, mnist_splits, tmp_path, variant):
    rng = numpy.random.default_rng(0)
    indices = confident_digits(checkpoint, mnist_splits)
    paths = []
    for index in indices:
        picture, options, suffix = photographed(mnist_splits.test.images[index], variant, rng)
        paths.append(tmp_path / f"digit{index}{suffix}")
        picture.save(paths[-1], **options)
    model = load_model(checkpoint, "numpy")
    predicted = [model.predict(mnist_like(path)) for path in paths]
    assert predicted == [int(mnist_splits.test.labels[i]) for i in indices]


def test_one_bad_image_among_several_is_reported_and_the_others_still_read(checkpoint, mnist_splits, tmp_path):
    index = confident_digits(checkpoint, mnist_splits)[0]
    good = tmp_path / "good.png"
    Image.fromarray(mnist_splits.test.images[index]).save(good)
    broken, blank = tmp_path / "broken.png", tmp_path / "blank.png"
    broken.write_bytes(b"\x89PNG not really")
    Image.new("L", (50, 50), color=255).save(blank)
    huge = tmp_path / "huge.png"  # a header declaring 20000 x 20000 pixels: Pillow refuses it unread
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 1, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    result = subprocess.run(
        [sys.executable, "-m", "xpnet", "predict", "--checkpoint", str(checkpoint), str(broken), str(good), str(blank),
         str(huge)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.startswith(f"{good}: {mnist_splits.test.labels[index]}  (")
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3
    assert f"{broken}: not an image Pillow can read" in errors[0]
    assert f"{blank}: the image is blank" in errors[1]
    assert f"{huge}: too many pixels for a picture of one digit" in errors[2] and "scale it down" in errors[2]

"""`xpnet predict` on real test digits written out as image files, as a user would have them."""

import subprocess
import sys

import numpy
import pytest

Image = pytest.importorskip("PIL.Image", reason="predict needs Pillow (the test extras install it)")

from xpnet.data.images import mnist_like  # noqa: E402
from xpnet.nn.checkpoint import load_model  # noqa: E402


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


@pytest.mark.parametrize(
    "content, message", [(b"hello, not an image\n", "not an image Pillow can read"), (None, "file not found")]
)
def test_bad_image_files_are_one_line_errors(checkpoint, tmp_path, content, message):
    path = tmp_path / "digit.png"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "xpnet", "predict", "--checkpoint", str(checkpoint), str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]

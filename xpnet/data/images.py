"""Turning an arbitrary image of a digit into an MNIST-like 28x28 one.

MNIST's digits are white on black, scaled so the longer side of the digit's bounding box
is 20 pixels (aspect kept), and placed in a 28x28 frame with their centre of mass at the
centre. This does the same to any grayscale or colour image Pillow can read.
"""

import numpy

from xpnet.errors import DataError

DIGIT_SIZE, FRAME_SIZE = 20, 28
INK = 0.15  # a pixel is part of the digit above this fraction of the darkest-to-brightest range


def mnist_like(path):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'xpnet[images]'") from None
    try:
        with Image.open(path) as image:
            pixels = numpy.asarray(image.convert("L"), dtype=numpy.float64)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not an image Pillow can read ({exc.__class__.__name__})") from None
    border = numpy.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if numpy.median(border) > 127:  # dark digit on a light background: make it MNIST's way round
        pixels = 255 - pixels
    pixels -= pixels.min()
    if pixels.max() == 0:
        raise DataError(f"{path}: the image is blank; no digit to read")
    rows, cols = numpy.nonzero(pixels > INK * pixels.max())
    digit = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = DIGIT_SIZE / max(digit.shape)
    height, width = max(1, round(digit.shape[0] * scale)), max(1, round(digit.shape[1] * scale))
    resized = numpy.asarray(Image.fromarray(digit.astype(numpy.float32)).resize((width, height), Image.LANCZOS))
    resized = numpy.clip(resized, 0, None)
    resized *= 255 / max(resized.max(), 1e-12)
    centre_y, centre_x = (numpy.average(numpy.indices(resized.shape)[axis], weights=resized) for axis in (0, 1))
    top = int(numpy.clip(round(FRAME_SIZE / 2 - centre_y), 0, FRAME_SIZE - height))
    left = int(numpy.clip(round(FRAME_SIZE / 2 - centre_x), 0, FRAME_SIZE - width))
    frame = numpy.zeros((FRAME_SIZE, FRAME_SIZE))
    frame[top : top + height, left : left + width] = resized
    return frame.round().astype(numpy.uint8)

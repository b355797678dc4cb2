"""Turning an arbitrary image of a digit into an MNIST-like 28x28 one.

MNIST's digits are white on black, scaled so the longer side of the digit's bounding box
is 20 pixels (aspect kept), and placed in a 28x28 frame with their centre of mass at the
centre. This does the same to any image Pillow can read, as people have them: phone photos
(turned upright by their EXIF orientation), 16-bit and float images, transparency, and dark
ink on uneven, noisy paper.
"""

import warnings

import numpy

from xpnet.errors import DataError

DIGIT_SIZE, FRAME_SIZE = 20, 28
INK = 0.15  # a pixel is part of the digit above this fraction of the strongest ink
WORK_SIZE = 128  # the background is estimated at this resolution (longer side), for speed


def _pillow():
    try:
        from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'xpnet[images]'") from None
    return Image, ImageFilter, ImageOps, UnidentifiedImageError


def read_gray(path):
    """The image as float64 brightness in [0, 1], upright, with transparency laid over a
    background that contrasts with what is drawn (a black digit on clear pixels gets white)."""
    Image, _, ImageOps, UnidentifiedImageError = _pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                if image.mode == "F":
                    _check_finite(path, numpy.asarray(image))
                return _brightness(image)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{path}: too many pixels for a picture of one digit (over {Image.MAX_IMAGE_PIXELS:,}); scale it down"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not an image Pillow can read ({exc.__class__.__name__})") from None


def _check_finite(path, pixels):
    """A float image with NaN or infinite pixels has no brightness to read there: say so, once."""
    bad = int(pixels.size - numpy.count_nonzero(numpy.isfinite(pixels)))
    if bad:
        raise DataError(f"{path}: {bad:,} of its {pixels.size:,} pixels are NaN or infinite; fill or crop them")


def _brightness(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # one channel, wider than 8 bits
        pixels = numpy.asarray(image, dtype=numpy.float64)
        if image.mode == "F":
            top = 1.0 if pixels.max(initial=0) <= 1 else pixels.max()  # floats in [0, 1], or anything else
        else:
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        return numpy.clip(numpy.nan_to_num(pixels) / top, 0, 1)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return numpy.asarray(image.convert("L"), dtype=numpy.float64) / 255
    rgba = image.convert("RGBA")
    gray = numpy.asarray(rgba.convert("L"), dtype=numpy.float64) / 255
    alpha = numpy.asarray(rgba.getchannel("A"), dtype=numpy.float64) / 255
    drawn = numpy.average(gray, weights=alpha) if alpha.sum() > 0 else 0.0
    background = 1.0 if drawn < 0.5 else 0.0
    return alpha * gray + (1 - alpha) * background


def ink(gray):
    """How much ink each pixel holds, 0 for the paper: the image turned so the digit is bright
    (when its border is light), its speckle removed, less its background, less its noise floor.
    The background is each neighbourhood's faintest level, wider than a stroke, smoothed: so
    an uneven sheet of paper, lit from one side, drops out and only the strokes remain."""
    Image, ImageFilter, _, _ = _pillow()
    border = numpy.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    bright = 1 - gray if numpy.median(border) > 0.5 else gray  # dark digit on light paper: MNIST's way round
    # In 8 bits, which Pillow's rank and blur filters take: 1/255 of the range is fine for these.
    image = Image.fromarray((bright * 255).round().astype(numpy.uint8))
    if min(image.size) >= 2 * FRAME_SIZE:  # a photo's speckle; at MNIST's own size it would eat thin strokes
        image = image.filter(ImageFilter.MedianFilter(3))
    width, height = image.size
    scale = min(1.0, WORK_SIZE / max(height, width))
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    window = 2 * (max(small.size) // 10) + 1  # wider than a stroke of a digit filling the frame
    background = small.filter(ImageFilter.MinFilter(window)).filter(ImageFilter.GaussianBlur(window / 2))
    background = numpy.asarray(background.resize((width, height), Image.BILINEAR), dtype=numpy.float64)
    strokes = numpy.clip(numpy.asarray(image, dtype=numpy.float64) - background, 0, None) / 255
    # Most pixels are paper: their level and spread (median, MAD) are the noise floor to remove.
    level = numpy.median(strokes)
    spread = 1.4826 * numpy.median(numpy.abs(strokes - level))
    return numpy.clip(strokes - (level + 3 * spread), 0, None)


def mnist_like(path):
    """The digit in the image at path as a 28 x 28 uint8 MNIST image."""
    Image = _pillow()[0]
    pixels = ink(read_gray(path))
    if pixels.max() <= 0.02:  # nothing stands out of the background by 2% of the range
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

"""matplotlib, imported only when a plot is asked for, and images written atomically."""

import pathlib

import numpy

from xpnet.atomic import atomic_path
from xpnet.errors import XpnetError


def pyplot():
    """matplotlib.pyplot, drawing to files only; an XpnetError with the fix when it is missing.
    Commands call it before their work when a plot is asked for, not after."""
    try:
        import matplotlib
    except ImportError:
        raise XpnetError("plotting needs matplotlib: pip install 'xpnet[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


# What a plot may be written as, named by the file's suffix: three that any matplotlib writes and
# any viewer opens. Some others matplotlib lists need a LaTeX install (pgf) or a Pillow plugin
# (avif), and would fail only once the work is done.
IMAGE_FORMATS = ("png", "svg", "pdf")


def image_format(path, flag="--plot"):
    """The format path's suffix names, so that curves.svg is an SVG, not PNG bytes under that
    name; an XpnetError saying what to write if it names none of IMAGE_FORMATS."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix.lstrip(".") not in IMAGE_FORMATS:
        what = f"cannot write a {suffix} image" if suffix else "the name has no suffix to take the image format from"
        raise XpnetError(f"{flag} {path}: {what}; end the name in .png, .svg or .pdf")
    return suffix.lstrip(".")


def save_figure(figure, path):
    """Write figure to path, atomically, in the format its suffix names (image_format)."""
    try:
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=image_format(path), dpi=110)
    finally:
        pyplot().close(figure)


def plot_history(history, path):
    """Training loss and validation accuracy per epoch, side by side."""
    plt = pyplot()
    epochs = [e.epoch for e in history.epochs]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [e.loss for e in history.epochs], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss (mean cross-entropy)", yscale="log")
    accuracy_axis.plot(epochs, [e.val_accuracy for e in history.epochs], marker="o", color="tab:green")
    accuracy_axis.set(xlabel="epoch", ylabel="validation accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(True, alpha=0.3)
    save_figure(figure, path)


def plot_confusion(matrix, path):
    """The confusion matrix as a heat map with counts: rows true labels, columns predictions."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image)
    for (i, j), count in numpy.ndenumerate(matrix):
        axis.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > matrix.max() / 2 else "black",
        )
    axis.set(xlabel="predicted", ylabel="true", xticks=range(len(matrix)), yticks=range(len(matrix)))
    save_figure(figure, path)

"""`xpnet evaluate`: a checkpoint's test accuracy, per-class accuracy and confusion matrix."""

import numpy
from rich.table import Table

from xpnet.commands import check_outputs, console
from xpnet.data import load_dataset
from xpnet.errors import DataError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.model import MLP, confusion_matrix


def run(args):
    check_outputs(args, "--plot")
    checkpoint = load_checkpoint(args.checkpoint)
    model = MLP.from_checkpoint(checkpoint, args.backend)
    test = load_dataset(args.dataset or checkpoint.dataset or "mnist", args.data_dir).test
    if test.images[0].size != model.sizes[0]:
        raise DataError(
            f"{args.checkpoint} takes {model.sizes[0]} inputs but the test images have {test.images[0].size}"
        )
    predictions = model.predict(test.images)
    n_classes = model.sizes[-1]
    matrix = confusion_matrix(test.labels, predictions, n_classes)
    per_class = matrix.diagonal() / numpy.maximum(matrix.sum(axis=1), 1)
    output = console()
    output.print(
        f"Test accuracy: {matrix.diagonal().sum() / len(test):.4f} on {len(test):,} images ({model.backend.name})"
    )
    table = Table(title="Confusion matrix (rows: true label, columns: predicted)")
    table.add_column("true")
    for j in range(n_classes):
        table.add_column(str(j), justify="right")
    table.add_column("accuracy", justify="right")
    for i in range(n_classes):
        table.add_row(str(i), *(str(c) for c in matrix[i]), f"{per_class[i]:.4f}")
    output.print(table)
    if args.plot:
        from xpnet.plots import plot_confusion

        plot_confusion(matrix, args.plot)
        print(f"Wrote {args.plot}")
    return 0

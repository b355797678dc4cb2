"""`xpnet augment --grid PATH`: training digits beside their deformations, as training would
draw them in its first epochs, so a user sees what the settings do before training with them."""

import numpy

from xpnet.backends import get_backend
from xpnet.data import load_dataset
from xpnet.errors import UsageError
from xpnet.nn.config import DEFORMATION_SETTINGS, TrainConfig
from xpnet.plots import image_format, pyplot, save_figure


def run(args):
    image_format(args.grid, "--grid")
    plt = pyplot()
    config = TrainConfig(seed=args.seed, **{name: getattr(args, name) for name in DEFORMATION_SETTINGS})
    spec = config.deformation()
    if spec is None:
        raise UsageError("--augment none deforms nothing: pass --augment affine, elastic or affine,elastic")
    backend = get_backend(args.backend)
    train = load_dataset(args.dataset, args.data_dir).train
    # The first image of each class, in class order, then the next images, up to --digits rows.
    firsts = [int(numpy.flatnonzero(train.labels == label)[0]) for label in numpy.unique(train.labels)]
    rows = (firsts + [i for i in range(len(train)) if i not in firsts])[: args.digits]
    # An image's draws are those of its training index: the images up to the last one shown.
    shown = train.images[: max(rows) + 1]
    pixels = backend.asarray(shown.reshape(len(shown), -1).astype(numpy.float64))
    on_device = backend.asarray(numpy.array(rows))
    deformed = [
        backend.to_numpy(backend.deform_rows(pixels, on_device, spec, args.seed, epoch, 0.0))
        for epoch in range(args.columns)
    ]
    side = train.images.shape[1]
    figure, axes = plt.subplots(len(rows), args.columns + 1, figsize=(args.columns + 1, len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        images = [train.images[row], *(d[r].reshape(side, side) for d in deformed)]
        for c, (axis, image) in enumerate(zip(axes[r], images)):
            axis.imshow(image, cmap="gray_r", vmin=0, vmax=255)
            axis.set_axis_off()
            if r == 0:
                axis.set_title("image" if c == 0 else f"epoch {c}", fontsize=8)
    save_figure(figure, args.grid)
    print(f"Wrote {args.grid}: {len(rows)} training images, each beside {args.columns} deformations ({describe(spec)})")
    return 0


def describe(spec):
    """The deformation's nonzero ranges, as flags name them."""
    names = {"rotation": "rotation", "scale": "scaling", "shear": "shear", "translation": "translation"}
    names.update(sigma="elastic sigma", alpha="elastic alpha")
    return ", ".join(f"{names[key]} {value:g}" for key, value in spec._asdict().items() if value)

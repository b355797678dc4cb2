"""Checkpoints: one .npz holding the arrays and a JSON document of everything else.

Arrays: param.0, param.1, ... (W then b per layer, as the model's dtype) and velocity.N for
momentum. metadata: UTF-8 JSON (format, architecture, dtype, the normalisation mean and std
and, for a training run, its config, epoch, the step within an unfinished epoch and that
epoch's losses so far, optimiser steps, the host generator's state and the history). A
model saved on its own (``MLP.save``) has no training run: it predicts but cannot be resumed.
Loading uses allow_pickle=False, and the arrays are checked against the architecture, so a
checkpoint made on any backend loads on any other.
"""

import json
import zipfile
from dataclasses import dataclass, field

import numpy

from xpnet.atomic import atomic_path
from xpnet.errors import DataError

FORMAT = "xpnet-checkpoint/1"


@dataclass
class Checkpoint:
    sizes: list
    dtype: str
    mean: float
    std: float
    params: list
    config: dict = None  # the run's TrainConfig as a dict; None for a model saved on its own
    epoch: int = 0  # whole epochs done
    epoch_step: int = 0  # steps done of the next epoch
    epoch_losses: list = field(default_factory=list)  # their losses
    optimizer_steps: int = 0
    rng_state: dict = None  # the host generator's, at the start of the unfinished epoch
    history: list = field(default_factory=list)
    velocities: list = field(default_factory=list)

    def train_config(self, config_class):
        if self.config is None:
            raise DataError("this checkpoint holds a model but no training run, so it cannot be resumed")
        return config_class(**{**self.config, "hidden": tuple(self.config["hidden"])})

    def load_into(self, model):
        for parameter, array in zip(model.parameters(), self.params):
            parameter.value[...] = model.backend.asarray(array, model.dtype)

    def save(self, path):
        metadata = {
            "format": FORMAT,
            "sizes": self.sizes,
            "dtype": self.dtype,
            "mean": self.mean,
            "std": self.std,
            "config": self.config,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "epoch_losses": self.epoch_losses,
            "optimizer_steps": self.optimizer_steps,
            "rng_state": self.rng_state,
            "history": self.history,
        }
        arrays = {f"param.{i}": a for i, a in enumerate(self.params)}
        arrays.update({f"velocity.{i}": v for i, v in enumerate(self.velocities)})
        arrays["metadata"] = numpy.frombuffer(json.dumps(metadata).encode(), dtype=numpy.uint8)
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as f:
                numpy.savez(f, **arrays)


def load_model(path, backend=None):
    """The trained MLP of a checkpoint (a training run's or a saved model's), on any backend:
    a Backend object or its name; None means the default, as for get_backend()."""
    from xpnet.backends import get_backend
    from xpnet.nn.model import MLP

    if backend is None or isinstance(backend, str):
        backend = get_backend(backend)
    checkpoint = load_checkpoint(path)
    model = MLP(backend, checkpoint.sizes, dtype=checkpoint.dtype, mean=checkpoint.mean, std=checkpoint.std)
    checkpoint.load_into(model)
    return model


def expected_shapes(sizes):
    return [shape for n_in, n_out in zip(sizes[:-1], sizes[1:]) for shape in ((n_out, n_in), (n_out,))]


def load_checkpoint(path):
    """Read and check a checkpoint; any fault is a DataError naming the file and the fault."""
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable checkpoint ({exc}); it may be truncated") from None
    try:
        metadata = json.loads(arrays.pop("metadata").tobytes())
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        sizes = metadata["sizes"]
        shapes = expected_shapes(sizes)
        params = [arrays[f"param.{i}"] for i in range(len(shapes))]
        velocities = [arrays[f"velocity.{i}"] for i in range(len(shapes)) if f"velocity.{i}" in arrays]
        dtype = metadata.get("dtype") or metadata["config"]["dtype"]  # files before model.save had it only there
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not an xpnet checkpoint ({exc})") from None
    for name, group in (("param", params), ("velocity", velocities)):
        for i, (array, shape) in enumerate(zip(group, shapes)):
            if array.shape != shape:
                raise DataError(
                    f"{path}: {name}.{i} has shape {array.shape} but the architecture "
                    f"{'-'.join(map(str, sizes))} needs {shape}; the checkpoint is inconsistent"
                )
    return Checkpoint(
        sizes=sizes,
        dtype=dtype,
        mean=metadata["mean"],
        std=metadata["std"],
        params=params,
        config=metadata.get("config"),
        epoch=metadata.get("epoch", 0),
        epoch_step=metadata.get("epoch_step", 0),
        epoch_losses=metadata.get("epoch_losses", []),
        optimizer_steps=metadata.get("optimizer_steps", 0),
        rng_state=metadata.get("rng_state"),
        history=metadata.get("history", []),
        velocities=velocities,
    )

"""Checkpoints: one .npz holding the arrays and a JSON document of everything else.

Arrays: param.0, param.1, ... (W then b per layer, as the backend's dtype) and velocity.N
for momentum. metadata: UTF-8 JSON (format, architecture, dtype, the normalisation mean and
std, epoch, optimiser steps, the host generator's state, the training config and history).
Loading uses allow_pickle=False, and the arrays are checked against the architecture, so a
checkpoint made on any backend loads on any other.
"""

import json
import zipfile
from dataclasses import dataclass

import numpy

from xpnet.atomic import atomic_path
from xpnet.errors import DataError

FORMAT = "xpnet-checkpoint/1"


@dataclass
class Checkpoint:
    config: dict
    sizes: list
    mean: float
    std: float
    epoch: int
    optimizer_steps: int
    rng_state: dict
    history: list
    params: list
    velocities: list

    def train_config(self, config_class):
        return config_class(**{**self.config, "hidden": tuple(self.config["hidden"])})

    def load_into(self, model):
        for parameter, array in zip(model.parameters(), self.params):
            parameter.value[...] = model.backend.asarray(array.astype(model.dtype))

    def save(self, path):
        metadata = {
            "format": FORMAT,
            "config": self.config,
            "sizes": self.sizes,
            "mean": self.mean,
            "std": self.std,
            "epoch": self.epoch,
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


def load_model(path, backend):
    """The trained MLP of a checkpoint, on any backend."""
    from xpnet.nn.model import MLP

    checkpoint = load_checkpoint(path)
    model = MLP(backend, checkpoint.sizes, dtype=checkpoint.config["dtype"], mean=checkpoint.mean, std=checkpoint.std)
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
        config=metadata["config"],
        sizes=sizes,
        mean=metadata["mean"],
        std=metadata["std"],
        epoch=metadata["epoch"],
        optimizer_steps=metadata["optimizer_steps"],
        rng_state=metadata["rng_state"],
        history=metadata["history"],
        params=params,
        velocities=velocities,
    )

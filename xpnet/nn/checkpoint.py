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
import math
import zipfile
from dataclasses import dataclass, field, fields

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
    dataset: str = None  # the name of the dataset it was trained on, where known

    def train_config(self, config_class):
        if self.config is None:
            raise DataError("this checkpoint holds a model but no training run, so it cannot be resumed")
        return config_class(**{**self.config, "hidden": tuple(self.config["hidden"])})

    def model(self, backend=None):
        """The trained MLP, on a Backend or a backend's name (None: the default backend)."""
        from xpnet.backends import get_backend
        from xpnet.nn.model import MLP

        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        model = MLP(backend, self.sizes, dtype=self.dtype, mean=self.mean, std=self.std)
        self.load_into(model)
        return model

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
            "dataset": self.dataset,
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
    return load_checkpoint(path).model(backend)


def expected_shapes(sizes):
    return [shape for n_in, n_out in zip(sizes[:-1], sizes[1:]) for shape in ((n_out, n_in), (n_out,))]


def load_checkpoint(path):
    """Read and check a checkpoint; any fault is a DataError naming the file and the fault."""
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; give the checkpoint's .npz file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        # Not NumPy's message: for a file that is not an .npz it advises unpickling it.
        raise DataError(f"{path}: not a readable checkpoint (not an .npz archive, or truncated)") from None
    try:
        return _parse(arrays)
    except (ValueError, TypeError) as exc:  # ValueError covers ConfigError and JSON's errors
        raise DataError(f"{path}: not a usable xpnet checkpoint: {exc}") from None


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


EPOCH_FIELDS = ("epoch", "loss", "val_accuracy", "seconds", "samples_per_second")


def _parse(arrays):
    """Every field checked for its type and range, so that a hand-edited or damaged file fails
    here with the field's name rather than later, inside training, with a traceback."""
    _require("metadata" in arrays and arrays["metadata"].dtype == numpy.uint8, "it has no metadata")
    metadata = json.loads(arrays.pop("metadata").tobytes())
    _require(isinstance(metadata, dict), "its metadata is not a JSON object")
    _require(metadata.get("format") == FORMAT, f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    sizes = metadata.get("sizes")
    _require(
        isinstance(sizes, list) and len(sizes) >= 2 and all(_is_int(n, 1) for n in sizes),
        f"sizes must be a list of two or more layer sizes >= 1, got {sizes!r}",
    )
    config = metadata.get("config")
    _require(config is None or isinstance(config, dict), f"config must be an object, got {config!r}")
    dtype = metadata.get("dtype") or (config or {}).get("dtype")  # files before model.save had it only in config
    _require(dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64', got {dtype!r}")
    mean, std = metadata.get("mean"), metadata.get("std")
    _require(_is_number(mean), f"mean must be a finite number, got {mean!r}")
    _require(_is_number(std) and std > 0, f"std must be a finite number above 0, got {std!r}")
    counts = {key: metadata.get(key, 0) for key in ("epoch", "epoch_step", "optimizer_steps")}
    for key, value in counts.items():
        _require(_is_int(value), f"{key} must be an integer >= 0, got {value!r}")
    losses = metadata.get("epoch_losses", [])
    _require(isinstance(losses, list) and all(_is_number(x) for x in losses), "epoch_losses must be finite numbers")
    history = metadata.get("history", [])
    _require(
        isinstance(history, list)
        and all(isinstance(e, dict) and set(e) == set(EPOCH_FIELDS) for e in history)
        and all(_is_number(v) for e in history for v in e.values()),
        f"history must be a list of epochs, each with {', '.join(EPOCH_FIELDS)} as numbers",
    )
    rng_state = metadata.get("rng_state")
    if config is not None:
        from xpnet.nn.train import TrainConfig  # here: train imports this module

        _require(
            isinstance(config.get("hidden"), list) and set(config) == {f.name for f in fields(TrainConfig)},
            f"config must hold exactly the settings of TrainConfig, got {sorted(config)}",
        )
        TrainConfig(**{**config, "hidden": tuple(config["hidden"])})  # checks every value
        try:
            numpy.random.default_rng().bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError):
            raise ValueError("rng_state is not a state of NumPy's default generator (PCG64)") from None
    dataset = metadata.get("dataset")
    _require(dataset is None or isinstance(dataset, str), f"dataset must be a name, got {dataset!r}")
    shapes = expected_shapes(sizes)
    params = [_array(arrays, f"param.{i}", shape, sizes) for i, shape in enumerate(shapes)]
    velocities = [
        _array(arrays, f"velocity.{i}", shape, sizes) for i, shape in enumerate(shapes) if f"velocity.{i}" in arrays
    ]
    momentum = (config or {}).get("momentum", 0)
    _require(
        len(velocities) == (len(shapes) if config is not None and momentum else 0),
        f"it holds {len(velocities)} velocity arrays for {len(shapes)} parameters and momentum {momentum}",
    )
    return Checkpoint(
        sizes=sizes,
        dtype=dtype,
        mean=mean,
        std=std,
        params=params,
        config=config,
        epoch_losses=losses,
        rng_state=rng_state,
        history=history,
        velocities=velocities,
        dataset=dataset,
        **counts,
    )


def _array(arrays, name, shape, sizes):
    _require(name in arrays, f"the array {name} is missing")
    array = arrays[name]
    _require(
        array.shape == shape,
        f"{name} has shape {array.shape} but the architecture {'-'.join(map(str, sizes))} needs {shape}",
    )
    _require(array.dtype in (numpy.float32, numpy.float64), f"{name} holds {array.dtype}, not float32 or float64")
    _require(bool(numpy.isfinite(array).all()), f"{name} holds NaN or infinite values")
    return array

"""Checkpoints: one .npz holding the arrays and a JSON document of everything else.

Arrays: param.0, param.1, ... (W then b per layer, in the model's dtype) and the optimiser's
state by name, optimizer.NAME.0, optimizer.NAME.1, ... (SGD's velocity, with momentum).
metadata: UTF-8 JSON: the format; the architecture (layer sizes, activation, dtype and the
normalisation's mean and std: all a model needs to predict); and for a training run its
settings (TrainConfig.to_record), the optimiser's name and step count, the epoch, the step
within an unfinished epoch and that epoch's losses so far, the host generator's state and the
history. A model saved on its own (``MLP.save``) has no training run: it predicts but cannot
be resumed. A setting the file lacks (added to TrainConfig since) takes its default. Loading
uses allow_pickle=False, and the arrays are checked against the architecture, so a
checkpoint made on any backend loads on any other.
"""

import json
import math
import zipfile
from dataclasses import dataclass, field

import numpy

from xpnet.atomic import atomic_path
from xpnet.backends.base import ACTIVATIONS
from xpnet.data.datasets import DATASETS
from xpnet.errors import DataError
from xpnet.nn.config import TrainConfig

FORMAT = "xpnet-checkpoint/2"
# Read too: the same content laid out before the architecture and the optimiser's state had
# names of their own (sizes, dtype, mean and std at the top; velocity.N arrays; SGD with ReLU).
FORMAT_1 = "xpnet-checkpoint/1"
# What a model needs to predict beside its weights: the architecture a checkpoint records.
ARCHITECTURE = ("sizes", "activation", "dtype", "mean", "std")


@dataclass
class Checkpoint:
    sizes: list
    dtype: str
    mean: float
    std: float
    params: list
    activation: str = "relu"  # the hidden layers'
    config: dict = None  # the run's TrainConfig.to_record(); None for a model saved on its own
    epoch: int = 0  # whole epochs done
    epoch_step: int = 0  # steps done of the next epoch
    epoch_losses: list = field(default_factory=list)  # their losses
    optimizer: str = None  # its name (SGD.name), with a training run
    optimizer_steps: int = 0
    optimizer_state: dict = field(default_factory=dict)  # its arrays by name, a list (one per parameter) each
    rng_state: dict = None  # the host generator's, at the start of the unfinished epoch
    history: list = field(default_factory=list)
    dataset: str = None  # the name of the dataset it was trained on, where known

    def architecture(self):
        """Everything a model needs to predict, as the file records it."""
        return {key: getattr(self, key) for key in ARCHITECTURE}

    def train_config(self):
        """The run's TrainConfig; a setting added since the file was saved takes its default."""
        if self.config is None:
            raise DataError("this checkpoint holds a model but no training run, so it cannot be resumed")
        return TrainConfig.from_record(self.config)

    def save(self, path):
        metadata = {
            "format": FORMAT,
            "architecture": self.architecture(),
            "dataset": self.dataset,
            "config": self.config,
            "optimizer": None if self.optimizer is None else {"name": self.optimizer, "steps": self.optimizer_steps},
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "epoch_losses": self.epoch_losses,
            "rng_state": self.rng_state,
            "history": self.history,
        }
        arrays = {f"param.{i}": a for i, a in enumerate(self.params)}
        for name, state in self.optimizer_state.items():
            arrays.update({f"optimizer.{name}.{i}": a for i, a in enumerate(state)})
        arrays["metadata"] = numpy.frombuffer(json.dumps(metadata).encode(), dtype=numpy.uint8)
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as f:
                numpy.savez(f, **arrays)


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
    layout = metadata.get("format")
    _require(layout in (FORMAT, FORMAT_1), f"format {layout!r}, expected {FORMAT!r}")
    if layout == FORMAT_1:
        metadata, arrays = _from_format_1(metadata, arrays)
    architecture = metadata.get("architecture")
    _require(isinstance(architecture, dict), f"architecture must be an object, got {architecture!r}")
    sizes = architecture.get("sizes")
    _require(
        isinstance(sizes, list) and len(sizes) >= 2 and all(_is_int(n, 1) for n in sizes),
        f"sizes must be a list of two or more layer sizes >= 1, got {sizes!r}",
    )
    activation, dtype = architecture.get("activation"), architecture.get("dtype")
    _require(activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _require(dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64', got {dtype!r}")
    mean, std = architecture.get("mean"), architecture.get("std")
    _require(_is_number(mean), f"mean must be a finite number, got {mean!r}")
    _require(_is_number(std) and std > 0, f"std must be a finite number above 0, got {std!r}")
    config = metadata.get("config")
    _require(config is None or isinstance(config, dict), f"config must be an object, got {config!r}")
    optimizer = metadata.get("optimizer") or {}
    _require(isinstance(optimizer, dict), f"optimizer must be an object, got {optimizer!r}")
    counts = {key: metadata.get(key, 0) for key in ("epoch", "epoch_step")}
    counts["optimizer_steps"] = optimizer.get("steps", 0)
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
        TrainConfig.from_record(config)  # checks every value
        # Which optimiser it must be, its settings say: Trainer.restore compares the two.
        _require(isinstance(optimizer.get("name"), str), f"the optimiser must have a name, got {optimizer!r}")
        try:
            numpy.random.default_rng().bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError):
            raise ValueError("rng_state is not a state of NumPy's default generator (PCG64)") from None
    dataset = metadata.get("dataset")
    _require(dataset is None or isinstance(dataset, str), f"dataset must be a name, got {dataset!r}")
    _require(
        dataset is None or dataset in DATASETS,
        f"dataset must be one this xpnet knows ({', '.join(DATASETS)}), got {dataset!r}",
    )
    shapes = expected_shapes(sizes)
    params = [_array(arrays, f"param.{i}", shape, sizes) for i, shape in enumerate(shapes)]
    if config is not None and "hidden" in config:
        hidden = config["hidden"]
        _require(
            isinstance(hidden, list) and hidden == list(sizes[1:-1]),
            f"config.hidden {hidden!r} contradicts the architecture's sizes {sizes}",
        )
    state_names = sorted({name.split(".")[1] for name in arrays if name.startswith("optimizer.")})
    _require(config is not None or not state_names, "a model saved on its own holds no optimiser state")
    optimizer_state = {
        name: [_array(arrays, f"optimizer.{name}.{i}", shape, sizes) for i, shape in enumerate(shapes)]
        for name in state_names
    }
    extra = sorted(
        set(arrays)
        - {f"param.{i}" for i in range(len(shapes))}
        - {f"optimizer.{name}.{i}" for name in state_names for i in range(len(shapes))}
    )
    _require(not extra, f"it holds arrays no checkpoint has: {', '.join(extra)}")
    return Checkpoint(
        sizes=sizes,
        dtype=dtype,
        mean=mean,
        std=std,
        params=params,
        activation=activation,
        config=config,
        epoch_losses=losses,
        optimizer=optimizer.get("name"),
        optimizer_state=optimizer_state,
        rng_state=rng_state,
        history=history,
        dataset=dataset,
        **counts,
    )


def _from_format_1(metadata, arrays):
    """A format-1 file's metadata and arrays as format 2 lays them out: the architecture apart
    (ReLU, the only activation then), SGD's steps under optimizer and velocity.N as its state."""
    config = metadata.get("config")
    architecture = {key: metadata.get(key) for key in ("sizes", "mean", "std")}
    # Files from before model.save had the dtype only in their config.
    architecture["dtype"] = metadata.get("dtype") or (config if isinstance(config, dict) else {}).get("dtype")
    architecture["activation"] = "relu"
    if config is not None:
        metadata["optimizer"] = {"name": "sgd", "steps": metadata.get("optimizer_steps", 0)}
        momentum = config.get("momentum", 0) if isinstance(config, dict) else 0
        velocities = sorted(name for name in arrays if name.startswith("velocity."))
        _require(
            len(velocities) == (len(architecture["sizes"] or []) - 1) * 2 * bool(momentum),
            f"it holds {len(velocities)} velocity arrays for momentum {momentum}",
        )
    renamed = {f"optimizer.{name}" if name.startswith("velocity.") else name: a for name, a in arrays.items()}
    return {**metadata, "architecture": architecture}, renamed


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

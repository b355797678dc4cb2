"""A training run's settings, each declared once, as a field of TrainConfig.

A field carries its type (the annotation), its default, its help and its check. The CLI's
flags (src/xpnet/cli.py), the checks when a config is made, the checkpoint's record of a run and a
resume's conflict check all read the fields by name, so a new setting is one new field: every
one of them picks it up, and a checkpoint saved before it existed loads with its default.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy

from xpnet.backends.base import ACTIVATIONS
from xpnet.backends.deform import LIMITS, Deformation
from xpnet.errors import ConfigError
from xpnet.nn.optim import OPTIMIZERS, betas_error, eps_error, lr_error, momentum_error, weight_decay_error
from xpnet.nn.schedules import NAMES, Schedule, gamma_error

HIDDEN_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "identity")
AUGMENTATIONS = ("none", "affine", "elastic", "affine,elastic")
# The settings of --augment: which deformations, and their ranges.
DEFORMATION_SETTINGS = ("augment", "rotation", "scaling", "shear", "translation", "elastic_sigma", "elastic_alpha")


def seed_lr(batch_size=512):
    """The seed recipe's lr of 1e-4 on the *summed* loss of a batch, as a rate on the mean loss:
    1e-4 * batch_size, 0.0512 at the seed's 512. (A fixed rate on the mean loss would diverge
    at batch 1.)"""
    return 1e-4 * batch_size


def setting_flag(name):
    """The CLI flag of a TrainConfig setting: --batch-size for batch_size."""
    return "--" + name.replace("_", "-")


def at_least(low):
    return lambda value: None if value >= low else f"must be an integer >= {low}"


def one_of(*choices):
    names = " or ".join(map(repr, choices)) if len(choices) < 3 else f"one of {', '.join(map(repr, choices))}"
    return lambda value: None if value in choices else f"must be {names}"


def dropout_error(value):
    return None if 0 <= value < 1 else "must be a probability in [0, 1), e.g. 0.5"


def within(name):
    """The check of a deformation's range: deform.LIMITS[name]."""
    low, high = LIMITS[name]
    return lambda value: None if low <= value <= high else f"must be a number in [{low:g}, {high:g}]"


def layer_sizes(value):
    return None if value and min(value) >= 1 else "must be one or more layer sizes >= 1, e.g. (200,)"


def setting(default, help, check=None, choices=None, label=None, example=None, element=int):
    """A TrainConfig field: its default, its help (the CLI flag's), and its check, which returns
    None for a usable value or what is wrong with it ("must be ..."), said of its label (the
    field's name when None); choices, where the value is one of a list; example, a usable value
    other than the default, which the tests of the compiled paths try beside it; element, the
    type of a tuple's items."""
    if choices is not None:
        check = one_of(*choices)
    metadata = {"help": help, "check": check, "choices": choices, "label": label, "example": example}
    metadata["element"] = element
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One training run's settings; the defaults are the seed recipe (the NumPy notebook this
    project started from: 784-200-10, plain SGD, batch 512, 20 epochs). Checked when made."""

    epochs: int = setting(20, "train up to this epoch", at_least(1))
    batch_size: int = setting(512, "samples per step", at_least(1))
    lr: float = setting(
        seed_lr(),
        "learning rate on the mean loss (the seed's 1e-4 on the summed loss of 512)",
        lr_error,
        label="the learning rate",
    )
    hidden: tuple = setting((200,), "hidden layer sizes, e.g. 200 or 512,256,128,64", layer_sizes)
    activation: str = setting("relu", "the hidden layers' activation", choices=HIDDEN_ACTIVATIONS)
    dropout: float = setting(
        0.0, "the probability of dropping each hidden unit in a training step, in [0, 1)", dropout_error, example=0.5
    )
    seed: int = setting(0, "for the initial weights and the batch order", at_least(0))
    dtype: str = setting("float32", "floating-point type", choices=("float32", "float64"))
    optimizer: str = setting("sgd", "the update rule, as torch.optim's SGD, Adam and AdamW", choices=tuple(OPTIMIZERS))
    momentum: float = setting(0.0, "SGD's, in [0, 1), e.g. 0.9", momentum_error, example=0.9)
    nesterov: bool = setting(False, "Nesterov momentum (needs --momentum > 0)")
    betas: tuple = setting((0.9, 0.999), "Adam's and AdamW's averaging factors", betas_error, element=float)
    eps: float = setting(1e-8, "Adam's and AdamW's term beside the root, above 0", eps_error)
    weight_decay: float = setting(0.0, "L2 penalty, >= 0", weight_decay_error, label="weight decay", example=1e-3)
    schedule: str = setting("constant", "learning-rate schedule over the run", choices=NAMES)
    gamma: float = setting(0.1, "the step and exponential schedules' factor, in (0, 1]", gamma_error)
    step_size: int = setting(10, "the step schedule's period in epochs", at_least(1))
    warmup_epochs: int = setting(0, "epochs whose rate rises linearly to --lr before the schedule", at_least(0))
    augment: str = setting(
        "none", "deform each training image afresh every epoch: affine, elastic or both", choices=AUGMENTATIONS
    )
    rotation: float = setting(15.0, "affine: the largest rotation, in degrees (Ciresan 2010)", within("rotation"))
    scaling: float = setting(
        0.15, "affine: the largest change of scale per axis (Ciresan 2010: 15-20%%)", within("scale")
    )
    shear: float = setting(15.0, "affine: the largest horizontal shear, in degrees (Ciresan 2010)", within("shear"))
    translation: float = setting(0.0, "affine: the largest shift, a fraction of the side", within("translation"))
    elastic_sigma: float = setting(4.0, "elastic: the field's smoothing width in pixels (Simard 2003)", within("sigma"))
    elastic_alpha: float = setting(34.0, "elastic: the field's scale in pixels (Simard 2003)", within("alpha"))

    def __post_init__(self):
        for declared in dataclasses.fields(self):
            value = _typed(declared, getattr(self, declared.name))
            setattr(self, declared.name, value)
            check = declared.metadata["check"]
            problem = check(value) if check is not None else None
            if problem is not None:
                raise ConfigError(f"{declared.metadata['label'] or declared.name} {problem}, got {value!r}")
        if self.nesterov and not self.momentum > 0:
            raise ConfigError("Nesterov momentum needs a momentum above 0, e.g. 0.9")
        if self.optimizer != "sgd" and (self.momentum or self.nesterov):
            raise ConfigError(
                f"momentum and Nesterov are SGD's settings, not {self.optimizer}'s: its averaging is --betas"
            )
        if (self.dropout or self.augment != "none") and self.seed >= 2**64:
            raise ConfigError(
                f"dropout's and --augment's generator is keyed by a seed below 2**64, got seed {self.seed}"
            )
        if "elastic" in self.augment and not (self.elastic_sigma > 0 and self.elastic_alpha > 0):
            raise ConfigError(
                "an elastic deformation needs elastic_sigma and elastic_alpha above 0, e.g. 4 and 34 (Simard's), "
                f"got {self.elastic_sigma:g} and {self.elastic_alpha:g}"
            )
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"warmup_epochs must be below the run's {self.epochs} epochs, got {self.warmup_epochs}: "
                "the schedule would never start"
            )
        smallest = numpy.finfo(self.dtype).tiny
        if self.lr < smallest:
            raise ConfigError(
                f"a learning rate of {self.lr:g} is below the smallest normal {self.dtype} ({smallest:.3g}): "
                "every update would round to 0; use a larger lr or float64"
            )

    def lr_schedule(self, steps_per_epoch):
        """The run's schedules.Schedule, for epochs of steps_per_epoch steps."""
        return Schedule(
            self.schedule,
            steps_per_epoch * self.epochs,
            steps_per_epoch,
            self.gamma,
            self.step_size,
            self.warmup_epochs,
        )

    def deformation(self):
        """The deform.Deformation each training image is drawn through (None: --augment none)."""
        if self.augment == "none":
            return None
        affine, elastic = ("affine" in self.augment), ("elastic" in self.augment)
        return Deformation(
            rotation=self.rotation if affine else 0.0,
            scale=self.scaling if affine else 0.0,
            shear=self.shear if affine else 0.0,
            translation=self.translation if affine else 0.0,
            sigma=self.elastic_sigma if elastic else 0.0,
            alpha=self.elastic_alpha if elastic else 0.0,
        )

    @classmethod
    def from_record(cls, record):
        """The config a checkpoint recorded (a dict, as to_record gives): a setting it lacks, from
        before the setting existed, takes its default; one this version does not know is refused."""
        unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown settings {', '.join(unknown)} (saved by a newer xpnet?)")
        return cls(**record)

    def to_record(self):
        """The settings as JSON takes them (tuples as lists)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(self).items()}


def _is_integer(value):
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, (bool, numpy.bool_))


def _typed(declared, value):
    """value as the field's type (NumPy scalars as Python's), or ConfigError naming what it is.
    Strictly: True is not an int, "no" is not a bool, 1.5 is not an int."""
    kind, name = declared.type, declared.name
    if kind is bool and isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    if kind is int and _is_integer(value):
        return int(value)
    if kind is float and (_is_integer(value) or isinstance(value, (float, numpy.floating))):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    element = declared.metadata["element"]
    is_element = _is_integer if element is int else lambda v: _is_integer(v) or isinstance(v, (float, numpy.floating))
    if kind is tuple and isinstance(value, (tuple, list)) and all(is_element(v) for v in value):
        return tuple(element(v) for v in value)
    wanted = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    items = "integers" if element is int else "numbers"
    raise ConfigError(f"{name} must be {wanted.get(kind, f'a tuple of {items}')}, got {value!r}")


def resumed_config(config, saved):
    """The checkpoint's settings (saved) with config's epochs. A setting config changes from the
    default that differs from the checkpoint's is refused, as `xpnet train --resume` refuses a
    setting's flag: the run would otherwise go on with other settings than the ones asked for."""
    default = TrainConfig()
    clashes = [
        f"{name}={getattr(config, name)!r} (the checkpoint's: {getattr(saved, name)!r})"
        for name in run_settings()
        if getattr(default, name) != getattr(config, name) != getattr(saved, name)
    ]
    if clashes:
        raise ConfigError(
            f"a resumed run keeps its checkpoint's settings, but config sets {', '.join(clashes)}; "
            "pass TrainConfig(epochs=...) alone with a checkpoint"
        )
    return dataclasses.replace(saved, epochs=config.epochs)


def run_settings():
    """The names of the settings a resumed run keeps from its checkpoint: all but epochs."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "epochs"]

"""Recipes by name: sets of training settings, each a TrainConfig's fields that differ from the
defaults. `xpnet train --recipe NAME` takes them as its defaults, so any flag overrides one;
`xpnet recipes` prints them. Every recipe trains on the 50,000 images left after the
validation split (the papers trained on all 60,000), and its note says what it measured.
"""

from typing import NamedTuple

from xpnet.errors import ConfigError
from xpnet.nn.config import TrainConfig, setting_flag


class Recipe(NamedTuple):
    """A named set of settings: what it is (and its source), the settings, and what it measured."""

    description: str
    settings: dict
    measured: str

    def config(self, **overrides):
        """Its TrainConfig, with overrides (settings by name) on top."""
        return TrainConfig(**{**self.settings, **overrides})


NESTEROV = {"batch_size": 128, "lr": 0.05, "momentum": 0.9, "nesterov": True}

RECIPES = {
    "notebook": Recipe(
        "the original notebook: 784-200-10, plain SGD, batch 512, 20 epochs (TrainConfig's defaults)",
        {},
        "validation accuracy 0.9688 (numba, seed 0); the notebook reported 0.969",
    ),
    "nesterov-cosine": Recipe(
        "784-200-10 with Nesterov momentum, weight decay and a cosine rate: 98.2% in 20 epochs",
        {**NESTEROV, "weight_decay": 1e-3, "schedule": "cosine", "epochs": 20},
        "test accuracy 0.9831 (numba, seed 0), 0.9823 and 0.9826 (seeds 1, 2), in about 6 s of training",
    ),
    "simard2003": Recipe(
        "Simard, Steinkraus and Platt (ICDAR 2003): 784-800-10 on elastically deformed images "
        "(sigma 4, alpha 34), their 0.70% test error; trained here by SGD with Nesterov momentum "
        "and a cosine rate",
        {**NESTEROV, "hidden": (800,), "schedule": "cosine", "epochs": 300, "augment": "elastic"},
        "test error 0.58% (accuracy 0.9942; numba, seed 0, 2 threads on a 2-core machine): 676 s of "
        "epochs, 11 min 40 s in all",
    ),
    "ciresan2010": Recipe(
        "Ciresan, Meier, Gambardella and Schmidhuber (Neural Computation 2010): the plain MLP "
        "784-2500-2000-1500-1000-500-10 with tanh units on images deformed afresh each epoch "
        "(rotation and shear up to 15 degrees, scaling 15%, elastic sigma 6, alpha 36), the rate "
        "decayed each epoch; their 0.35% test error. Plain tanh stands for their scaled tanh, "
        "and batches of 128 with momentum for their online updates",
        {
            **NESTEROV,
            "lr": 0.02,
            "hidden": (2500, 2000, 1500, 1000, 500),
            "activation": "tanh",
            "schedule": "exponential",
            "gamma": 0.97,
            "epochs": 100,
            "augment": "affine,elastic",
            "elastic_sigma": 6.0,
            "elastic_alpha": 36.0,
        },
        "not yet measured: it needs a GPU (a session with one runs it)",
    ),
}


def get_recipe(name):
    """The recipe of that name, or ConfigError listing the names."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def as_flags(recipe):
    """The recipe as `xpnet train` flags, in TrainConfig's order."""
    config, default, flags = recipe.config(), TrainConfig(), []
    for name in TrainConfig.__dataclass_fields__:
        value = getattr(config, name)
        if value == getattr(default, name):
            continue
        if isinstance(value, bool):
            flags.append(setting_flag(name))
        elif isinstance(value, tuple):
            flags.append(f"{setting_flag(name)} {','.join(map(str, value))}")
        else:
            flags.append(
                f"{setting_flag(name)} {value:g}" if isinstance(value, float) else f"{setting_flag(name)} {value}"
            )
    return " ".join(flags)

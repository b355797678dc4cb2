"""Recipes by name (`xpnet train --recipe`, `xpnet recipes`) and `xpnet augment --grid`."""

import dataclasses
import shlex

import numpy
import pytest

from xpnet.cli import build_parser, main, parse_args
from xpnet.data import Split
from xpnet.errors import ConfigError
from xpnet.nn.config import TrainConfig, run_settings
from xpnet.nn.recipes import RECIPES, as_flags, get_recipe
from xpnet.nn.train import Trainer


def config_of(argv):
    args = parse_args(build_parser(), argv)
    return TrainConfig(epochs=args.epochs, **{name: getattr(args, name) for name in run_settings()})


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_is_its_flags_and_any_flag_overrides_it(name):
    recipe = RECIPES[name]
    assert config_of(["train", "--recipe", name]) == recipe.config()
    assert config_of(["train", *shlex.split(as_flags(recipe))]) == recipe.config()
    assert config_of(["train", "--recipe", name, "--lr", "0.003"]) == dataclasses.replace(recipe.config(), lr=0.003)


def test_the_papers_recipes_hold_their_networks_and_deformations():
    simard, ciresan = RECIPES["simard2003"].config(), RECIPES["ciresan2010"].config()
    assert simard.hidden == (800,) and simard.augment == "elastic"
    assert (simard.elastic_sigma, simard.elastic_alpha) == (4.0, 34.0)
    assert ciresan.hidden == (2500, 2000, 1500, 1000, 500) and ciresan.activation == "tanh"
    assert ciresan.augment == "affine,elastic" and (ciresan.elastic_sigma, ciresan.elastic_alpha) == (6.0, 36.0)
    assert (ciresan.rotation, ciresan.scaling, ciresan.shear) == (15.0, 0.15, 15.0)
    with pytest.raises(ConfigError, match="unknown recipe 'lenet': choose one of notebook, nesterov-cosine"):
        get_recipe("lenet")


def test_recipes_prints_each_recipe_with_its_flags_and_measure(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, recipe in RECIPES.items():
        assert f"{name}: {recipe.description}." in out and f"measured: {recipe.measured}" in out
    assert "xpnet train --epochs 300 --batch-size 128" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dropout", "1"], "dropout must be a probability in [0, 1), e.g. 0.5, got 1.0"),
        (["--augment", "affine", "--rotation", "400"], "rotation must be a number in [0, 180], got 400.0"),
        (["--elastic-sigma", "-1"], "elastic_sigma must be a number in [0, 28], got -1.0"),
    ],
)
def test_a_setting_out_of_range_is_one_line_before_any_work(flags, message, tmp_path, capsys):
    """Refused when the config is made, before the data is read (the data dir does not exist)."""
    assert main(["train", *flags, "--data-dir", str(tmp_path / "nowhere"), "--save", str(tmp_path / "run.npz")]) == 2
    err = capsys.readouterr().err
    assert err == f"xpnet: error: {message}\n" and not list(tmp_path.iterdir())


def test_a_recipe_cannot_be_resumed_onto(tmp_path, capsys):
    assert main(["train", "--recipe", "simard2003", "--resume", str(tmp_path / "run.npz")]) == 2
    assert "--resume continues the run with its own settings; drop --recipe" in capsys.readouterr().err


def test_augment_draws_a_grid_of_digits_and_their_deformations(small_data_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    command = ["augment", "--grid", str(grid), "--data-dir", str(small_data_dir), "--digits", "3", "--columns", "2"]
    assert main([*command, "--backend", "numpy"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 training images, each beside 2 deformations (rotation 15, scaling 0.15" in capsys.readouterr().out
    assert main([*command, "--augment", "none"]) == 2
    assert "--augment none deforms nothing" in capsys.readouterr().err
    assert main([*command[:1], "--grid", str(tmp_path / "grid.jpg"), *command[3:]]) == 2
    assert "--grid" in capsys.readouterr().err and not (tmp_path / "grid.jpg").exists()
    assert main([*command, "--rotation", "400"]) == 2
    assert "rotation must be a number in [0, 180], got 400.0" in capsys.readouterr().err


@pytest.mark.slow
def test_the_simard_recipe_in_a_few_epochs(mnist_splits):
    """Its short version: 3 epochs of the recipe (the cosine rate over those 3) on the CPU."""
    history = Trainer("numba", mnist_splits, RECIPES["simard2003"].config(epochs=3)).fit(log=lambda line: None)
    assert history.test_accuracy >= 0.975


# Its one epoch of 5,000 images measured test accuracy 0.8711 (numba, seed 0, 2 threads).
CIRESAN_ONE_EPOCH = 0.84


@pytest.mark.slow
def test_the_ciresan_recipe_in_one_epoch_of_a_tenth_of_mnist(mnist_splits):
    """Its short version: its network, tanh units and deformations, one epoch of 5,000 images."""
    train = Split(mnist_splits.train.images[:5000], mnist_splits.train.labels[:5000])
    data = dataclasses.replace(mnist_splits, train=train)
    history = Trainer("numba", data, RECIPES["ciresan2010"].config(epochs=1)).fit(log=lambda line: None)
    assert history.test_accuracy >= CIRESAN_ONE_EPOCH and numpy.isfinite(history.epochs[0].loss)

"""`xpnet recipes`: each named recipe, what it is, its flags and what it measured."""

from xpnet.nn.recipes import RECIPES, as_flags


def run(args):
    for name in [args.name] if args.name else RECIPES:
        recipe = RECIPES[name]
        print(f"{name}: {recipe.description}.")
        print(f"    xpnet train --recipe {name}")
        print(f"    is  xpnet train {as_flags(recipe)}".rstrip())
        print(f"    measured: {recipe.measured}")
    return 0

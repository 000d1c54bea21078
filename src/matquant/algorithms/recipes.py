"""Named recipes: measured presets of a method config, `--recipe NAME` / `recipe_config(NAME)`.

A recipe only fills in options the caller did not give (an explicit `--clip mse` beside `--recipe quality` wins),
and the checkpoint records the options that were used (its `method_args`, `rotation`), not the recipe's name, so a
recipe is a shorthand and never a hidden state. What each recipe costs and gives is measured in docs/results.md,
"Recipes".
"""
from __future__ import annotations

import difflib

from matquant.algorithms.configs.base import MethodConfig, config_class

# Option names are the configs' field names (the Python API's keywords); the CLI's flags map onto them.
RECIPES: dict[str, dict] = {
    # plain MatGPTQ: MinMax group parameters, no rotation
    "fast": {"method": "matgptq"},
    # the best one-checkpoint slices measured (docs/results.md, "Recipes"): the importance-weighted clipping search,
    # and every precision reads the shared codes with its own (α, z)
    "quality": {"method": "matgptq", "clip": "weighted", "slice_params": "own"},
    # the clipping search with each slice's relative error weighted alike: it keeps the outlier weights the int8
    # master needs on models such as Qwen2.5 (docs/results.md, "Recipes")
    "balanced": {"method": "matgptq", "clip": "weighted", "clip_lambdas": (4096, 16, 4, 1)},
}
DEFAULT_RECIPE = "quality"  # what `matquant quantize`, `matquant demo` and `matquant.quantize` run when no method is named
RECIPE_OPTIONS = ("method", "clip", "clip_lambdas", "rotate", "slice_params")  # the options a recipe may set


def check_recipe(name: str) -> dict:
    """The options of recipe `name` (a copy); an unknown name is a ValueError listing the known ones."""
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; choose one of {', '.join(RECIPES)} (docs/results.md, "
                         "'Recipes', says what each costs and gives).")
    return dict(RECIPES[name])


def resolve_config(method: str | None = None, recipe: str | None = None, **options) -> MethodConfig:
    """The validated config for `method` and/or `recipe` and explicit `options` (None = not given).

    Neither method nor recipe: the DEFAULT_RECIPE. A method alone: that method with its own defaults. A recipe
    fills in the options it sets that are not given, for its method or the one named."""
    if method is None and recipe is None:
        recipe = DEFAULT_RECIPE
    preset = check_recipe(recipe) if recipe is not None else {}
    method = method or preset.pop("method", None) or "matgptq"
    preset.pop("method", None)
    cls = config_class(method)
    fields = {f.name for f in cls.option_fields()}
    missing = sorted(k for k, v in preset.items() if options.get(k) is None and k not in fields)
    if missing:
        raise ValueError(f"--recipe {recipe} sets {', '.join(missing)}, which method {method!r} does not take; "
                         "choose another method or recipe.")
    filled = {k: v for k, v in options.items() if v is not None}
    from_recipe = {k: v for k, v in preset.items() if k not in filled}
    config = cls.from_options(**{**from_recipe, **filled})
    try:
        return config.validate()
    except ValueError as e:
        if "clip_lambdas" not in from_recipe:
            raise
        raise ValueError(f"{e} (--recipe {recipe} sets --clip-lambdas "
                         f"{','.join(map(str, from_recipe['clip_lambdas']))} for its method's default precisions: "
                         "pass --clip-lambdas with one weight per slice of your --bits-list)") from None


def recipe_config(name: str, **overrides) -> MethodConfig:
    """The config of recipe `name`, e.g. recipe_config("quality") = MatGPTQConfig(clip="weighted",
    slice_params="own"); `overrides` win."""
    return resolve_config(recipe=name, **overrides)


__all__ = ["RECIPES", "RECIPE_OPTIONS", "DEFAULT_RECIPE", "check_recipe", "recipe_config",
           "resolve_config"]

"""Named recipes: measured combinations of method options, callable as `--recipe NAME` / `recipe="NAME"`.

A recipe only fills in options the caller did not give (an explicit `--clip mse` beside `--recipe quality` wins),
and the checkpoint records the options that were used (its `method_args`, `rotation`), not the recipe's name, so
a recipe is a shorthand and never a hidden state. What each recipe costs and gives is measured in
docs/results.md, "Recipes"; the numbers live there, not here.
"""
from __future__ import annotations

import difflib

# Option names are the Python API's (`matquant.quantize` keyword arguments); the CLI's flags map onto them.
RECIPES: dict[str, dict] = {
    # the fast default: MatGPTQ, MinMax group parameters, no rotation
    "fast": {"method": "matgptq"},
    # the best one-checkpoint slices measured within 30 minutes of a 2-core machine (docs/results.md, "Recipes");
    # adding --rotate input to it was measured worse at every precision (the rotation flattens the importance the
    # weighted search relies on), so the recipe leaves rotation off. Every precision reads the codes with its own
    # (α, z) (slice_params='own'; better at every slice, measured in docs/results.md "Slice-own group parameters";
    # the checkpoint holds 2 more bits per weight, a served slice none)
    "quality": {"method": "matgptq", "clip": "weighted", "slice_params": "own"},
    # the clipping search with each slice's relative error weighted alike (λ ∝ 4^r for R = 8,4,3,2): it keeps the
    # outlier weights the int8 master needs, which `quality` clips on Qwen2.5 (int8 6 % worse there); it gives up
    # most of `quality`'s int3/int2 gain on SmolLM2 (docs/results.md, "Recipes")
    "balanced": {"method": "matgptq", "clip": "weighted", "clip_lambdas": (4096, 16, 4, 1)},
}
RECIPE_OPTIONS = ("method", "clip", "clip_lambdas", "rotate", "calib_windows", "slice_params")  # the options a recipe may set


def check_recipe(name: str) -> dict:
    """The options of recipe `name` (a copy); an unknown name is a ValueError listing the known ones."""
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; choose one of {', '.join(RECIPES)} (docs/results.md, "
                         "'Recipes', says what each costs and gives).")
    return dict(RECIPES[name])


def apply_recipe(name: str | None, given: dict) -> dict:
    """`given` (option -> value, None = not given) completed by recipe `name`: the caller's values win."""
    out = dict(given)
    if name is None:
        return out
    for key, value in check_recipe(name).items():
        if out.get(key) is None:
            out[key] = value
    return out


__all__ = ["RECIPES", "RECIPE_OPTIONS", "apply_recipe", "check_recipe"]

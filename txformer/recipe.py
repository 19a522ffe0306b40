"""The training recipe's data-dependent defaults: the standard recipe, and the long-history recipe that replaces it on
data whose histories are long (docs/recipe.md, docs/long_histories.md).

A flag that a recipe sets defaults to None ("by the recipe"). The arguments' `__post_init__` fills such flags from the
standard recipe and remembers their names (`fill_from_recipe`), so the arguments are complete as soon as they are
parsed; once the training customers are known, `use_recipe` replaces them by the chosen recipe's values. A flag
given on the command line is never changed.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .cli import merge_config_overrides


logger = logging.getLogger(__name__)

AUTO_RECIPE = "auto"
# The long-history recipe applies when the training customers' median history holds more events than this: most
# histories are then longer than the contexts of the standard recipe, and the evidence they carry keeps accruing.
LONG_HISTORY_MEDIAN_EVENTS = 1024


@dataclass(frozen=True)
class Recipe:
    """Defaults of the flags that depend on the data's history lengths; each stays a flag of its own."""

    name: str
    learning_rate: float
    min_train_steps: int
    # Steps between checkpoints and evaluations, as a share of the budget (`eval_steps` follows).
    save_steps: float
    early_stopping_patience: int
    group_by_length: bool
    train_window_min_share: float
    # 0: the context (`--max_length`).
    train_max_length: int
    # Added before the command line's `--config_overrides` (which win) for a new model.
    config_overrides: str

    def flags(self, relative_to: "Recipe | None" = None) -> list[str]:
        """The recipe as command-line flags (only those that differ from `relative_to`'s, when given)."""
        flags = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "name" or (relative_to is not None and value == getattr(relative_to, field.name)):
                continue
            flags += [f"--{field.name}", flag_value(value)]
        return flags


STANDARD_RECIPE = Recipe(
    name="standard",
    learning_rate=1e-3,
    min_train_steps=500,
    save_steps=0.05,
    early_stopping_patience=5,
    group_by_length=False,
    train_window_min_share=0.5,
    train_max_length=0,
    config_overrides="",
)
# Measured on the long family (docs/long_histories.md): the embedding readout sums evidence over every event; training
# windows of 5 to 100% of at most 4,096 events keep a step's cost bounded while the model is selected on whole
# histories; a step moves a sum over thousands of events, so a lower peak learning rate; each evaluation reads whole
# histories and fits the readout's centre, so 12 of them per run, and no early stopping (one evaluation's ranking of
# 200 customers swings); batches grouped by length (little padding among windows of 200 to 4,096 events).
LONG_HISTORY_RECIPE = Recipe(
    name="long_histories",
    learning_rate=2e-4,
    min_train_steps=300,
    save_steps=1 / 12,
    early_stopping_patience=0,
    group_by_length=True,
    train_window_min_share=0.05,
    train_max_length=4096,
    config_overrides="embedding_sum_readout=true",
)
# Fine-tuning the encoder of a trained or pretrained folder (`--model_name_or_path`) starts from features worth keeping:
# the recipe's peak learning rate times this (on 10% of the labels after CoLES pretraining, seed 42: held-out AUROC
# 0.744 at 1e-3, 0.804 at 1e-4; docs/pretraining.md).
FINE_TUNING_LEARNING_RATE_SCALE = 0.1
RECIPES = {recipe.name: recipe for recipe in (STANDARD_RECIPE, LONG_HISTORY_RECIPE)}
RECIPE_CHOICES = [AUTO_RECIPE, *RECIPES]
RECIPE_FIELDS = frozenset(field.name for field in fields(Recipe)) - {"name", "config_overrides"}


def flag_value(value: Any) -> str:
    """A value as a command line writes it: booleans in lower case, floats to 4 significant digits."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fill_from_recipe(arguments: Any, recipe: Recipe = STANDARD_RECIPE) -> tuple[str, ...]:
    """Sets the recipe's flags that `arguments` left at None to `recipe`'s values; returns their names."""
    names = tuple(sorted(name for name in RECIPE_FIELDS if getattr(arguments, name, 0) is None))
    set_from_recipe(arguments, recipe, names)
    return names


def set_from_recipe(arguments: Any, recipe: Recipe, names: Sequence[str]) -> None:
    """Sets the flags `names` of `arguments` to `recipe`'s values."""
    for name in names:
        setattr(arguments, name, getattr(recipe, name))


def recipe_for_median_length(median: float) -> Recipe:
    """The long-history recipe where the median history holds more than `LONG_HISTORY_MEDIAN_EVENTS`, else the
    standard one."""
    return LONG_HISTORY_RECIPE if median > LONG_HISTORY_MEDIAN_EVENTS else STANDARD_RECIPE


def choose_recipe(name: str, history_lengths: Sequence[int]) -> Recipe:
    """The recipe called `name`, or for "auto" the one the training customers' history lengths call for."""
    if name != AUTO_RECIPE:
        return RECIPES[name]
    median = float(np.median(history_lengths)) if len(history_lengths) else 0.0
    recipe = recipe_for_median_length(median)
    logger.info(
        "Recipe %s: the training customers' median history holds %.0f events (the long-history recipe above %d).",
        recipe.name,
        median,
        LONG_HISTORY_MEDIAN_EVENTS,
    )
    return recipe


def recipe_overrides(recipe: Recipe, config_overrides: str | None) -> str | None:
    """`--config_overrides` of a new model under `recipe`: the recipe's, then the command line's, which win."""
    texts = [text for text in (recipe.config_overrides, config_overrides) if text]
    return merge_config_overrides(*texts) if texts else None


__all__ = [
    "AUTO_RECIPE",
    "FINE_TUNING_LEARNING_RATE_SCALE",
    "LONG_HISTORY_MEDIAN_EVENTS",
    "LONG_HISTORY_RECIPE",
    "RECIPES",
    "RECIPE_CHOICES",
    "STANDARD_RECIPE",
    "Recipe",
    "choose_recipe",
    "fill_from_recipe",
    "recipe_for_median_length",
    "recipe_overrides",
    "set_from_recipe",
]

"""Ablations: a recipe varied along factors, every cell trained over several seeds, one table.

Synopsis::

    ablation = Ablation(vary={"grad_clip": ["on", "off"], "max_lr": [0.005, 0.01]}, seeds=5)
    result = run_ablation(recipe, ablation, out_dir=Path("runs/clip-vs-lr"))  # ablation_runner
    print(result.table())

A factor's first value is its baseline. A factor is a plugin switched ``on``/``off``, a plugin
setting (``grad_clip.max``) or a recipe field (``max_lr``). Seed ``s`` of every cell shares its
initialisation and data order with seed ``s`` of the baseline, so differences are compared seed
by seed (a paired t interval), which takes the seed-to-seed spread out of the comparison.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from hooktrain.config.overrides import apply_overrides, parse_assignment
from hooktrain.config.recipe import Recipe, field_names
from hooktrain.config.stored import recipe_to_config
from hooktrain.core.plugin import plugin_classes
from hooktrain.errors import HooktrainError

ABLATION_FILE = "ablation.json"
TABLE_FILE = "ablation.md"
CELLS_FOLDER = "cells"
FORMAT = "hooktrain-ablation"
VERSION = 1
ON, OFF = "on", "off"
MODES = ("grid", "one-at-a-time")
MAX_SEEDS = 10_000  # far beyond any table worth reading; a typo beyond it would fill memory
Mode = Literal["grid", "one-at-a-time"]


# --------------------------------------------------------------------------------------------
# Factors and cells
# --------------------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    """A Python value as the command line would write it."""
    if isinstance(value, bool):  # on/off reads as a switch for plugins and as a bool for fields
        return ON if value else OFF
    if isinstance(value, tuple | list):
        return ",".join(_as_text(item) for item in value)
    return str(value).strip()


def split_values(text: str) -> list[str]:
    """``"a,b,(c,d)"`` as ``["a", "b", "c,d"]``: commas inside brackets belong to one value."""
    values, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:index])
            start = index + 1
    values.append(text[start:])
    return [_unbracket(value.strip()) for value in values]


def _unbracket(value: str) -> str:
    if value[:1] in ("(", "[") and value[-1:] in (")", "]"):
        return value[1:-1].strip()
    return value


@attrs.frozen
class Factor:
    """One ``--vary``: a key and the values it takes, the first being the baseline's."""

    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Factor:
        """``"KEY=V1,V2,..."`` as a factor; values in brackets may hold commas."""
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HooktrainError(
                f"--vary takes KEY=VALUE1,VALUE2,... (e.g. --vary grad_clip=on,off), not {text!r}."
            )
        return cls.of(key, split_values(values) if values.strip() else [])

    @classmethod
    def of(cls, key: str, values: Sequence[Any]) -> Factor:
        """A factor from Python values (numbers, booleans, tuples or text)."""
        texts = tuple(_as_text(value) for value in values)
        if not texts or any(not text for text in texts):
            raise HooktrainError(
                f"--vary {key} needs at least one value and no empty ones "
                f"(e.g. --vary {key}=A,B), not {','.join(texts)!r}."
            )
        repeated = sorted({text for text in texts if texts.count(text) > 1})
        if repeated:
            raise HooktrainError(f"--vary {key} lists {repeated[0]!r} twice; list each value once.")
        return cls(key, texts)


def _to_factors(vary: Mapping[str, Sequence[Any]] | Sequence[Factor]) -> tuple[Factor, ...]:
    if isinstance(vary, Mapping):
        return tuple(Factor.of(key, values) for key, values in vary.items())
    return tuple(vary)


@attrs.frozen
class Cell:
    """One combination of factor values: ``settings`` after dropping what an off plugin makes
    moot; ``name`` lists where it differs from the baseline (``"baseline"`` for the baseline).
    """

    name: str
    settings: tuple[tuple[str, str], ...]
    baseline: bool

    @property
    def folder(self) -> str:
        """The cell's folder name: its name, where characters awkward in paths are replaced,
        followed by a hash of the name that keeps such cells apart."""
        safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name)
        if safe == self.name:
            return safe
        return f"{safe}-{hashlib.sha1(self.name.encode()).hexdigest()[:8]}"


@attrs.frozen(kw_only=True)
class Ablation:
    """Which settings to vary, how to combine them, and how many seeds each combination gets.

    ``vary`` maps a key to its values (``{"grad_clip": ["on", "off"]}``); ``mode`` ``grid`` runs
    every combination, ``one-at-a-time`` the baseline plus each single change from it.
    ``parallel_seeds`` trains that many seeds of a cell at once, vmapped. ``metric`` is the
    final figure the table compares (``test_accuracy``; ``test_mse`` for a regression).
    """

    vary: tuple[Factor, ...] = attrs.field(converter=_to_factors)
    mode: Mode = "grid"
    seeds: int = 3
    parallel_seeds: int = 1
    metric: str = "test_accuracy"

    def __attrs_post_init__(self) -> None:
        if not self.vary:
            raise HooktrainError("An ablation needs at least one --vary KEY=VALUE1,VALUE2,....")
        keys = [factor.key for factor in self.vary]
        if "seed" in keys:
            raise HooktrainError(
                "--vary seed is not a factor: every cell already trains over the seeds "
                "(--seeds N, from the recipe's seed); vary something else."
            )
        for key in keys:
            if keys.count(key) > 1:
                raise HooktrainError(f"--vary {key} is given twice; list all its values in one.")
        if self.mode not in MODES:
            raise HooktrainError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if not (1 <= self.seeds <= MAX_SEEDS and 1 <= self.parallel_seeds <= MAX_SEEDS):
            raise HooktrainError(
                f"--seeds and --parallel-seeds must be 1 to {MAX_SEEDS}, not {self.seeds} and "
                f"{self.parallel_seeds}."
            )

    def cells(self, recipe: Recipe) -> list[Cell]:
        """The cells to train, baseline first; every one checked against ``recipe``."""
        toggles = self.toggles(recipe)
        baseline = tuple((f.key, f.values[0]) for f in self.vary)
        if self.mode == "grid":
            combinations = [
                tuple(zip([f.key for f in self.vary], values, strict=True))
                for values in itertools.product(*(f.values for f in self.vary))
            ]
        else:
            combinations = [baseline] + [
                tuple((k, value if k == f.key else v) for k, v in baseline)
                for f in self.vary
                for value in f.values[1:]
            ]
        moot_free = [_drop_moot(settings, toggles) for settings in combinations]
        base = dict(moot_free[0])
        cells: list[Cell] = []
        for settings in dict.fromkeys(moot_free):  # in order, each combination once
            changed = [f"{k}={v}" for k, v in settings if base.get(k) != v]
            is_base = not changed
            cells.append(Cell("baseline" if is_base else ",".join(changed), settings, is_base))
        seen: dict[str, Cell] = {}
        for cell in cells:  # every cell's errors before any training
            try:
                config = json.dumps(recipe_to_config(cell_recipe(recipe, cell, toggles)))
            except HooktrainError as error:
                raise HooktrainError(f"--vary, in the cell {cell.name}: {error}") from error
            if config in seen:
                raise HooktrainError(
                    f"--vary gives the cells {seen[config].name} and {cell.name} the same "
                    "settings (values that mean the same, like 0.1 and 0.10); list each once."
                )
            seen[config] = cell
        return cells

    def toggles(self, recipe: Recipe) -> set[str]:
        """The keys that switch a plugin on and off (the others set values)."""
        return {f.key for f in self.vary if _is_toggle(f, recipe)}

    def fixed_recipe(
        self,
        recipe: Recipe,
        assignments: Sequence[str] = (),
        with_plugins: Sequence[str] = (),
        without_plugins: Sequence[str] = (),
    ) -> Recipe:
        """The recipe under every cell: ``recipe`` with the command line's --set, --with and
        --without, none of which may fix a key that a factor varies.

        A plugin switched on and off may still be given settings (``--set P.x=v``, with or
        without ``--with P``): they apply in the cells where it is on.
        """
        toggles = self.toggles(recipe)
        keys = [parse_assignment(text)[0] for text in assignments]
        fixed = {*keys, *without_plugins, *(name for name in with_plugins if name not in toggles)}
        both = [f.key for f in self.vary if f.key in fixed]
        if both:
            raise HooktrainError(
                f"{both[0]} is both varied and fixed (--set/--with/--without); drop one of the two."
            )
        # A switched plugin the recipe lacks joins it to take its settings; cells that say
        # "off" drop it again.
        set_plugins = {key.partition(".")[0] for key in keys if "." in key}
        joining = [
            f.key
            for f in self.vary
            if f.key in toggles & set_plugins
            and recipe.plugin(f.key) is None
            and f.key not in with_plugins
        ]
        return apply_overrides(recipe, assignments, [*with_plugins, *joining], without_plugins)

    def spec(self, recipe: Recipe) -> dict[str, Any]:
        """What identifies this ablation's results (not how they are computed: parallel_seeds)."""
        return {
            "recipe": recipe_to_config(recipe),
            "vary": {f.key: list(f.values) for f in self.vary},
            "mode": self.mode,
            "seeds": self.seed_list(recipe),
            "metric": self.metric,
        }

    def seed_list(self, recipe: Recipe) -> list[int]:
        """The seeds every cell trains: the recipe's seed and the ones after it."""
        return [recipe.seed + i for i in range(self.seeds)]


def _is_toggle(factor: Factor, recipe: Recipe) -> bool:
    """Whether the factor switches a plugin on and off (else it sets a value)."""
    key = factor.key
    if "." in key or key in field_names(Recipe):
        return False
    if recipe.plugin(key) is None and key not in plugin_classes():
        valid = field_names(Recipe) + sorted({*plugin_classes(), *(p.name for p in recipe.plugins)})
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise HooktrainError(
            f"--vary {key}: {key!r} is neither a recipe field nor a plugin.{hint} Vary a plugin "
            "(grad_clip=on,off), a plugin setting (grad_clip.max=0.05,0.1) or a recipe field "
            "(max_lr=0.005,0.01); `hooktrain list` shows the plugins."
        )
    bad = [v for v in factor.values if v not in (ON, OFF)]
    if bad:
        raise HooktrainError(
            f"--vary {key}: {key!r} is a plugin, so its values are on and off, not {bad[0]!r}; "
            f"to vary one of its settings use --vary {key}.SETTING=A,B."
        )
    return True


def _drop_moot(
    settings: tuple[tuple[str, str], ...], toggles: set[str]
) -> tuple[tuple[str, str], ...]:
    """Settings of a plugin that is off in this combination change nothing: leave them out."""
    off = {k for k, v in settings if k in toggles and v == OFF}
    return tuple((k, v) for k, v in settings if k.partition(".")[0] not in off or k in toggles)


def cell_recipe(recipe: Recipe, cell: Cell, toggles: set[str]) -> Recipe:
    """``recipe`` with the cell's plugins switched and settings applied."""
    switched = [(k, v) for k, v in cell.settings if k in toggles]
    with_plugins = [k for k, v in switched if v == ON and recipe.plugin(k) is None]
    without_plugins = [k for k, v in switched if v == OFF and recipe.plugin(k) is not None]
    assignments = [f"{k}={v}" for k, v in cell.settings if k not in toggles]
    return apply_overrides(recipe, assignments, with_plugins, without_plugins)


def chosen_ablation(
    recipe_name: str, module: types.ModuleType, vary: Sequence[str], **changes: Any
) -> Ablation:
    """The ablation a command asks for: the ``--vary`` factors, else the one declared beside
    the recipe (``ablation = Ablation(...)``), with the options given (None: unchanged)."""
    factors = [Factor.parse(text) for text in vary]
    declared = getattr(module, "ablation", None)
    if factors:
        ablation = Ablation(vary=factors)
    elif isinstance(declared, Ablation):
        ablation = declared
    else:
        raise HooktrainError(
            f"Say what to vary, e.g. --vary grad_clip=on,off; the recipe {recipe_name!r} "
            "declares no ablation of its own."
        )
    return attrs.evolve(ablation, **{k: v for k, v in changes.items() if v is not None})

"""Settings and bad input, thrown at random (hypothesis): what is valid is accepted, every
mistake is exit code 2 and one sentence.

Recipe and plugin settings are checked against a table written here from the README's types
and ranges: a valid value is accepted as that value, an invalid one is refused in a sentence
naming the key (``apply_overrides``, fast, so many examples). Random ``--set`` keys and
values and ``--with``/``--without`` plugin names go through ``hooktrain run`` against a
missing data folder: the command must refuse exactly what the recipe level refuses, with the
same sentence, and an accepted command line must get as far as the data (whose sentence then
names the folder). Recipe names and files and broken data folders must end with exit code 2,
one line ``Error: ... .`` on stderr and no traceback; an existing run folder must come out
byte for byte as it went in; valid settings on real data must train. The fuzz runs
derandomized (the same inputs on every run, no example database), so CI is reproducible; the
number of examples tried is printed at the end of the module.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shlex
import shutil
import tempfile
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error, write_cifar_batches
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides, settings_of
from hooktrain.config.recipe import SEED_LIMIT, Recipe, field_names
from hooktrain.config.registry import load_recipe, resolve
from hooktrain.core.plugin import plugin_classes
from hooktrain.data.augment import RandomCrop
from hooktrain.data.device import CIFAR10_CLASSES
from hooktrain.data.sources import load_cifar10
from hooktrain.errors import HooktrainError

FLAGSHIP = "resnet9_cifar10"
# 20 of the images in batches of 5: 4 steps, the fewest the one-cycle schedule accepts, so an
# intact folder really trains with these (test_tiny_settings_train_on_the_intact_data checks).
TINY = {
    "model.width": "4",
    "epochs": "1",
    "train_limit": "20",
    "batch_size": "5",
    "compile": "false",
    "metrics.tensorboard": "false",
}
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Examples tried, by test: the whole module's total is printed at the end.
TRIED: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_count(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not TRIED:
        return
    counts = ", ".join(f"{name} {count}" for name, count in TRIED.items())
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\ntest_fuzz_cli: {TRIED.total()} fuzzed examples ({counts})")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from tmp_path, so a default `runs/` folder could only appear there."""
    monkeypatch.chdir(tmp_path)


def invoke(*args: str | Path) -> Result:
    argv = [str(arg) for arg in args]
    note(f"hooktrain {shlex.join(argv)}")
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    TRIED[test] += 1
    return CliRunner().invoke(main, argv)


def fresh_folder(tmp_path: Path, name: str = "case") -> Path:
    """A new folder for one example (hypothesis reuses a test's tmp_path for all of them)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path))


# ---------------------------------------------------------------------------------------------
# Strategies

RECIPE_FIELDS = field_names(Recipe)
PLUGIN_SETTINGS = sorted(
    f"{name}.{field}" for name, cls in plugin_classes().items() for field in field_names(cls)
)
PLUGIN_NAMES = sorted(plugin_classes())

# Names for the folders and files these tests create: no line breaks (a message naming an
# existing folder or image with a line break in its name would still break its line).
NAME_CHARS = st.characters(exclude_categories=["C", "Zl", "Zp"], exclude_characters="/")
file_names = st.text(NAME_CHARS, min_size=1, max_size=16).filter(lambda s: s not in (".", ".."))

# Any text, with the characters that break a message's line or a KEY=VALUE's parsing made common.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
SPECIAL = LINE_BREAKS + "\t\x00 .=,'\"\\"


def texts(max_size: int) -> st.SearchStrategy[str]:
    return st.text(
        st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIAL)), max_size=max_size
    )


def broken_lines(max_size: int) -> st.SearchStrategy[str]:
    """Text with a line break inside: it must not break the one line of a message."""
    parts = texts(max_size // 2)
    return st.builds("{}{}{}".format, parts, st.sampled_from(LINE_BREAKS), parts)


numbers = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),  # nan, inf, -0.0, 5e-324, 1.7976931348623157e+308
    st.sampled_from(["0", "-1", "1e400", "-inf", "0x10", "1_000", "١٢", "+3", " 7 ", "1e3"]),
)
tuples = st.lists(st.one_of(numbers, texts(4)), max_size=4).map(",".join)
values = st.one_of(
    texts(24),
    broken_lines(24),
    numbers,
    tuples,
    st.sampled_from(
        [
            *["", "none", "null", "None", "true", "off", "maybe", "adam", "rmsprop", "zeros"],
            *["(0.9,0.99)", "[0.9, 0.99]", "0.9,", ",", "a=b", "=", "é", "\n", "\x00", "🙂"],
        ]
    ),
)
keys = st.one_of(
    st.sampled_from(RECIPE_FIELDS),
    st.sampled_from(PLUGIN_SETTINGS),
    st.sampled_from(
        ["name", "plugins", "epoch", "gradclip.max", "grad_clip.", ".max", "ema.decay"]
    ),
    texts(16),
    st.from_regex(r"[a-z_]{0,10}\.[a-z_.]{0,10}", fullmatch=True),
    st.builds("{}.{}".format, texts(8), texts(8)),
    st.builds("{}.{}".format, broken_lines(8), texts(8)),
    broken_lines(16),
)
key_values = st.builds(lambda key, value: f"{key}={value}", keys, values)
# Three in four are KEY=VALUE: a list of --set stops at its first bad one.
assignments = st.one_of(key_values, key_values, key_values, texts(24))
plugin_names = st.one_of(
    st.sampled_from(PLUGIN_NAMES),
    st.sampled_from(["Metrics", "grad-clip", "gradclip", "hooktrain.plugins.ema:EMA", "", " "]),
    texts(16),
    broken_lines(16),
)


def typed_values(annotation: Any) -> st.SearchStrategy[str]:
    """Text for a field of this type: mostly well-formed, often out of range."""
    origin = get_origin(annotation)
    if origin is Literal:
        return st.one_of(st.sampled_from([str(a) for a in get_args(annotation)]), values)
    if origin is not None and type(None) in get_args(annotation):  # Optional
        inner = next(a for a in get_args(annotation) if a is not type(None))
        return st.one_of(st.just("none"), typed_values(inner))
    if origin is tuple:
        size = len(get_args(annotation))
        items = st.one_of(st.floats().map(repr), st.integers(-2, 2).map(str))
        return st.lists(items, min_size=size - 1, max_size=size + 1).map(",".join)
    if annotation is bool:
        return st.sampled_from(["true", "false", "on", "off", "1", "0", "yes", "maybe"])
    if annotation is int:
        return st.one_of(st.integers(-3, 40), st.integers()).map(str)
    if annotation is float:
        return st.one_of(st.floats(-2, 2), st.floats()).map(repr)
    return values


RECIPE_TYPES = typing.get_type_hints(Recipe)
# Fields the tiny settings (given last) fix anyway, or that only slow a run down.
UNFUZZED = {*TINY, "eval_batch_size"}
typed_assignments = st.sampled_from([f for f in RECIPE_FIELDS if f not in UNFUZZED]).flatmap(
    lambda key: typed_values(RECIPE_TYPES[key]).map(lambda value: f"{key}={value}")
)


# Valid values, from the README's types and ranges: (text, the value it means). Each key's
# strategy draws only values the recipe must accept.
Valid = st.SearchStrategy[tuple[str, Any]]


def whole(low: int, high: int) -> Valid:
    return st.integers(low, high).map(lambda n: (str(n), n))


def real(low: float, high: float, *, above: bool = False) -> Valid:
    """Floats in [low, high), or (low, high) if ``above``, in the shortest text that is them."""
    numbers = st.floats(low, high, exclude_min=above, exclude_max=True)
    return numbers.map(lambda x: (repr(x), x))


def choice(*names: str) -> Valid:
    return st.sampled_from(names).map(lambda name: (name, name))


def several(item: Valid, count: int) -> Valid:
    parts = st.lists(item, min_size=count, max_size=count)
    return parts.map(lambda items: (",".join(t for t, _ in items), tuple(v for _, v in items)))


BOOLEAN = st.sampled_from(
    [(t, True) for t in ("true", "on", "yes", "1", "True")]
    + [(t, False) for t in ("false", "off", "no", "0", "FALSE")]
)
COUNT = whole(1, 10**9)
VALID_RECIPE: dict[str, Valid] = {
    "model": choice("resnet9"),  # a new reference: its arguments go back to the defaults
    "data": choice("cifar10"),
    # Chains of the flagship's pieces that keep crop and normalize (and so their settings).
    "augment": choice("crop,flip,normalize", "crop,normalize").map(
        lambda pair: (pair[0], tuple(pair[1].split(",")))
    ),
    "task": choice("classification"),
    "tta_flip": BOOLEAN,
    "epochs": COUNT,
    "batch_size": COUNT,
    "optimizer": choice("adam", "adamw", "sgd"),
    "max_lr": real(0, 1e9, above=True),
    "betas": several(real(0, 1), 2),
    "eps": real(0, 1e9, above=True),
    "momentum": real(0, 1),
    "nesterov": BOOLEAN,
    "train_limit": st.one_of(st.just(("none", None)), COUNT),
    "val_split": real(0, 1),
    "eval_batch_size": COUNT,
    "eval_every": COUNT,
    "precision": choice("auto", "fp32", "bf16"),
    "memory_format": choice("auto", "contiguous", "channels_last"),
    "compile": BOOLEAN,
    "compile_mode": choice("default", "max-autotune-no-cudagraphs"),
    "seed": whole(-SEED_LIMIT, SEED_LIMIT),
}
POSITIVE = real(0, 1e9, above=True)
# Arguments of the flagship's references (model, augmentation pieces): --set model.width=...
VALID_ARGS: dict[str, Valid] = {
    "model.width": COUNT,
    "model.dropout": real(0, 1),
    "model.conv_bias": BOOLEAN,
    "model.logit_scale": POSITIVE,
    "augment.crop.size": st.one_of(st.just(("none", None)), COUNT),
    "augment.crop.pad": whole(0, 10**9),
    "augment.crop.mode": choice("reflect", "zeros"),
    "augment.normalize.mean": several(real(-1e9, 1e9), 3),
    "augment.normalize.std": several(POSITIVE, 3),
    "task.top_k": COUNT,
}
VALID_PLUGIN: dict[str, Valid] = {
    "onecycle.pct_start": real(0, 1, above=True),
    "onecycle.div_factor": POSITIVE,
    "onecycle.final_div_factor": POSITIVE,
    "onecycle.anneal": choice("cos", "linear"),
    "onecycle.three_phase": BOOLEAN,
    "weight_decay.rate": real(0, 1e9),
    "weight_decay.mode": choice("auto", "coupled", "decoupled"),
    "weight_decay.include": several(choice("*.weight", "0.*", "[0-9].?.bias"), 2),
    "weight_decay.exclude": several(choice("*.bias", "6.3.*"), 1),
    "grad_clip.max": POSITIVE,
    "grad_clip.mode": choice("value", "norm"),
    "label_smoothing.smoothing": real(0, 1),
    "checkpoint.every": COUNT,
    "checkpoint.every_steps": whole(0, 10**9),
    "checkpoint.best_by": choice("auto", "test_accuracy", "test_loss", "test_top5"),
    "ema.decay": real(0, 1),
    "ema.every": COUNT,
    "nan_guard.check_every": COUNT,
    "data_parallel.bucket_mb": real(0, 2**20, above=True),
    "data_parallel.sync_batchnorm": BOOLEAN,
    "metrics.log_every": COUNT,
    "metrics.tensorboard": BOOLEAN,
    "metrics.progress": BOOLEAN,
    "mixup.alpha": POSITIVE,
    "cutmix.alpha": POSITIVE,
    "lion.betas": several(real(0, 1), 2),
    "lookahead.k": COUNT,
    "lookahead.alpha": real(0, 1, above=True),
    "sam.rho": POSITIVE,
    "grad_accumulation.micro_batches": COUNT,
    "early_stopping.metric": choice("auto", "test_loss", "test_accuracy"),
    "early_stopping.patience": COUNT,
    "early_stopping.min_delta": real(0, 1e9),
    "swa.start": real(0, 1),
    "lookahead.ramp_power": st.one_of(st.just(("none", None)), POSITIVE),
    "lookahead.end_on_slow": BOOLEAN,
    "whitening.layer": choice("whiten", "0.0"),
    "whitening.images": COUNT,
    "whitening.eps": POSITIVE,
    "freeze.include": several(choice("whiten.bias", "*.bias"), 1),
    "freeze.epochs": whole(0, 10**9),
    "freeze.ramp": BOOLEAN,
    "bias_lr.scale": POSITIVE,
    "bias_lr.include": several(choice("*norm*.bias", "head.weight"), 2),
    "bias_lr.keep_decay": BOOLEAN,
    "triangle.start": real(0, 1e9),
    "triangle.peak_at": real(0, 1),
    "triangle.end": real(0, 1e9),
    "multi_crop.level": whole(0, 2),
    "multi_crop.shift": COUNT,
    "muon.momentum": real(0, 1),
    "muon.nesterov": BOOLEAN,
    "muon.steps": COUNT,
    "muon.lr_scale": POSITIVE,
    "muon.include": several(choice("*.weight", "*conv*"), 1),
}
# Plugins the flagship lacks: the library-level tests add them with --with.
EXTRA_PLUGINS = ["label_smoothing", "ema", "mixup", "cutmix", "lion", "lookahead", "sam"]
EXTRA_PLUGINS += ["grad_accumulation", "early_stopping", "swa", "whitening", "freeze", "bias_lr"]
EXTRA_PLUGINS += ["triangle", "multi_crop", "muon"]


def assignment_of(table: dict[str, Valid]) -> st.SearchStrategy[tuple[str, str, Any]]:
    """(key, text, value) of a valid assignment drawn from ``table``."""
    return st.sampled_from(sorted(table)).flatmap(
        lambda key: table[key].map(lambda pair: (key, *pair))
    )


valid_assignments = assignment_of({**VALID_RECIPE, **VALID_ARGS}).map(lambda kv: f"{kv[0]}={kv[1]}")
valid_plugin_assignments = assignment_of(
    {k: v for k, v in VALID_PLUGIN.items() if k.partition(".")[0] not in EXTRA_PLUGINS}
).map(lambda kv: f"{kv[0]}={kv[1]}")

# Invalid values by kind of field, each wrong for every field of that kind.
NOT_A_NUMBER = ["", "x", "nan", "NaN", "1e400", "-inf", "0x10", "1,2", "true", "🙂"]
INVALID_BY_KIND = {
    "count": [*NOT_A_NUMBER, "0", "-1", "1.5", "-7"],
    "unit": [*NOT_A_NUMBER, "1", "1.0", "-0.1", "2"],
    "positive": [*NOT_A_NUMBER, "0", "-0.0", "-1e-9"],
    "boolean": ["", "maybe", "2", "truee", "none", "-1"],
    "choice": ["", "rmsprop", "ADAM", "none", "cos,linear", "0"],
    # A reference's argument is checked against its type here and against its range when the
    # run builds the model or piece: only what is no number at all is refused up front.
    "argument": ["", "x", "nan", "NaN", "0x10", "1,2", "true", "🙂"],
}
INVALID_KEYS = {
    "epoch": "epochs",
    "lr": None,
    "gradclip.max": None,
    "grad_clip.maxx": "grad_clip.max",
    "onecycle.pct": "onecycle.pct_start",
}
KIND_OF = {
    "count": ["epochs", "batch_size", "eval_batch_size", "eval_every", "checkpoint.every",
              "nan_guard.check_every", "metrics.log_every", "ema.every", "lookahead.k",
              "grad_accumulation.micro_batches", "early_stopping.patience", "whitening.images",
              "muon.steps", "multi_crop.shift"],
    "unit": ["val_split", "momentum", "label_smoothing.smoothing", "ema.decay", "swa.start",
             "muon.momentum", "triangle.peak_at"],
    "positive": ["max_lr", "eps", "grad_clip.max", "onecycle.div_factor", "mixup.alpha",
                 "cutmix.alpha", "sam.rho", "bias_lr.scale", "whitening.eps", "muon.lr_scale"],
    "boolean": ["model.conv_bias", "tta_flip", "nesterov", "compile",
                "metrics.progress", "onecycle.three_phase", "freeze.ramp",
                "lookahead.end_on_slow", "bias_lr.keep_decay", "muon.nesterov"],
    "choice": ["optimizer", "augment.crop.mode", "precision", "memory_format", "grad_clip.mode"],
    "argument": ["model.width", "model.dropout", "model.logit_scale", "augment.crop.pad"],
}  # fmt: skip
invalid_assignments = st.sampled_from(sorted(KIND_OF)).flatmap(
    lambda kind: st.tuples(st.sampled_from(KIND_OF[kind]), st.sampled_from(INVALID_BY_KIND[kind]))
)


REFERENCES = ("model", "data", "task")


def setting_of(recipe: Recipe, key: str) -> Any:
    """The value of a recipe field, a reference's argument (``model.width``,
    ``augment.crop.pad``) or a plugin's setting (``plugin.field``); a reference by its label."""
    if key in REFERENCES:
        return getattr(recipe, key).label
    if key == "augment":
        return tuple(piece.label for piece in recipe.augment)
    head, _, rest = key.partition(".")
    if head in REFERENCES:
        return getattr(recipe, head).args[rest]
    if head == "augment":
        label, _, argument = rest.partition(".")
        piece = recipe.piece(label)
        assert piece is not None, key
        return piece.args[argument]
    name, _, field = key.rpartition(".")
    owner = recipe.plugin(name) if name else recipe
    assert owner is not None, key
    return getattr(owner, field)


def final_settings(chosen: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """What each key ends as: a later --set of a key wins, and a new reference
    (``model=resnet9``) drops the arguments set before it."""
    final: dict[str, Any] = {}
    for key, _, value in chosen:
        if key in REFERENCES:
            final = {k: v for k, v in final.items() if not k.startswith(f"{key}.")}
        final.pop(key, None)
        final[key] = value
    return final


# ---------------------------------------------------------------------------------------------
# Settings, plugins and recipes: exit 2 before any training


def test_the_tables_cover_every_setting() -> None:
    """A new field or plugin setting must get its valid values written down here."""
    assert sorted(VALID_RECIPE) == sorted(RECIPE_FIELDS)
    assert sorted(VALID_PLUGIN) == PLUGIN_SETTINGS
    recipe = load_recipe(FLAGSHIP)
    arguments = [
        *(
            f"{field}.{name}"
            for field in REFERENCES
            for name in settings_of(resolve(field, getattr(recipe, field).factory))
        ),
        *(
            f"augment.{piece.label}.{name}"
            for piece in recipe.augment
            for name in settings_of(resolve("augment", piece.factory))
        ),
    ]
    assert sorted(VALID_ARGS) == sorted(arguments)


@settings(FUZZ, max_examples=400)
@given(
    chosen=st.lists(
        st.one_of(assignment_of({**VALID_RECIPE, **VALID_ARGS}), assignment_of(VALID_PLUGIN))
    )
)
def test_valid_settings_are_accepted_as_their_values(chosen: list[tuple[str, str, Any]]) -> None:
    TRIED["test_valid_settings_are_accepted_as_their_values"] += 1
    recipe = apply_overrides(
        load_recipe(FLAGSHIP), [f"{k}={text}" for k, text, _ in chosen], with_plugins=EXTRA_PLUGINS
    )
    for key, value in final_settings(chosen).items():
        assert setting_of(recipe, key) == value, key


@settings(FUZZ, max_examples=300)
@given(
    before=st.lists(assignment_of({**VALID_RECIPE, **VALID_ARGS}), max_size=2),
    bad=st.one_of(
        invalid_assignments,
        st.tuples(st.sampled_from(sorted(INVALID_KEYS)), st.sampled_from(["1", "0.1", "x"])),
    ),
)
def test_invalid_settings_are_refused_naming_the_key(
    before: list[tuple[str, str, Any]], bad: tuple[str, str]
) -> None:
    TRIED["test_invalid_settings_are_refused_naming_the_key"] += 1
    key, text = bad
    sets = [*(f"{k}={t}" for k, t, _ in before), f"{key}={text}"]
    with pytest.raises(HooktrainError) as info:
        apply_overrides(load_recipe(FLAGSHIP), sets, with_plugins=EXTRA_PLUGINS)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.endswith("."), message
    assert key in message, message
    if INVALID_KEYS.get(key):
        assert f"Did you mean {INVALID_KEYS[key]!r}?" in message


def recipe_verdict(
    sets: Sequence[str], with_: Sequence[str] = (), without: Sequence[str] = ()
) -> str | None:
    """What the recipe level says of these overrides: None (accepted) or its sentence."""
    try:
        apply_overrides(load_recipe(FLAGSHIP), sets, with_plugins=with_, without_plugins=without)
    except HooktrainError as error:
        return " ".join(str(error).splitlines())
    return None


def assert_cli_agrees(result: Result, verdict: str | None, out: Path) -> None:
    """Refused as the recipe level refuses, or accepted and stopped by the missing data."""
    line = assert_user_error(result)
    if verdict is None:
        assert line.startswith("Error: Data folder ") and "no-data" in line, line
    else:
        assert line == f"Error: {verdict}"
    assert not out.exists()  # no run folder was started


@settings(FUZZ, max_examples=200)
@given(
    sets=st.lists(st.one_of(assignments, valid_assignments), min_size=1, max_size=4),
    seed=st.one_of(st.none(), st.integers()),
)
def test_random_settings(tmp_path: Path, sets: list[str], seed: int | None) -> None:
    out = tmp_path / "out"
    args = [arg for text in sets for arg in ("--set", text)]
    args += [] if seed is None else ["--seed", str(seed)]
    result = invoke("run", FLAGSHIP, *args, "--data-dir", tmp_path / "no-data", "--out", out)
    verdict = recipe_verdict([*sets, *([] if seed is None else [f"seed={seed}"])])
    assert_cli_agrees(result, verdict, out)


@settings(FUZZ, max_examples=100)
@given(
    with_=st.lists(plugin_names, max_size=3),
    without=st.lists(plugin_names, max_size=3),
    sets=st.lists(
        st.one_of(
            st.builds("{}={}".format, st.sampled_from(PLUGIN_SETTINGS), values),
            valid_plugin_assignments,
        ),
        max_size=2,
    ),
)
def test_random_plugin_switches(
    tmp_path: Path, with_: list[str], without: list[str], sets: list[str]
) -> None:
    out = tmp_path / "out"
    args = [arg for name in with_ for arg in ("--with", name)]
    args += [arg for name in without for arg in ("--without", name)]
    args += [arg for text in sets for arg in ("--set", text)]
    result = invoke("run", FLAGSHIP, *args, "--data-dir", tmp_path / "no-data", "--out", out)
    assert_cli_agrees(result, recipe_verdict(sets, with_, without), out)


recipe_names = st.one_of(
    texts(24),
    st.sampled_from(["resnet9_cifar", "RESNET9_CIFAR10", "resnet9_cifar10 ", "resnet9", "-", ""]),
    st.sampled_from([".py", "missing.py", "/no/such/dir/r.py", "recipes", "r.PY", "r.py/"]),
    texts(16).map(lambda stem: f"{stem}.py"),
    broken_lines(16).map(lambda stem: f"{stem}.py"),
)


@settings(FUZZ, max_examples=100)
@given(name=recipe_names)
def test_random_recipe_names(tmp_path: Path, name: str) -> None:
    # A name that starts with '-' is an option to click, not a recipe; click's own usage
    # errors are several lines (reported, cli.py's to fix).
    assume(not name.startswith("-") or name == "-")
    result = invoke("run", name, "--data-dir", tmp_path / "no-data", "--out", tmp_path / "out")
    assert_user_error(result)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs").exists()


BROKEN_RECIPES = [
    "recipe = (",
    "import no_such_module_for_hooktrain",
    "raise RuntimeError('a\\nmultiline\\nfailure')",
    "recipe = 5",
    "from hooktrain.config.recipe import Recipe\nrecipe = Recipe(name='x', epochs=0)",
    "from hooktrain.config.recipe import Recipe\nrecipe = Recipe(name='x', no_field=1)",
    "from hooktrain.config.recipe import Recipe\nrecipe = Recipe()",
    "from hooktrain.config.recipe import Recipe\nRecipe = 1\nrecipe = Recipe",
    "1 / 0",
    "x = undefined_name",
    "\tindented = True",
    "",
    "# only a comment",
]


@settings(FUZZ, max_examples=60)
@given(
    stem=file_names,
    content=st.one_of(
        st.sampled_from(BROKEN_RECIPES),
        st.text(max_size=40),
        st.binary(max_size=40),
    ),
)
def test_broken_recipe_files(tmp_path: Path, stem: str, content: str | bytes) -> None:
    path = fresh_folder(tmp_path, "recipe") / f"{stem}.py"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = invoke("run", path, "--data-dir", tmp_path / "no-data", "--out", tmp_path / "out")
    assert_user_error(result)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Broken data folders: the tiny settings would train in a second, the data must stop them


@pytest.fixture(scope="module")
def jpeg_cifar(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs, 3 per class for training and 1 per class for testing."""
    folder = tmp_path_factory.mktemp("jpeg_cifar")
    for split, count in (("train", 3), ("test", 1)):
        for name in CIFAR10_CLASSES:
            (folder / split / name).mkdir(parents=True)
            for image in sorted((cifar_dir / split / name).iterdir())[:count]:
                shutil.copyfile(image, folder / split / name / image.name)
    return folder


@pytest.fixture(scope="module")
def pickled_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data set in the official cifar-10-batches-py format."""
    return write_cifar_batches(tmp_path_factory.mktemp("pickled_cifar"), n_train=30, n_test=10)


def tiny_run(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """`hooktrain run` with `extra` first and the tiny settings last, where they win."""
    tail = [*TINY_ARGS, "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out)]
    return ["run", FLAGSHIP, *extra, *tail]


@pytest.mark.parametrize("data", ["jpeg_cifar", "pickled_cifar"])
def test_tiny_settings_train_on_the_intact_data(
    tmp_path: Path, request: pytest.FixtureRequest, data: str
) -> None:
    """The broken copies below fail because they are broken, not because of the settings."""
    args = tiny_run(request.getfixturevalue(data), tmp_path / "out")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output


def any_image(folder: Path, data: st.DataObject, split: str | None = None) -> Path:
    split = split or data.draw(st.sampled_from(["train", "test"]), label="split")
    name = data.draw(st.sampled_from(CIFAR10_CLASSES), label="class")
    return data.draw(st.sampled_from(sorted((folder / split / name).iterdir())), label="image")


def write_image(path: Path, size: tuple[int, int], data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(["RGB", "L", "RGBA", "P"]), label="mode")
    image = Image.new(mode, size, color=data.draw(st.integers(0, 255), label="color"))
    form = {".png": "PNG", ".gif": "GIF", ".webp": "WEBP"}.get(path.suffix, "JPEG")
    (image.convert("RGB") if form == "JPEG" else image).save(path, format=form)


def break_folder(kind: str, folder: Path, data: st.DataObject) -> Path:
    """Damage a copy of the intact image folders in one way; return what --data-dir gets."""
    split = data.draw(st.sampled_from(["train", "test"]), label="split")
    if kind == "one split only":
        shutil.rmtree(folder / split)
    elif kind == "images without class folders":
        for image in list((folder / split).glob("*/*")):
            image.rename(folder / split / f"{image.parent.name}-{image.name}")
        for name in CIFAR10_CLASSES:
            (folder / split / name).rmdir()
    elif kind == "one level too deep":
        return data.draw(st.sampled_from([folder / split, folder / split / "cat"]))
    elif kind == "nested one level":
        inner = folder / data.draw(file_names, label="inner")
        inner.mkdir()
        for name in ("train", "test"):
            (folder / name).rename(inner / name)
    elif kind == "class folders at the top":
        shutil.rmtree(folder / "test")
        for path in list((folder / "train").iterdir()):
            path.rename(folder / path.name)
        (folder / "train").rmdir()
    elif kind == "corrupt jpeg":
        image = any_image(folder, data)
        content = image.read_bytes()
        damage = data.draw(st.sampled_from(["truncate", "replace", "text"]), label="damage")
        if damage == "truncate":
            content = content[: data.draw(st.integers(0, len(content) - 1), label="length")]
        elif damage == "replace":
            content = data.draw(st.binary(min_size=1, max_size=200), label="bytes")
        else:
            content = data.draw(st.text(min_size=1, max_size=100), label="text").encode()
        image.write_bytes(content)
    elif kind == "wrong image size":
        size = data.draw(
            st.tuples(st.integers(1, 64), st.integers(1, 64)).filter(lambda s: s != (32, 32)),
            label="size",
        )
        suffix = data.draw(st.sampled_from([".jpg", ".jpeg", ".png", ".gif", ".webp"]))
        replace = data.draw(st.booleans(), label="replace an image")
        target = any_image(folder, data) if replace else folder / split / "cat" / f"odd{suffix}"
        write_image(target.with_suffix(suffix), size, data)
        if replace and target.suffix != suffix:
            target.unlink()
    elif kind == "extra label folder":
        name = data.draw(file_names.filter(lambda s: s not in CIFAR10_CLASSES), label="label")
        where = data.draw(st.sampled_from([["train"], ["test"], ["train", "test"]]))
        for part in where:
            (folder / part / name).mkdir()
            shutil.copyfile(any_image(folder, data, part), folder / part / name / "0000.jpg")
    elif kind == "missing label folder":
        name = data.draw(st.sampled_from(CIFAR10_CLASSES), label="label")
        for part in data.draw(st.sampled_from([["train"], ["test"], ["train", "test"]])):
            shutil.rmtree(folder / part / name)
    elif kind == "class folder without images":
        name = data.draw(st.sampled_from(CIFAR10_CLASSES), label="label")
        for image in list((folder / split / name).iterdir()):
            image.unlink()
        if data.draw(st.booleans(), label="leave a non-image"):
            (folder / split / name / "README.txt").write_text("no images here\n")
    elif kind == "not an image":
        suffix = data.draw(st.sampled_from([".jpg", ".jpeg", ".png", ".gif", ".webp", ".JPG"]))
        content = data.draw(
            st.one_of(st.binary(max_size=100), st.text(max_size=60).map(str.encode))
        )
        (folder / split / "dog" / f"notes{suffix}").write_bytes(content)
    elif kind == "dangling link":
        (folder / split / "frog" / "gone.jpg").symlink_to(folder / "no-such-file.jpg")
    elif kind == "link loop":
        (folder / split / "frog" / "again").symlink_to(folder / split / "frog")
    else:
        raise AssertionError(kind)
    return folder


IMAGE_DAMAGE = [
    "one split only",
    "images without class folders",
    "one level too deep",
    "nested one level",
    "class folders at the top",
    "corrupt jpeg",
    "wrong image size",
    "extra label folder",
    "missing label folder",
    "class folder without images",
    "not an image",
    "dangling link",
    "link loop",
]


@settings(FUZZ, max_examples=150)
@given(kind=st.sampled_from(["missing", "empty", *IMAGE_DAMAGE]), data=st.data())
def test_broken_image_folders(tmp_path: Path, jpeg_cifar: Path, kind: str, data: Any) -> None:
    case = fresh_folder(tmp_path)
    folder = case / "data"
    if kind == "missing":  # as typed, so line breaks too (NUL cannot be in a real argv)
        name = data.draw(st.one_of(file_names, broken_lines(16)), label="name")
        data_dir = case / (name.replace("/", "").replace("\x00", "") or "x")
    elif kind == "empty":
        data_dir = folder
        folder.mkdir()
    else:
        shutil.copytree(jpeg_cifar, folder, symlinks=True)
        data_dir = break_folder(kind, folder, data)
    out = case / "out"
    line = assert_user_error(invoke(*tiny_run(data_dir, out)))
    # The data is what the sentence is about (a path with a line break in it comes quoted).
    assert str(data_dir) in line or repr(str(data_dir)) in line
    assert not out.exists()


BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@settings(FUZZ, max_examples=60)
@given(
    name=st.sampled_from(BATCH_FILES),
    damage=st.sampled_from(["truncate", "truncate", "remove", "replace"]),
    data=st.data(),
)
def test_broken_batch_files(
    tmp_path: Path, pickled_cifar: Path, name: str, damage: str, data: Any
) -> None:
    folder = fresh_folder(tmp_path) / "data"
    shutil.copytree(pickled_cifar, folder)
    path = folder / "cifar-10-batches-py" / name
    content = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(content[: data.draw(st.integers(0, len(content) - 1), label="length")])
    elif damage == "remove":
        path.unlink()
    else:
        wrong = data.draw(
            st.sampled_from(
                [[1, 2], {b"data": [1, 2]}, {b"labels": []}, {}, "text", None, {b"label_names": 5}]
            ),
            label="content",
        )
        path.write_bytes(pickle.dumps(wrong, protocol=data.draw(st.integers(2, 5))))
    out = folder.parent / "out"
    line = assert_user_error(invoke(*tiny_run(folder, out)))
    assert str(folder) in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Settings that survive parsing, on real data: train or fail in one sentence, never a traceback


# Valid settings that also train in a second on 20 images: the tiny settings (given last) fix
# the size of the run; rates, scales and pads stay where 4 steps cannot diverge or outgrow the
# 32-pixel images. Compiling would take a minute.
TRAINABLE: dict[str, Valid] = {
    **{
        k: v
        for k, v in {**VALID_RECIPE, **VALID_ARGS}.items()
        if k not in {*TINY, "eval_batch_size", "compile"}
    },
    "model.logit_scale": real(0.01, 10),
    "max_lr": real(1e-6, 0.1),
    "eps": real(1e-12, 1),
    # None or 3 to 9 of the 30 training images held out: 20 are still there to train on.
    "val_split": st.sampled_from([("0", 0.0), ("0.1", 0.1), ("0.2", 0.2), ("0.3", 0.3)]),
    "augment.crop.size": st.sampled_from([("none", None), ("32", 32)]),
    "augment.crop.pad": whole(0, 8),
    "augment.normalize.mean": several(real(-1, 1), 3),
    "augment.normalize.std": several(real(0.1, 10), 3),
    "task.top_k": whole(1, 10),
}


def saved_setting(saved: dict[str, Any], key: str) -> Any:
    """A setting as config.json holds it: references as {factory, label, args}, in lists."""
    if key in REFERENCES:
        return saved[key]["label"]
    if key == "augment":
        return [piece["label"] for piece in saved["augment"]]
    head, _, rest = key.partition(".")
    if head in REFERENCES:
        return saved[head]["args"][rest]
    if head == "augment":
        label, _, argument = rest.partition(".")
        piece = next(piece for piece in saved["augment"] if piece["label"] == label)
        return piece["args"][argument]
    return saved[key]


# Each example trains for up to a second: a failure is reported unshrunk, its command line noted.
@settings(FUZZ, max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(chosen=st.lists(assignment_of(TRAINABLE), min_size=1, max_size=3))
def test_valid_settings_train_on_real_data(
    tmp_path: Path, jpeg_cifar: Path, chosen: list[tuple[str, str, Any]]
) -> None:
    out = fresh_folder(tmp_path) / "out"
    args = [arg for key, text, _ in chosen for arg in ("--set", f"{key}={text}")]
    result = invoke(*tiny_run(jpeg_cifar, out, *args))
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    saved = json.loads((out / "config.json").read_text())["recipe"]
    for key, value in final_settings(chosen).items():
        assert saved_setting(saved, key) == (list(value) if isinstance(value, tuple) else value), (
            key
        )


# ---------------------------------------------------------------------------------------------
# An existing run folder is never written without --overwrite


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime under root (links not followed)."""
    state: dict[str, tuple[bytes | None, int]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        state[str(path.relative_to(root))] = (content, stat.st_mtime_ns)
    return state


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text('{"recipe": {"name": "resnet9_cifar10"}}\n')
    (folder / "checkpoints" / "last.pt").write_bytes(os.urandom(256))
    (folder / "notes.txt").write_text("keep me\n")
    (tmp_path / "link-to-run").symlink_to(folder)
    return folder


@settings(FUZZ, max_examples=60)
@given(
    sets=st.lists(st.one_of(assignments, typed_assignments), max_size=3),
    spelling=st.sampled_from(
        ["absolute", "relative", "./relative", "trailing /", "/.", "..", "link"]
    ),
)
def test_existing_run_folder_is_untouched(
    tmp_path: Path, jpeg_cifar: Path, run_folder: Path, sets: list[str], spelling: str
) -> None:
    before = snapshot(run_folder)
    out = {
        "absolute": str(run_folder),
        "relative": "run",  # the tests run from tmp_path
        "./relative": "./run",
        "trailing /": f"{run_folder}/",
        "/.": f"{run_folder}/.",
        "..": f"{run_folder}/checkpoints/..",
        "link": str(tmp_path / "link-to-run"),
    }[spelling]
    args = [arg for text in sets for arg in ("--set", text)]
    # Tiny settings and real data: if the folder were not refused, a run would really start.
    assert_user_error(invoke(*tiny_run(jpeg_cifar, Path(out), *args)))
    assert snapshot(run_folder) == before


# ---------------------------------------------------------------------------------------------
# What the fuzzing found, pinned as plain tests


@pytest.mark.parametrize("seed", [SEED_LIMIT + 1, -SEED_LIMIT - 1, 99999999999999999999999])
def test_seed_out_of_torch_range_is_refused(seed: int) -> None:
    with pytest.raises(HooktrainError, match=f"seed must be between .* not {seed}"):
        apply_overrides(load_recipe(FLAGSHIP), [f"seed={seed}"])
    assert apply_overrides(load_recipe(FLAGSHIP), [f"seed={SEED_LIMIT}"]).seed == SEED_LIMIT
    torch.Generator().manual_seed(SEED_LIMIT + 1_000_003)  # the data generator's offset fits


@pytest.mark.parametrize("assignment", ["max_lr=nan", "eps=NaN", "grad_clip.max=nan"])
def test_nan_is_not_a_number(assignment: str) -> None:
    key, _, value = assignment.partition("=")
    with pytest.raises(HooktrainError, match=f"{key} must be a .*number.*, not '{value}'"):
        apply_overrides(load_recipe(FLAGSHIP), [assignment])
    # Infinity stays a number: grad_clip.max=inf means no clipping.
    clip = apply_overrides(load_recipe(FLAGSHIP), ["grad_clip.max=inf"]).plugin("grad_clip")
    assert clip is not None
    assert clip.max == float("inf")


@pytest.mark.parametrize(
    ("assignments", "without", "fragment"),
    [
        (["a\nb.max=1"], [], "--set 'a\\nb.max': there is no plugin 'a\\nb'"),
        ([], ["grad_clip\n"], "--without 'grad_clip\\n':"),
        ([], ["nope"], "--without nope:"),  # printable names are shown as typed
    ],
)
def test_messages_stay_on_one_line(assignments: list[str], without: list[str], fragment: str):
    with pytest.raises(HooktrainError) as info:
        apply_overrides(load_recipe(FLAGSHIP), assignments, without_plugins=without)
    assert fragment in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("recipe = (", "failed to run (SyntaxError: '(' was never closed"),
        ("import no_such_module_for_hooktrain", "ModuleNotFoundError: No module named"),
        (
            "x = 1\nraise RuntimeError('one\\ntwo')",
            "failed to run at line 2 (RuntimeError: one two)",
        ),
        ("from hooktrain import Recipe\nrecipe = Recipe(name='r', nope=1)", "TypeError: "),
    ],
)
def test_recipe_file_that_fails_to_run(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "mine.py"
    path.write_text(content)
    with pytest.raises(HooktrainError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert message.startswith(f"The recipe file {path} failed to run")
    assert fragment in message
    assert message.endswith("; fix it and try again.")
    assert len(message.splitlines()) == 1
    assert isinstance(info.value.__cause__, Exception)  # the original error stays attached


def test_recipe_path_with_a_newline_is_quoted(tmp_path: Path) -> None:
    with pytest.raises(HooktrainError, match=r"The recipe file '.*a\\nb.py' does not exist"):
        load_recipe(str(tmp_path / "a\nb.py"))


def write_image_folders(folder: Path) -> None:
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (folder / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(folder / split / name / "0.png")


def test_dangling_link_among_images(tmp_path: Path) -> None:
    write_image_folders(tmp_path / "data")
    link = tmp_path / "data" / "train" / "cat" / "gone.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(HooktrainError, match=r"Cannot read .*gone\.jpg \(No such file"):
        load_cifar10(tmp_path / "data")


def test_link_loop_among_images(tmp_path: Path) -> None:
    write_image_folders(tmp_path / "data")
    (tmp_path / "data" / "test" / "dog" / "loop").symlink_to(tmp_path / "data" / "test" / "dog")
    with pytest.raises(HooktrainError, match=r"Cannot read .*loop.*; remove or replace it\."):
        load_cifar10(tmp_path / "data")


def test_batch_file_asking_for_absurd_memory(tmp_path: Path) -> None:
    batches = write_cifar_batches(tmp_path / "data", n_train=10, n_test=5) / "cifar-10-batches-py"
    # Protocol 4 starts with a FRAME opcode and its 8-byte length: claim 2**62 bytes.
    (batches / "batches.meta").write_bytes(b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b".")
    with pytest.raises(HooktrainError, match=r"batches\.meta is malformed \("):
        load_cifar10(tmp_path / "data")


@pytest.mark.parametrize("pad", [32, 1000, 2**62])
def test_zero_padding_as_wide_as_the_image_is_refused(pad: int) -> None:
    with pytest.raises(HooktrainError, match=f"Padding of {pad} pixels .* use a pad below 32"):
        RandomCrop(pad=pad, mode="zeros").output_shape((32, 32, 3))
    assert RandomCrop(pad=31, mode="zeros").output_shape((32, 32, 3)) == (32, 32, 3)


def test_missing_data_folder_with_a_line_break_is_quoted(tmp_path: Path) -> None:
    with pytest.raises(HooktrainError, match=r"Data folder '.*a\\nb' does not exist") as info:
        load_cifar10(tmp_path / "a\nb")
    assert len(str(info.value).splitlines()) == 1

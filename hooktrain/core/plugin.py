"""Plugins: the base class, discovery through entry points, and the plugin manager."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

import attrs
import pluggy

from hooktrain.core import hookspecs
from hooktrain.errors import HooktrainError

PLUGIN_GROUP = "hooktrain.plugins"

BUILTIN_PLUGINS = {
    "onecycle": "hooktrain.plugins.onecycle:OneCycle",
    "weight_decay": "hooktrain.plugins.weight_decay:WeightDecay",
    "grad_clip": "hooktrain.plugins.grad_clip:GradClip",
    "label_smoothing": "hooktrain.plugins.label_smoothing:LabelSmoothing",
    "checkpoint": "hooktrain.plugins.checkpoint:Checkpoint",
    "ema": "hooktrain.plugins.ema:EMA",
    "nan_guard": "hooktrain.plugins.nan_guard:NanGuard",
    "data_parallel": "hooktrain.plugins.data_parallel:DataParallel",
    "metrics": "hooktrain.plugins.metrics:Metrics",
    "mixup": "hooktrain.plugins.mixup:MixUp",
    "cutmix": "hooktrain.plugins.cutmix:CutMix",
    "lion": "hooktrain.plugins.lion:Lion",
    "lookahead": "hooktrain.plugins.lookahead:Lookahead",
    "sam": "hooktrain.plugins.sam:SAM",
    "grad_accumulation": "hooktrain.plugins.grad_accumulation:GradAccumulation",
    "early_stopping": "hooktrain.plugins.early_stopping:EarlyStopping",
    "swa": "hooktrain.plugins.swa:SWA",
    "whitening": "hooktrain.plugins.whitening:Whitening",
    "freeze": "hooktrain.plugins.freeze:Freeze",
    "bias_lr": "hooktrain.plugins.bias_lr:BiasLR",
    "triangle": "hooktrain.plugins.triangle:Triangle",
    "multi_crop": "hooktrain.plugins.multi_crop:MultiCrop",
    "muon": "hooktrain.plugins.muon:Muon",
}


@attrs.define(kw_only=True)
class Plugin:
    """Base class of plugins: an attrs class whose fields are its settings.

    Subclasses set ``default_name``; an instance's ``name`` keys its settings on the command
    line (``--set NAME.FIELD=VALUE``) and its state in checkpoints, so two instances of one
    plugin class need different names. Methods marked ``@hookimpl`` implement the hooks of
    :mod:`hooktrain.core.hookspecs`.
    """

    default_name: ClassVar[str] = ""
    main_process_only: ClassVar[bool] = False
    """Under torchrun, whether the plugin's events run only in the main process (rank 0):
    set it for plugins that write files or print. Build hooks run in every process."""
    name: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.name:
            self.name = self.default_name or type(self).__name__.lower()

    def settings(self) -> dict[str, Any]:
        """The plugin's settings (its init fields), as given to its constructor."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(type(self)) if f.init}

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints; empty for plugins whose behaviour follows the step."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


def check_saved_tensors(
    plugin: Plugin, saved: dict[str, Any], model: dict[str, Any], *, every_name: bool = True
) -> None:
    """Refuse in a sentence a plugin's saved tensors (restored from a checkpoint) that are not
    the model's: names (all of them with ``every_name``, else some), shapes and dtypes."""
    names_fit = saved.keys() == model.keys() if every_name else saved.keys() <= model.keys()
    if not names_fit or any(
        t.shape != model[n].shape or t.dtype != model[n].dtype for n, t in saved.items()
    ):
        raise HooktrainError(
            f"The saved state of the plugin {plugin.name!r} does not fit this model's "
            "parameters; use the checkpoint with the recipe and settings that wrote it."
        )


def patterns(default: tuple[str, ...]) -> Any:  # an attrs field
    """A setting of shell-style name patterns: a tuple of strings. A bare string, which would
    be read letter by letter (``"*"`` matching everything), is refused in a sentence."""
    return setting(
        default,
        lambda v: isinstance(v, tuple) and all(isinstance(p, str) for p in v),
        "a tuple of name patterns, e.g. ('*.bias',) (a single pattern needs the comma)",
    )


def setting(
    default: Any, allowed: Callable[[Any], bool], requirement: str
) -> Any:  # an attrs field
    """A plugin setting whose values must pass ``allowed``; others are refused in a sentence.

    ``requirement`` completes "NAME.FIELD must be ...", e.g. ``"at least 1"``.
    """

    def check(instance: Plugin, attribute: attrs.Attribute, value: Any) -> None:
        if not allowed(value):
            name = instance.name or instance.default_name
            raise HooktrainError(
                f"{name}.{attribute.name} must be {requirement}, not {value!r}; set another "
                f"value with --set {name}.{attribute.name}=VALUE."
            )

    return attrs.field(default=default, validator=check)


def import_object(path: str) -> Any:
    """The object at ``"package.module:attribute"``."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def class_path(cls: type) -> str:
    """``"package.module:Class"``, the inverse of :func:`import_object` for classes."""
    return f"{cls.__module__}:{cls.__qualname__}"


def plugin_classes() -> dict[str, type[Plugin]]:
    """Every plugin class by name: the built-in ones, then those of installed packages."""
    classes: dict[str, type[Plugin]] = {
        name: import_object(path) for name, path in BUILTIN_PLUGINS.items()
    }
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            classes[entry.name] = entry.load()
        except Exception as error:  # a broken third-party package must not hide the rest
            raise HooktrainError(
                f"The plugin {entry.name!r} (entry point {entry.value}) failed to import "
                f"({type(error).__name__}: {error}); fix or uninstall the package that provides it."
            ) from error
    return classes


def make_plugin(kind: str, settings: dict[str, Any] | None = None) -> Plugin:
    """An instance of the plugin class registered as ``kind``."""
    classes = plugin_classes()
    if kind not in classes:
        raise HooktrainError(
            f"Unknown plugin {kind!r}; `hooktrain list` shows the installed ones "
            f"({', '.join(sorted(classes))})."
        )
    return classes[kind](**(settings or {}))


def make_plugin_manager(plugins: Sequence[Plugin]) -> pluggy.PluginManager:
    """A plugin manager with ``plugins`` registered so hooks call them in the given order."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    names = [plugin.name for plugin in plugins]
    for name in names:
        if names.count(name) > 1:
            raise HooktrainError(
                f"Two plugins are named {name!r}; give one a different name "
                f"(e.g. {name}_2) so their settings and checkpoint state stay apart."
            )
    try:
        # pluggy calls the most recently registered implementation first.
        for plugin in reversed(plugins):
            manager.register(plugin, name=plugin.name)
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        name = getattr(error.plugin, "name", type(error.plugin).__name__)
        raise HooktrainError(
            f"The plugin {name!r} does not fit hooktrain's hooks ({error}); see "
            "hooktrain/core/hookspecs.py for the hook names and their arguments."
        ) from error
    return manager


def call_order(manager: pluggy.PluginManager, hook_name: str) -> list[str]:
    """The names of the plugins implementing ``hook_name``, in the order they are called."""
    implementations = getattr(manager.hook, hook_name).get_hookimpls()
    return [impl.plugin_name for impl in reversed(implementations)]


def contributions(manager: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[tuple]:
    """``(plugin name, result)`` of every plugin that answers a build hook, in call order."""
    results = []
    for impl in reversed(getattr(manager.hook, hook_name).get_hookimpls()):
        result = impl.function(*(kwargs[arg] for arg in impl.argnames))
        if result is not None:
            results.append((impl.plugin_name, result))
    return results


def chained(
    manager: pluggy.PluginManager, hook_name: str, value_name: str, value: Any, **kwargs: Any
) -> Any:
    """``value`` passed through every plugin answering ``hook_name`` in call order: each
    receives the previous answer as ``value_name`` (None keeps it)."""
    for impl in reversed(getattr(manager.hook, hook_name).get_hookimpls()):
        arguments = {**kwargs, value_name: value}
        result = impl.function(*(arguments[arg] for arg in impl.argnames))
        if result is not None:
            value = result
    return value


def implemented(manager: pluggy.PluginManager, hook_name: str) -> bool:
    """Whether any plugin implements ``hook_name``."""
    return bool(getattr(manager.hook, hook_name).get_hookimpls())


def sole_contribution(manager: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> Any:
    """The one answer to a *one claimant* build hook, None if no plugin answers."""
    answers = contributions(manager, hook_name, **kwargs)
    if len(answers) > 1:
        claimants = " and ".join(repr(name) for name, _ in answers)
        what = hook_name.removeprefix("hooktrain_").replace("_", " ")
        raise HooktrainError(
            f"Plugins {claimants} both provide the {what}; keep one of them "
            f"(e.g. --without {answers[-1][0]})."
        )
    return answers[0][1] if answers else None

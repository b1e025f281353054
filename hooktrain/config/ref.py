"""References: how a recipe names its model, data, augmentation pieces and task.

A :class:`Ref` is a factory and the keyword arguments to call it with. The factory is a name in
the registry (``"resnet9"``, built in or installed through an entry point), an import path
(``"mypackage.models:small_cnn"``) or a callable (one defined in the recipe file). Nothing is
called until the run is built, so a recipe stays data: it can be printed, overridden with dotted
keys (``--set model.width=16``) and written to config.json.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs


def _frozen(value: Any) -> Any:
    """Lists as tuples, recursively, so a reference read back from JSON equals the original."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    return value


@attrs.frozen(init=False, repr=False)
class Ref:
    """A factory and its keyword arguments: ``Ref("resnet9", width=64)``.

    ``label`` names the reference in dotted keys (``augment.crop.pad``) and defaults to the
    factory's own name; :meth:`named` gives another (two cutouts in one chain, say).
    """

    factory: str | Callable[..., Any]
    args: Mapping[str, Any]
    label: str

    def __init__(self, factory: str | Callable[..., Any], /, **args: Any) -> None:
        self.__attrs_init__(
            factory, {key: _frozen(value) for key, value in args.items()}, _default_label(factory)
        )

    def named(self, label: str) -> Ref:
        """This reference under another label."""
        return _ref(self.factory, self.args, label)

    def with_args(self, **changes: Any) -> Ref:
        """This reference with some arguments changed or added."""
        changed = {**self.args, **{key: _frozen(value) for key, value in changes.items()}}
        return _ref(self.factory, changed, self.label)

    def __repr__(self) -> str:
        factory = self.factory if isinstance(self.factory, str) else _callable_path(self.factory)
        args = "".join(f", {key}={value!r}" for key, value in self.args.items())
        label = "" if self.label == _default_label(self.factory) else f".named({self.label!r})"
        return f"Ref({factory!r}{args}){label}"


def _ref(factory: str | Callable[..., Any], args: Mapping[str, Any], label: str) -> Ref:
    ref = object.__new__(Ref)
    ref.__attrs_init__(factory, args, label)
    return ref


def _default_label(factory: str | Callable[..., Any]) -> str:
    if isinstance(factory, str):
        return factory.rpartition(":")[2].rpartition(".")[2]
    return getattr(factory, "__name__", type(factory).__name__)


def _callable_path(factory: Callable[..., Any]) -> str:
    return f"{factory.__module__}:{factory.__qualname__}"


def parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """The factory's keyword parameters (a class's are its constructor's)."""
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: it takes what it takes
        return {}


def takes_any_keyword(factory: Callable[..., Any]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters(factory).values())

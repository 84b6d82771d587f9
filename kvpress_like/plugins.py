"""The plugin manager and the registry of parts, methods and architecture adapters built from it.

The architecture adapters are looked up here too (:func:`get_adapter`, :func:`window_queries`, …).
Built-in parts, methods and adapters are plugins like any other: the modules in ``BUILTIN_PLUGINS`` are
registered first, then every entry point of the group ``kvpress_like`` is loaded. Third-party
code may also call :func:`register_plugin` at run time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

from kvpress_like import hookspecs
from kvpress_like.adapters import ModelAdapter
from kvpress_like.errors import DuplicateRegistrationError, UnknownNameError, UnsupportedModelError
from kvpress_like.methods_spec import MethodSpec
from kvpress_like.parts import PART_BASES, Part

BUILTIN_PLUGINS = (
    "kvpress_like.adapters",
    "kvpress_like.windows",
    "kvpress_like.allocators",
    "kvpress_like.selection",
    "kvpress_like.scorers.attention",
    "kvpress_like.scorers.accumulated",
    "kvpress_like.scorers.critical",
    "kvpress_like.scorers.expected_attention",
    "kvpress_like.scorers.simple",
    "kvpress_like.methods.full",
    "kvpress_like.methods.dapq",
    "kvpress_like.methods.dapq_pyramid",
    "kvpress_like.methods.snapkv",
    "kvpress_like.methods.pyramidkv",
    "kvpress_like.methods.h2o",
    "kvpress_like.methods.tova",
    "kvpress_like.methods.knorm",
    "kvpress_like.methods.random",
    "kvpress_like.methods.streaming_llm",
    "kvpress_like.methods.expected_attention",
    "kvpress_like.methods.critical",
    "kvpress_like.methods.ada",
    "kvpress_like.methods.chunked",
    "kvpress_like.methods.dapq_plus",
    "kvpress_like.methods.kvzip",
    "kvpress_like.scorers.keydiff",
    "kvpress_like.scorers.lagkv",
    "kvpress_like.scorers.cur",
    "kvpress_like.scorers.non_causal",
    "kvpress_like.scorers.cap",
    "kvpress_like.methods.keydiff",
    "kvpress_like.methods.lagkv",
    "kvpress_like.methods.cur",
    "kvpress_like.methods.observed_attention",
    "kvpress_like.methods.non_causal_attention",
    "kvpress_like.methods.cap",
    "kvpress_like.scorers.learned",
    "kvpress_like.methods.kvzap",
)

_REGISTRATION_HOOKS = {
    "window": "register_window_builders",
    "scorer": "register_scorers",
    "allocator": "register_allocators",
    "selector": "register_selectors",
}


@dataclass
class Registry:
    """Name → class for each kind of part, name → spec for methods, architecture adapters by name and by
    ``config.model_type``, and who registered each."""

    parts: dict[str, dict[str, type[Part]]] = field(default_factory=lambda: {k: {} for k in PART_BASES})
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    architectures: dict[str, type[ModelAdapter]] = field(default_factory=dict)
    adapters: dict[str, type[ModelAdapter]] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, kind: str, name: str, item: Any, plugin: str) -> None:
        tables = {"method": self.methods, "architecture": self.architectures, "model_type": self.adapters}
        table = tables[kind] if kind in tables else self.parts[kind]
        if name in table:
            raise DuplicateRegistrationError(
                f"{_KIND_LABEL.get(kind, kind)} {name!r} is registered twice: by plugin {self.owners[(kind, name)]!r} "
                f"and by plugin {plugin!r}; rename one of them or unregister a plugin"
            )
        table[name] = item
        self.owners[(kind, name)] = plugin

    def part_class(self, kind: str, name: str) -> type[Part]:
        try:
            return self.parts[kind][name]
        except KeyError:
            raise UnknownNameError(_KIND_LABEL[kind], name, list(self.parts[kind])) from None

    def method(self, name: str) -> MethodSpec:
        try:
            return self.methods[name]
        except KeyError:
            raise UnknownNameError("method", name, list(self.methods)) from None


_KIND_LABEL = {
    "window": "window builder", "scorer": "scorer", "allocator": "allocator", "selector": "selector",
    "architecture": "architecture adapter", "model_type": "model type",
}

_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None
_extra_plugins: list[tuple[object, str | None]] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-ins, entry points, then run-time registrations."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(hookspecs.PROJECT)
        manager.add_hookspecs(hookspecs)
        for module_name in BUILTIN_PLUGINS:
            manager.register(importlib.import_module(module_name), name=module_name)
        manager.load_setuptools_entrypoints(hookspecs.PROJECT)
        for plugin, name in _extra_plugins:
            manager.register(plugin, name=name)
        _manager = manager
    return _manager


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin (a module or object with ``@hookimpl`` functions) for this process."""
    global _registry
    _extra_plugins.append((plugin, name))
    if _manager is not None:
        _manager.register(plugin, name=name)
    _registry = None


def unregister_plugin(plugin: object) -> None:
    """Undo :func:`register_plugin`."""
    global _registry
    _extra_plugins[:] = [(p, n) for p, n in _extra_plugins if p is not plugin]
    if _manager is not None and _manager.is_registered(plugin):
        _manager.unregister(plugin)
    _registry = None


def get_registry() -> Registry:
    """The registry built from every plugin's registration hooks (cached until plugins change)."""
    global _registry
    if _registry is None:
        _registry = _build_registry(get_plugin_manager())
    return _registry


def _build_registry(manager: pluggy.PluginManager) -> Registry:
    registry = Registry()
    for kind, hook_name in _REGISTRATION_HOOKS.items():
        for plugin_name, classes in _call_each(manager, hook_name):
            for cls in classes:
                _check_part_class(kind, cls, plugin_name)
                registry.add(kind, cls.name, cls, plugin_name)
    for plugin_name, specs in _call_each(manager, "register_methods"):
        for spec in specs:
            registry.add("method", spec.name, spec, plugin_name)
    for plugin_name, classes in _call_each(manager, "register_adapters"):
        for cls in classes:
            _check_adapter_class(cls, plugin_name)
            registry.add("architecture", cls.name, cls, plugin_name)
            for model_type in cls.model_types:
                registry.add("model_type", model_type, cls, plugin_name)
    return registry


def _call_each(manager: pluggy.PluginManager, hook_name: str):
    """Call a hook implementation by implementation, so duplicates can name their plugin."""
    for impl in reversed(getattr(manager.hook, hook_name).get_hookimpls()):
        yield impl.plugin_name, impl.function() or []


def _check_part_class(kind: str, cls: object, plugin_name: str) -> None:
    base = PART_BASES[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"plugin {plugin_name!r} registered {cls!r} as a {kind}, but it is not a {base.__name__}")


def _check_adapter_class(cls: object, plugin_name: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise TypeError(
            f"plugin {plugin_name!r} registered {cls!r} as an adapter, but it is not a ModelAdapter subclass"
        )
    missing = [attr for attr in ("name", "label", "model_types") if not getattr(cls, attr, None)]
    if missing:
        raise TypeError(f"adapter {cls.__name__} of plugin {plugin_name!r} does not set {', '.join(missing)}")
    if isinstance(cls.model_types, str):
        raise TypeError(f"adapter {cls.__name__} of plugin {plugin_name!r}: model_types must be a tuple of strings")


# ------------------------------------------------------------------------------------------------
# Architecture adapters, looked up in the registry
# ------------------------------------------------------------------------------------------------


def adapter_class(model_type: object, what: str = "this model") -> type[ModelAdapter]:
    """The registered adapter of ``model_type``, or :class:`UnsupportedModelError` naming every registered one."""
    adapters = _registered()
    if model_type not in adapters:
        families: dict[str, list[str]] = {}
        for registered, cls in sorted(adapters.items()):
            families.setdefault(cls.label, []).append(registered)
        supported = ", ".join(f"{label} ({', '.join(types)})" for label, types in sorted(families.items()))
        raise UnsupportedModelError(
            f"{what} (model_type={model_type!r}) is not supported; supported architectures: {supported}; "
            "a new family needs an architecture adapter plugin (docs/plugins.md, 'Adding an architecture')"
        )
    return adapters[model_type]


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(model_type, type(model).__name__)(model)


def _module_adapter(module: torch.nn.Module) -> type[ModelAdapter]:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return adapter_class(model_type, f"attention module {type(module).__name__}")


def project_queries(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries ``[batch, q_heads, rows, head_dim]`` of an attention ``module``, through its adapter."""
    return _module_adapter(module).project_queries(module, hidden_states)


def window_queries(
    module: torch.nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Post-RoPE queries ``[batch, q_heads, rows, head_dim]`` of an attention ``module``, through its adapter."""
    return _module_adapter(module).window_queries(module, hidden_states, cos, sin)


def supported_model_types() -> dict[str, str]:
    """``model_type -> label`` of every registered adapter."""
    return {model_type: cls.label for model_type, cls in _registered().items()}


def _registered() -> dict[str, type[ModelAdapter]]:
    return get_registry().adapters

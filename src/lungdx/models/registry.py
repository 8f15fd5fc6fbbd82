"""Model registry: ``@register_model`` on a factory, ``create_model(name, **kwargs)`` to build one.

Every registered model maps a ``(N, 1, H, W)`` float tensor to ``(N, 1)`` logits and declares
``gradcam_layer``, the dotted name of the module whose activations explain its decision.
Every factory accepts ``input_size`` (the square input side in pixels); models that work at any
size may ignore it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory`` under its function name; registering a name twice raises."""
    name = factory.__name__
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered")
    _REGISTRY[name] = factory
    return factory


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``."""
    if name not in _REGISTRY:
        known = ", ".join(list_models()) or "none"
        raise ValueError(f"unknown model '{name}' (registered: {known})")
    return _REGISTRY[name](**kwargs)


def localises(name: str) -> bool:
    """True for a registered model that also says where the nodule is (its factory is marked ``localises``)."""
    return bool(getattr(_REGISTRY.get(name), "localises", False))


def assembled(name: str) -> bool:
    """True for a registered model built from finished runs (``nodule_ensemble``), which ``train`` refuses."""
    return bool(getattr(_REGISTRY.get(name), "assembled", False))


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)

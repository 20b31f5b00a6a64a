"""Which table describes a model: the registry (tables/__init__.py), else the generic fallback."""

from __future__ import annotations

from .generic import generic_family
from .spec import Family
from .tables import REGISTRY


def _sub_type(cfg, key: str) -> str | None:
    return getattr(getattr(cfg, key, None), "model_type", None)


def detect_family(model) -> Family:
    """The table for ``model`` (exact class name first, then its base classes; the sub-config model
    types must be ones the table accepts), or a generic description found by module names."""
    text_type, vision_type = _sub_type(model.config, "text_config"), _sub_type(model.config, "vision_config")
    names = [cls.__name__ for cls in type(model).__mro__]
    for candidates in ([names[0]], names[1:]):
        for entry in REGISTRY:
            if entry.model_class in candidates and entry.accepts(text_type, vision_type):
                return entry.family
    return generic_family(model)


__all__ = ["detect_family"]

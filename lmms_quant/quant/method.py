"""What a quantization method is, in one small interface; the methods themselves are one file each.

A method module (``rtn.py``, ``gptq.py``, ``awq.py``) declares:

- ``Config``: a frozen dataclass deriving from `MethodConfig`, whose fields are declared with `option`
  (the model_args key, the default, the parser). It is the method's part of a `Recipe`.
- ``NEEDS_HESSIAN`` / ``NEEDS_INPUTS``: what calibration must collect for it (the sum of x x^T per
  Linear; or the Linear's input tokens themselves).
- optionally ``module_calls(unit) -> [module name]``: modules whose calibration calls (arguments and
  keyword arguments per batch) the method replays; they arrive in ``stats.calls`` (AWQ's parent search).
- ``quantize_unit(unit, stats, cfg) -> (results, notes)``: quantize the selected Linears of one unit
  (a block, or a set of non-block Linears) given the collected statistics; ``results[name]`` is a
  `LayerResult`, ``notes`` free-form records for the report (AWQ's folds). It leaves the targets'
  module weights as it found them: the caller records each result against them, then writes.

The registry that finds a method by name is `recipe.METHODS`: adding a method is one file plus one line there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lmms_quant.values import BadValue, format_value


class RecipeError(BadValue):
    """A recipe key with a bad value (or an unknown key); the message names key, value and valid choices."""


def option(key: str, default: Any, parse: Callable[[str, Any], Any], fmt: Callable[[Any], str] = format_value):
    """A method setting: its model_args ``key``, default, ``parse(key, value)`` and canonical spelling."""
    return dataclasses.field(default=default, metadata={"key": key, "parse": parse, "fmt": fmt})


class MethodConfig:
    """Base of every method's ``Config`` dataclass: parsing and spelling driven by the `option` fields."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.metadata["key"] for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, given: Mapping[str, Any]):
        values = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["key"]
            if key in given:
                values[f.name] = f.metadata["parse"](key, given[key])
        return cls(**values)

    def to_model_args(self) -> dict[str, str]:
        return {f.metadata["key"]: f.metadata["fmt"](getattr(self, f.name)) for f in dataclasses.fields(self)}


class Method(Protocol):
    """The module-level interface of one method file."""

    Config: type
    NEEDS_HESSIAN: bool
    NEEDS_INPUTS: bool

    def quantize_unit(self, unit, stats, cfg) -> tuple[dict, list[dict]]: ...


__all__ = ["Method", "MethodConfig", "RecipeError", "option"]

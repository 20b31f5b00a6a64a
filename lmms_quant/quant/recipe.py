"""The recipe: what the user asked for, parsed once and validated before any model is loaded.

A `Recipe` comes from lmms-eval ``model_args`` values, a sweep grid entry or Python, through
`Recipe.parse`; everything downstream (wrappers, engine, cache, sweep, leaderboard) reads its typed
parts and never the raw keys again:

- ``method``: fp16 (no quantization) | rtn | gptq | awq  [fp16]; its settings are ``recipe.config``,
  the method's own ``Config`` dataclass (`GPTQConfig`: damp, act_order, block_size; `AWQConfig`:
  awq_grid, awq_clip; `RTNConfig`: none). Methods are found by name in `METHODS`.
- ``recipe.selection`` (`Selection`): ``component`` vit | connector | llm | all or '+'-joined [all]
  (aliases qformer/projector → connector, vision → vit, language_model/lm → llm); ``bits`` 2..8 or 16 =
  leave in floating point [4], overridden per component by ``vit_bits``, ``connector_bits``,
  ``llm_bits``; ``layer_group`` front | middle | end | all ('+'-joinable; thirds of each block stack);
  ``layer_type`` attn | mlp | all (cross-attention counts as attn); ``include`` lm_head [none].
- ``recipe.grid`` (`Grid`): ``granularity`` tensor (alias uniform: the paper's per-tensor min-max) |
  channel | group [follows group_size: -1 → channel]; ``group_size`` -1 or a positive int [128];
  ``sym`` [false: asymmetric with an integer zero-point].
- ``recipe.calib`` (`Calibration`): ``calib`` = synthetic | hf:<path>[:<name>]:<split> | a local
  .txt (text only: a sample per line or paragraph) or parquet/json/jsonl/csv file or save_to_disk
  directory — image+text, or text only without an image column [synthetic] (its `CalibSource`, whose
  file is checked here, cheaply); ``calib_n`` [128]; ``calib_batch_size`` [8]; ``seed`` [0];
  ``calib_style`` chat (the family's prompt format, image+text) | raw (plain text, no image, no
  template: the language model alone) | caption (the image and its text, no prompt) [chat];
  ``report_holdout`` held-out samples for the report's output errors, 0 = none [8]. A text-only
  source or the raw style with vit/connector selected is refused (no image would reach them).

Values may arrive typed the way lmms-eval types them, or as strings (see `lmms_quant.values`). Every
bad key or value is a `RecipeError` naming the key, the value and the valid choices.
``to_model_args()`` spells every resolved setting canonically (equal recipes give equal dicts, and
parsing it gives the recipe back); ``digest()`` is 12 hex characters of that spelling.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from lmms_quant.values import bad, format_value, is_unset, parse_bool, parse_int, parse_positive_int

from .calib_source import CalibSource
from .method import MethodConfig, RecipeError

# The registry: method name -> the module that implements it (see method.py). fp16 is "no method".
METHODS = {
    "rtn": "lmms_quant.quant.rtn",
    "gptq": "lmms_quant.quant.gptq",
    "awq": "lmms_quant.quant.awq",
}
NO_METHOD = "fp16"

COMPONENTS = ("vit", "connector", "llm")
COMPONENT_ALIASES = {
    "qformer": "connector", "projector": "connector", "vision": "vit", "vision_tower": "vit",
    "language_model": "llm", "lm": "llm",
}
LAYER_GROUPS = ("front", "middle", "end")
LAYER_TYPES = ("attn", "mlp")
GRANULARITIES = ("tensor", "channel", "group")
GRANULARITY_ALIASES = {"uniform": "tensor", "per_tensor": "tensor", "per_channel": "channel", "per_group": "group"}
INCLUDES = ("lm_head",)
BITS_CHOICES = (2, 3, 4, 5, 6, 7, 8, 16)
FP_BITS = 16
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128

SELECTION_KEYS = ("bits", "vit_bits", "connector_bits", "llm_bits", "component", "layer_group", "layer_type", "include")
GRID_KEYS = ("granularity", "group_size", "sym")
CALIB_KEYS = ("calib", "calib_n", "calib_batch_size", "seed", "calib_style", "report_holdout")
CALIB_STYLES = ("chat", "raw", "caption")
DEFAULT_REPORT_HOLDOUT = 8


def method_module(name: str):
    """The module implementing method ``name`` (see method.py for its interface)."""
    if name not in METHODS:
        raise bad("method", name, ", ".join((NO_METHOD,) + tuple(METHODS)), error=RecipeError)
    return importlib.import_module(METHODS[name])


@lru_cache(maxsize=None)
def method_keys() -> dict[str, tuple[str, ...]]:
    """Method name -> the model_args keys of its Config."""
    return {name: method_module(name).Config.keys() for name in METHODS}


def recipe_keys() -> tuple[str, ...]:
    """Every key a recipe reads, in documentation order."""
    keys = ("method",) + SELECTION_KEYS + GRID_KEYS
    for names in method_keys().values():
        keys += tuple(k for k in names if k not in keys)
    return keys + CALIB_KEYS


# --------------------------------------------------------------------------- value parsers


def _bits(key: str, value) -> int:
    valid = "2, 3, 4, 5, 6, 7, 8, or 16 (leave in floating point)"
    bits = parse_int(key, value, valid, RecipeError)
    if bits not in BITS_CHOICES:
        raise bad(key, value, valid, error=RecipeError)
    return bits


def _names(key: str, value, choices: tuple[str, ...], aliases: Mapping[str, str], allow_all: bool) -> tuple[str, ...]:
    """A '+'-joined (or JSON list) selection of names in canonical order; () means "all"."""
    shown = ", ".join(choices + tuple(aliases) + (("all",) if allow_all else ()))
    valid = f"one of {shown}, or several joined by '+'"
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        spelled = value.strip()
        if spelled.startswith("["):
            try:
                parts = json.loads(spelled)
            except json.JSONDecodeError:
                raise bad(key, value, valid, "not a JSON list", RecipeError) from None
            if not isinstance(parts, list):
                raise bad(key, value, valid, error=RecipeError)
        else:
            parts = spelled.split("+")
    else:
        raise bad(key, value, valid, f"a {type(value).__name__}", RecipeError)
    names = []
    for part in parts:
        if not isinstance(part, str):
            raise bad(key, value, valid, error=RecipeError)
        name = aliases.get(part.strip().lower(), part.strip().lower())
        if allow_all and name == "all":
            if len(parts) != 1:
                raise bad(key, value, valid, "'all' cannot be combined", RecipeError)
            return ()
        if name not in choices:
            raise bad(key, value, valid, f"unknown name {part!r}", RecipeError)
        if name in names:
            raise bad(key, value, valid, f"{name!r} given twice", RecipeError)
        names.append(name)
    if not names:
        raise bad(key, value, valid, "empty", RecipeError)
    return tuple(n for n in choices if n in names)


def _joined(names: tuple[str, ...], every: tuple[str, ...]) -> str:
    return "all" if names == every else "+".join(names)


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Selection:
    """Where to quantize: components and their bits, layer groups and types, explicitly included heads."""

    components: tuple[str, ...] = ()  # as named; () = every component the model has
    vit_bits: int = DEFAULT_BITS
    connector_bits: int = DEFAULT_BITS
    llm_bits: int = DEFAULT_BITS
    layer_groups: tuple[str, ...] = LAYER_GROUPS
    layer_types: tuple[str, ...] = LAYER_TYPES
    include: tuple[str, ...] = ()

    def bits_for(self, component: str) -> int:
        return {"vit": self.vit_bits, "connector": self.connector_bits, "llm": self.llm_bits}[component]

    def targets(self, available: Iterable[str]) -> tuple[str, ...]:
        """The components to quantize in a model that has ``available`` components."""
        available = tuple(available)
        wanted = self.components or available
        return tuple(c for c in COMPONENTS if c in wanted and c in available and self.bits_for(c) != FP_BITS)

    def describe_layers(self) -> str:
        return (f"layer_group={_joined(self.layer_groups, LAYER_GROUPS)}, "
                f"layer_type={_joined(self.layer_types, LAYER_TYPES)}")

    @classmethod
    def parse(cls, given: Mapping) -> "Selection":
        bits = _bits("bits", given.get("bits", DEFAULT_BITS))
        per_component = {c: _bits(f"{c}_bits", given[f"{c}_bits"]) for c in COMPONENTS if f"{c}_bits" in given}
        named = _names("component", given.get("component", "all"), COMPONENTS, COMPONENT_ALIASES, allow_all=True)
        for comp in per_component:
            if named and comp not in named:
                raise RecipeError(
                    f"{comp}_bits={given[f'{comp}_bits']!r} is invalid with component={given['component']!r} "
                    f"(that component is not selected); valid: add {comp} to component, or drop {comp}_bits")
        resolved = {c: per_component.get(c, bits) for c in COMPONENTS}
        selected = named or COMPONENTS
        if all(resolved[c] == FP_BITS for c in selected):
            raise RecipeError(
                f"bits={bits!r} is invalid: every selected component ({'+'.join(selected)}) is left at 16 bits, "
                f"so nothing would be quantized; valid: bits 2..8 for at least one component, or method=fp16")
        if named:
            # Naming a component and giving it 16 bits is the same recipe as not naming it; components
            # not named stay in floating point whatever `bits` says.
            named = tuple(c for c in named if resolved[c] != FP_BITS)
            resolved = {c: (resolved[c] if c in named else FP_BITS) for c in COMPONENTS}
        include = _names("include", given["include"], INCLUDES, {}, allow_all=False) if "include" in given else ()
        return cls(
            components=named, vit_bits=resolved["vit"], connector_bits=resolved["connector"],
            llm_bits=resolved["llm"],
            layer_groups=_names("layer_group", given.get("layer_group", "all"), LAYER_GROUPS, {}, True) or LAYER_GROUPS,
            layer_types=_names("layer_type", given.get("layer_type", "all"), LAYER_TYPES, {}, True) or LAYER_TYPES,
            include=include,
        )

    def to_model_args(self) -> dict[str, str]:
        args = {"component": "+".join(self.components) if self.components else "all"}
        for comp in self.components or COMPONENTS:
            args[f"{comp}_bits"] = str(self.bits_for(comp))
        return args

    def layers_to_model_args(self) -> dict[str, str]:
        return {"layer_group": _joined(self.layer_groups, LAYER_GROUPS),
                "layer_type": _joined(self.layer_types, LAYER_TYPES),
                "include": "+".join(self.include) if self.include else "none"}


@dataclass(frozen=True)
class Grid:
    """The integer grid every selected weight goes on (its bits come from the selection)."""

    granularity: str = "group"
    group_size: int = DEFAULT_GROUP_SIZE  # -1 unless granularity == "group"
    sym: bool = False

    def for_bits(self, bits: int):
        """The per-layer `QuantGrid` at ``bits``."""
        from .quantizer import QuantGrid

        return QuantGrid(bits=bits, sym=self.sym, granularity=self.granularity,
                         group_size=self.group_size if self.granularity == "group" else -1)

    @classmethod
    def parse(cls, given: Mapping) -> "Grid":
        valid_g = "-1 (per output channel) or a positive int such as 32, 64, 128"
        group_size = None
        if "group_size" in given:
            group_size = parse_int("group_size", given["group_size"], valid_g, RecipeError)
            if group_size == 0 or group_size < -1:
                raise bad("group_size", given["group_size"], valid_g, error=RecipeError)
        sym = parse_bool("sym", given["sym"], RecipeError) if "sym" in given else False
        if "granularity" not in given:
            if group_size is None:
                return cls("group", DEFAULT_GROUP_SIZE, sym)
            return cls("channel", -1, sym) if group_size == -1 else cls("group", group_size, sym)
        raw = given["granularity"]
        valid = ", ".join(GRANULARITIES + tuple(GRANULARITY_ALIASES))
        if not isinstance(raw, str):
            raise bad("granularity", raw, valid, error=RecipeError)
        granularity = GRANULARITY_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if granularity not in GRANULARITIES:
            raise bad("granularity", raw, valid, error=RecipeError)
        if granularity == "group":
            if group_size == -1:
                raise bad("group_size", given["group_size"], "a positive int with granularity=group", error=RecipeError)
            return cls("group", group_size or DEFAULT_GROUP_SIZE, sym)
        if group_size not in (None, -1):
            raise RecipeError(
                f"group_size={given['group_size']!r} is invalid with granularity={raw!r} (groups only apply to "
                f"granularity=group); valid: drop group_size, or granularity=group")
        return cls(granularity, -1, sym)

    def to_model_args(self) -> dict[str, str]:
        return {"granularity": self.granularity, "group_size": str(self.group_size), "sym": format_value(self.sym)}


@dataclass(frozen=True)
class Calibration:
    """The calibration data: its source, how many samples, in batches of how many, drawn with which
    seed, in which prompt style, and how many further samples the report's held-out errors use."""

    source: CalibSource = field(default_factory=lambda: CalibSource("synthetic", modality="image+text"))
    n: int = 128
    batch_size: int = 8
    seed: int = 0
    style: str = "chat"
    report_holdout: int = DEFAULT_REPORT_HOLDOUT

    @classmethod
    def parse(cls, given: Mapping) -> "Calibration":
        seed = parse_int("seed", given.get("seed", 0), "an int >= 0", RecipeError)
        if seed < 0:
            raise bad("seed", given.get("seed"), "an int >= 0", error=RecipeError)
        valid_holdout = "an int >= 0 (0: no held-out errors in the report)"
        holdout = parse_int("report_holdout", given.get("report_holdout", DEFAULT_REPORT_HOLDOUT), valid_holdout,
                            RecipeError)
        if holdout < 0:
            raise bad("report_holdout", given.get("report_holdout"), valid_holdout, error=RecipeError)
        style = given.get("calib_style", "chat")
        if not isinstance(style, str) or style.strip().lower() not in CALIB_STYLES:
            raise bad("calib_style", style, ", ".join(CALIB_STYLES), error=RecipeError)
        calib = cls(
            source=CalibSource.parse(given.get("calib", "synthetic")),
            n=parse_positive_int("calib_n", given.get("calib_n", 128), "e.g. 128", RecipeError),
            batch_size=parse_positive_int("calib_batch_size", given.get("calib_batch_size", 8), "e.g. 8", RecipeError),
            seed=seed, style=style.strip().lower(), report_holdout=holdout,
        )
        if calib.style == "caption" and calib.source.text_only:
            raise RecipeError(f"calib_style=caption is invalid with calib={calib.source.spec!r}: the source is text "
                              f"only, and a caption needs its image; valid: calib_style=chat or raw, or an image+text "
                              f"source")
        return calib

    @property
    def text_only(self) -> bool:
        """Whether no image reaches the model: a text-only source, or the raw style (plain text)."""
        return self.source.text_only or self.style == "raw"

    def check_components(self, components: Iterable[str]) -> None:
        """A text-only calibration reaches only the language model: refuse one for vit/connector."""
        visual = [c for c in components if c in ("vit", "connector")]
        if not (self.text_only and visual):
            return
        if self.style == "raw":
            key, value, why = "calib_style", "raw", "the raw style feeds plain text"
        else:
            key, value, why = "calib", self.source.spec, "the source is text only"
        raise RecipeError(f"{key}={value!r} is invalid with component {'+'.join(visual)}: {why}, so no image reaches "
                          f"them; valid: component=llm, or an image+text source with calib_style=chat or caption")

    def to_model_args(self) -> dict[str, str]:
        args = {"calib": self.source.spec, "calib_n": str(self.n), "calib_batch_size": str(self.batch_size),
                "seed": str(self.seed)}
        # Keys added after recipe digests were first pinned are spelled only when not at their default,
        # so every earlier recipe keeps its digest (cache keys, run ids, report names).
        if self.style != "chat":
            args["calib_style"] = self.style
        if self.report_holdout != DEFAULT_REPORT_HOLDOUT:
            args["report_holdout"] = str(self.report_holdout)
        return args


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    """A validated, resolved quantization recipe. Build it with `Recipe.parse`."""

    method: str = NO_METHOD
    selection: Selection = field(default_factory=Selection)
    grid: Grid = field(default_factory=Grid)
    calib: Calibration = field(default_factory=Calibration)
    config: MethodConfig | None = None  # the method's Config; None for fp16

    @classmethod
    def parse(cls, kwargs: Mapping, other_valid_keys: Iterable[str] = ()) -> "Recipe":
        """Validate the recipe keys in ``kwargs``; any key that is neither a recipe key nor in
        ``other_valid_keys`` is an error. ``kwargs`` is not modified; the other keys are ignored."""
        other = tuple(other_valid_keys)
        keys = recipe_keys()
        for key in kwargs:
            if key not in keys and key not in other:
                close = difflib.get_close_matches(str(key), keys + other, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(
                    f"unknown key {key!r} (value {kwargs[key]!r}){hint}; valid quantization keys: "
                    f"{', '.join(keys)}" + (f"; other valid keys: {', '.join(other)}" if other else ""))
        given = {k: v for k, v in kwargs.items() if k in keys and not is_unset(v)}

        method = str(given.get("method", NO_METHOD)).strip().lower()
        if method != NO_METHOD and method not in METHODS:
            raise bad("method", given["method"], ", ".join((NO_METHOD,) + tuple(METHODS)), error=RecipeError)
        if method == NO_METHOD:
            # bits=16 says the same as fp16; anything else would be silently ignored.
            extra = sorted(k for k in given if k != "method" and not (
                k in ("bits", "vit_bits", "connector_bits", "llm_bits") and _bits(k, given[k]) == FP_BITS))
            if extra:
                raise RecipeError(
                    f"{extra[0]}={given[extra[0]]!r} is invalid (method=fp16 quantizes nothing, so "
                    f"{', '.join(extra)} would be ignored); valid: drop it, or choose method from {', '.join(METHODS)}")
            return cls()
        for owner, names in method_keys().items():
            for key in names:
                if key in given and owner != method and key not in method_keys()[method]:
                    raise RecipeError(f"{key}={given[key]!r} is invalid with method={method} (it would be ignored); "
                                      f"valid: only with method={owner}")
        config = method_module(method).Config.parse(given)
        selection = Selection.parse(given)
        calib = Calibration.parse(given)
        calib.check_components(selection.targets(COMPONENTS))
        return cls(method=method, selection=selection, grid=Grid.parse(given), calib=calib, config=config)

    @property
    def is_noop(self) -> bool:
        return self.method == NO_METHOD

    def bits_for(self, component: str) -> int:
        return self.selection.bits_for(component)

    def to_model_args(self) -> dict[str, str]:
        """Every resolved key, canonical and as strings: equal recipes give equal dicts, and
        ``parse(to_model_args())`` gives this recipe back."""
        if self.is_noop:
            return {"method": NO_METHOD}
        return {"method": self.method, **self.selection.to_model_args(), **self.grid.to_model_args(),
                **self.selection.layers_to_model_args(), **self.config.to_model_args(),
                **self.calib.to_model_args()}

    def digest(self) -> str:
        """12 hex characters identifying the canonical recipe."""
        canonical = json.dumps(self.to_model_args(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


__all__ = ["BITS_CHOICES", "COMPONENTS", "CalibSource", "Calibration", "FP_BITS", "Grid", "LAYER_GROUPS",
           "LAYER_TYPES", "METHODS", "Recipe", "RecipeError", "Selection", "method_module", "recipe_keys"]

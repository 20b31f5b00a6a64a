"""The quantization plan: what the user asked for, parsed and validated before any model is loaded.

A plan is parsed from lmms-eval ``model_args`` values (or the same keys from Python or a sweep file).
lmms-eval hands values over already typed, and not always as a user would expect: ``bits=4`` arrives
as int 4, ``group_size=-1`` as float -1.0, ``sym=true`` as bool True and ``x=None`` as the *string*
"None". ``from_kwargs`` accepts all of these and also plain strings, and rejects everything else with
a `PlanError` that names the key, the value and the valid choices.

Keys (defaults in brackets):

- ``method``: fp16 (no quantization) | rtn | gptq | awq  [fp16]
- ``bits``: 2..8, or 16 = leave in floating point  [4]; ``vit_bits``, ``connector_bits``, ``llm_bits``
  override it per component (the paper's mixed configurations).
- ``component``: vit | connector | llm | all, or a '+'-joined combination  [all]. Aliases: qformer and
  projector (both mean connector), vision → vit, language_model / lm → llm. Components named
  explicitly must exist in the model and match at least one weight; those implied by ``all`` are
  taken where they exist.
- ``granularity``: tensor (alias ``uniform``, the paper's per-tensor min-max) | channel | group.
  When not given it follows ``group_size`` (-1 → channel, else group).
- ``group_size``: -1 (per output channel) or a positive int  [128]. A last group narrower than
  ``group_size`` (in_features not a multiple) is its own group.
- ``sym``: symmetric grid without a zero-point  [false: asymmetric with an integer zero-point].
- ``layer_group``: front | middle | end | all, '+'-joinable  [all]: thirds [0, n//3), [n//3, 2n//3),
  [2n//3, n) of each block stack, as in the paper.
- ``layer_type``: attn | mlp | all  [all]. Cross-attention counts as attn.
- ``include``: lm_head  [none]: weights that are never quantized unless asked.
- GPTQ only: ``damp`` (0, 1] [0.01], ``act_order`` [false], ``block_size`` [128].
- AWQ only: ``awq_grid`` [20] (alpha = k/awq_grid, k < awq_grid), ``awq_clip`` [true].
- Calibration (rtn uses it only to measure errors for the report): ``calib`` = synthetic |
  hf:<path>[:<name>]:<split> | a local parquet/json/csv file or save_to_disk directory  [synthetic];
  ``calib_n`` [128] samples; ``calib_batch_size`` [8]; ``seed`` [0].
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

METHODS = ("fp16", "rtn", "gptq", "awq")
COMPONENTS = ("vit", "connector", "llm")
COMPONENT_ALIASES = {
    "qformer": "connector",
    "projector": "connector",
    "vision": "vit",
    "vision_tower": "vit",
    "language_model": "llm",
    "lm": "llm",
}
LAYER_GROUPS = ("front", "middle", "end")
LAYER_TYPES = ("attn", "mlp")
GRANULARITIES = ("tensor", "channel", "group")
GRANULARITY_ALIASES = {"uniform": "tensor", "per_tensor": "tensor", "per_channel": "channel", "per_group": "group"}
INCLUDES = ("lm_head",)
BITS_CHOICES = (2, 3, 4, 5, 6, 7, 8, 16)
FP_BITS = 16

GPTQ_KEYS = ("damp", "act_order", "block_size")
AWQ_KEYS = ("awq_grid", "awq_clip")
CALIB_KEYS = ("calib", "calib_n", "calib_batch_size", "seed")
COMMON_KEYS = (
    "bits", "vit_bits", "connector_bits", "llm_bits", "component", "granularity", "group_size", "sym",
    "layer_group", "layer_type", "include",
)
PLAN_KEYS = ("method",) + COMMON_KEYS + GPTQ_KEYS + AWQ_KEYS + CALIB_KEYS

DEFAULTS = {
    "method": "fp16", "bits": 4, "group_size": 128, "sym": False, "component": "all", "layer_group": "all",
    "layer_type": "all", "damp": 0.01, "act_order": False, "block_size": 128, "awq_grid": 20,
    "awq_clip": True, "calib": "synthetic", "calib_n": 128, "calib_batch_size": 8, "seed": 0,
}


class PlanError(ValueError):
    """A plan key with a bad value (or an unknown key); the message names key, value and valid choices."""


def _bad(key: str, value, valid: str, why: str = "") -> PlanError:
    reason = f" ({why})" if why else ""
    return PlanError(f"{key}={value!r} is invalid{reason}; valid: {valid}")


def _is_unset(value) -> bool:
    # lmms-eval turns `x=None` into the string "None".
    return value is None or (isinstance(value, str) and value.strip().lower() == "none")


def _as_int(key: str, value, valid: str) -> int:
    if isinstance(value, bool):
        raise _bad(key, value, valid, "a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise _bad(key, value, valid, "not an integer")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _bad(key, value, valid, "not a number") from None
            return _as_int(key, number, valid)
    raise _bad(key, value, valid, f"a {type(value).__name__}")


def _as_float(key: str, value, valid: str) -> float:
    if isinstance(value, bool):
        raise _bad(key, value, valid, "a boolean is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(key, value, valid, "not a number") from None
    else:
        raise _bad(key, value, valid, f"a {type(value).__name__}")
    if not math.isfinite(number):
        raise _bad(key, value, valid, "not finite")
    return number


def _as_bool(key: str, value) -> bool:
    valid = "true or false"
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    raise _bad(key, value, valid)


def _as_names(key: str, value, choices: tuple[str, ...], aliases: Mapping[str, str], allow_all: bool) -> tuple[str, ...]:
    """A '+'-joined (or JSON list) selection of names; () means "all"."""
    shown = ", ".join(choices + tuple(aliases) + (("all",) if allow_all else ()))
    valid = f"one of {shown}, or several joined by '+'"
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parts = json.loads(text)
            except json.JSONDecodeError:
                raise _bad(key, value, valid, "not a JSON list") from None
            if not isinstance(parts, list):
                raise _bad(key, value, valid)
        else:
            parts = text.split("+")
    else:
        raise _bad(key, value, valid, f"a {type(value).__name__}")
    names = []
    for part in parts:
        if not isinstance(part, str):
            raise _bad(key, value, valid)
        name = part.strip().lower()
        name = aliases.get(name, name)
        if allow_all and name == "all":
            if len(parts) != 1:
                raise _bad(key, value, valid, "'all' cannot be combined")
            return ()
        if name not in choices:
            raise _bad(key, value, valid, f"unknown name {part!r}")
        if name in names:
            raise _bad(key, value, valid, f"{name!r} given twice")
        names.append(name)
    if not names:
        raise _bad(key, value, valid, "empty")
    return tuple(n for n in choices if n in names)  # canonical order


def _bits(key: str, value) -> int:
    valid = "2, 3, 4, 5, 6, 7, 8, or 16 (leave in floating point)"
    bits = _as_int(key, value, valid)
    if bits not in BITS_CHOICES:
        raise _bad(key, value, valid)
    return bits


def parse_calib_source(value) -> dict:
    """{"kind": "synthetic"} | {"kind": "hf", "path", "name", "split"} | {"kind": "local", "path"}."""
    valid = "synthetic, hf:<path>[:<name>]:<split>, or an existing local parquet/json/csv file or save_to_disk dir"
    if not isinstance(value, str):
        raise _bad("calib", value, valid, f"a {type(value).__name__}")
    text = value.strip()
    if text.lower() == "synthetic":
        return {"kind": "synthetic"}
    if text.startswith("hf:"):
        parts = text[3:].split(":")
        if len(parts) == 2:
            path, name, split = parts[0], None, parts[1]
        elif len(parts) == 3:
            path, name, split = parts
        else:
            raise _bad("calib", value, valid, "hf: needs <path>:<split> or <path>:<name>:<split>")
        if not path or not split or name == "":
            raise _bad("calib", value, valid, "an empty part")
        return {"kind": "hf", "path": path, "name": name, "split": split}
    if os.path.exists(text):
        return {"kind": "local", "path": os.path.abspath(text)}
    raise _bad("calib", value, valid, "no such file or directory")


@dataclass(frozen=True)
class QuantPlan:
    """A validated, resolved quantization plan. Build it with `QuantPlan.from_kwargs`."""

    method: str = "fp16"
    # The component selector as given: () = all components the model has; else explicit names.
    components: tuple[str, ...] = ()
    # Bits per component; 16 leaves that component in floating point.
    vit_bits: int = 4
    connector_bits: int = 4
    llm_bits: int = 4
    granularity: str = "group"
    group_size: int = 128  # -1 unless granularity == "group"
    sym: bool = False
    layer_groups: tuple[str, ...] = LAYER_GROUPS
    layer_types: tuple[str, ...] = LAYER_TYPES
    include: tuple[str, ...] = ()
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    calib: str = "synthetic"
    calib_n: int = 128
    calib_batch_size: int = 8
    seed: int = 0

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_kwargs(cls, kwargs: Mapping, other_valid_keys: Iterable[str] = ()) -> "QuantPlan":
        """Validate plan keys in ``kwargs``; any key that is neither a plan key nor in
        ``other_valid_keys`` is an error. ``kwargs`` is not modified; other keys are ignored."""
        other = tuple(other_valid_keys)
        for key in kwargs:
            if key not in PLAN_KEYS and key not in other:
                close = difflib.get_close_matches(str(key), PLAN_KEYS + other, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PlanError(
                    f"unknown key {key!r} (value {kwargs[key]!r}){hint}; valid quantization keys: "
                    f"{', '.join(PLAN_KEYS)}" + (f"; other valid keys: {', '.join(other)}" if other else "")
                )
        given = {k: v for k, v in kwargs.items() if k in PLAN_KEYS and not _is_unset(v)}

        method = str(given.get("method", DEFAULTS["method"])).strip().lower()
        if method not in METHODS:
            raise _bad("method", given["method"], ", ".join(METHODS))
        if method == "fp16":
            # bits=16 says the same as fp16; anything else would be silently ignored.
            extra = sorted(k for k in given if k != "method" and not (
                k in ("bits", "vit_bits", "connector_bits", "llm_bits") and _bits(k, given[k]) == FP_BITS))
            if extra:
                raise PlanError(
                    f"{extra[0]}={given[extra[0]]!r} is invalid (method=fp16 quantizes nothing, so "
                    f"{', '.join(extra)} would be ignored); valid: drop it, or choose method from rtn, gptq, awq"
                )
            return cls(method="fp16")
        for keys, owner in ((GPTQ_KEYS, "gptq"), (AWQ_KEYS, "awq")):
            for key in keys:
                if key in given and method != owner:
                    raise PlanError(
                        f"{key}={given[key]!r} is invalid with method={method} (it would be ignored); "
                        f"valid: only with method={owner}"
                    )

        bits = _bits("bits", given.get("bits", DEFAULTS["bits"]))
        per_component = {c: _bits(f"{c}_bits", given[f"{c}_bits"]) for c in COMPONENTS if f"{c}_bits" in given}

        named = _as_names("component", given.get("component", "all"), COMPONENTS, COMPONENT_ALIASES, allow_all=True)
        for comp in per_component:
            if named and comp not in named:
                raise PlanError(
                    f"{comp}_bits={given[f'{comp}_bits']!r} is invalid with component={given['component']!r} "
                    f"(that component is not selected); valid: add {comp} to component, or drop {comp}_bits"
                )
        resolved_bits = {c: per_component.get(c, bits) for c in COMPONENTS}
        selected = named or COMPONENTS
        if all(resolved_bits[c] == FP_BITS for c in selected):
            raise PlanError(
                f"bits={bits!r} is invalid: every selected component ({'+'.join(selected)}) is left at 16 bits, "
                f"so nothing would be quantized; valid: bits 2..8 for at least one component, or method=fp16"
            )
        if named:
            # Naming a component and giving it 16 bits is the same plan as not naming it; components
            # not named stay in floating point whatever `bits` says.
            named = tuple(c for c in named if resolved_bits[c] != FP_BITS)
            resolved_bits = {c: (resolved_bits[c] if c in named else FP_BITS) for c in COMPONENTS}

        granularity, group_size = cls._granularity(given)
        sym = _as_bool("sym", given["sym"]) if "sym" in given else DEFAULTS["sym"]
        layer_groups = _as_names("layer_group", given.get("layer_group", "all"), LAYER_GROUPS, {}, True) or LAYER_GROUPS
        layer_types = _as_names("layer_type", given.get("layer_type", "all"), LAYER_TYPES, {}, True) or LAYER_TYPES
        include = ()
        if "include" in given:
            include = _as_names("include", given["include"], INCLUDES, {}, allow_all=False)

        fields = {}
        if method == "gptq":
            valid = "a number in (0, 1], e.g. 0.01"
            damp = _as_float("damp", given.get("damp", DEFAULTS["damp"]), valid)
            if not 0 < damp <= 1:
                raise _bad("damp", given.get("damp"), valid)
            fields["damp"] = damp
            fields["act_order"] = _as_bool("act_order", given["act_order"]) if "act_order" in given else False
            fields["block_size"] = cls._positive("block_size", given.get("block_size", DEFAULTS["block_size"]), "e.g. 128")
        if method == "awq":
            fields["awq_grid"] = cls._positive("awq_grid", given.get("awq_grid", DEFAULTS["awq_grid"]), "e.g. 20")
            fields["awq_clip"] = _as_bool("awq_clip", given["awq_clip"]) if "awq_clip" in given else True

        calib = given.get("calib", DEFAULTS["calib"])
        source = parse_calib_source(calib)
        calib = "synthetic" if source["kind"] == "synthetic" else (
            source["path"] if source["kind"] == "local" else str(calib).strip())
        calib_n = cls._positive("calib_n", given.get("calib_n", DEFAULTS["calib_n"]), "e.g. 128")
        calib_batch_size = cls._positive("calib_batch_size", given.get("calib_batch_size", DEFAULTS["calib_batch_size"]), "e.g. 8")
        seed = _as_int("seed", given.get("seed", DEFAULTS["seed"]), "an int >= 0")
        if seed < 0:
            raise _bad("seed", given.get("seed"), "an int >= 0")

        return cls(
            method=method, components=named, vit_bits=resolved_bits["vit"],
            connector_bits=resolved_bits["connector"], llm_bits=resolved_bits["llm"], granularity=granularity,
            group_size=group_size, sym=sym, layer_groups=layer_groups, layer_types=layer_types, include=include,
            calib=calib, calib_n=calib_n, calib_batch_size=calib_batch_size, seed=seed, **fields,
        )

    @staticmethod
    def _positive(key: str, value, example: str) -> int:
        valid = f"a positive int ({example})"
        number = _as_int(key, value, valid)
        if number < 1:
            raise _bad(key, value, valid)
        return number

    @staticmethod
    def _granularity(given: Mapping) -> tuple[str, int]:
        valid_g = "-1 (per output channel) or a positive int such as 32, 64, 128"
        group_size = None
        if "group_size" in given:
            group_size = _as_int("group_size", given["group_size"], valid_g)
            if group_size == 0 or group_size < -1:
                raise _bad("group_size", given["group_size"], valid_g)
        if "granularity" not in given:
            if group_size is None:
                return "group", DEFAULTS["group_size"]
            return ("channel", -1) if group_size == -1 else ("group", group_size)
        raw = given["granularity"]
        valid = ", ".join(GRANULARITIES + tuple(GRANULARITY_ALIASES))
        if not isinstance(raw, str):
            raise _bad("granularity", raw, valid)
        granularity = GRANULARITY_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if granularity not in GRANULARITIES:
            raise _bad("granularity", raw, valid)
        if granularity == "group":
            if group_size == -1:
                raise _bad("group_size", given["group_size"], "a positive int with granularity=group")
            return "group", group_size or DEFAULTS["group_size"]
        if group_size not in (None, -1):
            raise PlanError(
                f"group_size={given['group_size']!r} is invalid with granularity={raw!r} (groups only apply to "
                f"granularity=group); valid: drop group_size, or granularity=group"
            )
        return granularity, -1

    # ------------------------------------------------------------------ views

    @property
    def is_noop(self) -> bool:
        return self.method == "fp16"

    def bits_for(self, component: str) -> int:
        return {"vit": self.vit_bits, "connector": self.connector_bits, "llm": self.llm_bits}[component]

    def targets(self, available: Iterable[str]) -> tuple[str, ...]:
        """The components to quantize in a model that has ``available`` components."""
        available = tuple(available)
        wanted = self.components or available
        return tuple(c for c in COMPONENTS if c in wanted and c in available and self.bits_for(c) != FP_BITS)

    def as_model_args(self) -> dict[str, str]:
        """Every resolved key, canonical and as strings: equal plans give equal dicts, and
        ``from_kwargs(as_model_args())`` gives this plan back."""
        if self.is_noop:
            return {"method": "fp16"}
        args = {
            "method": self.method,
            "component": "+".join(self.components) if self.components else "all",
        }
        for comp in self.components or COMPONENTS:
            args[f"{comp}_bits"] = str(self.bits_for(comp))
        args["granularity"] = self.granularity
        args["group_size"] = str(self.group_size)
        args["sym"] = _fmt(self.sym)
        args["layer_group"] = "all" if self.layer_groups == LAYER_GROUPS else "+".join(self.layer_groups)
        args["layer_type"] = "all" if self.layer_types == LAYER_TYPES else "+".join(self.layer_types)
        args["include"] = "+".join(self.include) if self.include else "none"
        if self.method == "gptq":
            args.update(damp=repr(self.damp), act_order=_fmt(self.act_order), block_size=str(self.block_size))
        if self.method == "awq":
            args.update(awq_grid=str(self.awq_grid), awq_clip=_fmt(self.awq_clip))
        args.update(calib=self.calib, calib_n=str(self.calib_n), calib_batch_size=str(self.calib_batch_size),
                    seed=str(self.seed))
        return args

    def digest(self) -> str:
        """12 hex characters identifying the canonical plan."""
        canonical = json.dumps(self.as_model_args(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _fmt(flag: bool) -> str:
    return "true" if flag else "false"

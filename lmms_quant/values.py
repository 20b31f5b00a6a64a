"""User-given values, parsed once for the whole project: model_args strings, booleans, numbers, dtypes.

lmms-eval hands ``--model_args`` values over already typed, and not always as a user would expect:
``bits=4`` arrives as int 4, ``group_size=-1`` as float -1.0, ``sym=true`` as bool True and ``x=None``
as the *string* "None". Every parser here accepts those forms and plain strings, and rejects
everything else with a `BadValue` that names the key, the value and the valid choices.

This module is import-light (no torch, no lmms-eval at import time): the CLI validates arguments with
it before any slow import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The dtypes a checkpoint may be loaded in; "auto" keeps the checkpoint's own.
DTYPE_NAMES = ("auto", "float16", "bfloat16", "float32")


class BadValue(ValueError):
    """A key with a bad value; the message names the key, the value and the valid choices."""


def bad(key: str, value, valid: str, why: str = "", error: type[BadValue] = BadValue) -> BadValue:
    reason = f" ({why})" if why else ""
    return error(f"{key}={value!r} is invalid{reason}; valid: {valid}")


def is_unset(value) -> bool:
    """None, or what lmms-eval makes of ``x=None`` (an empty string is a value, and usually a bad one)."""
    return value is None or (isinstance(value, str) and value.strip().lower() == "none")


def unquote(value: str) -> str:
    """lmms-eval keeps the quotes of ``x="a,b"``."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def text(value) -> str | None:
    """A string value, unquoted; None when unset or empty."""
    if is_unset(value):
        return None
    spelled = unquote(str(value).strip())
    return spelled or None


def parse_bool(key: str, value, error: type[BadValue] = BadValue) -> bool:
    valid = "true or false"
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes"):
            return True
        if word in ("false", "0", "no"):
            return False
    raise bad(key, value, valid, error=error)


def parse_int(key: str, value, valid: str, error: type[BadValue] = BadValue) -> int:
    if isinstance(value, bool):
        raise bad(key, value, valid, "a boolean is not a number", error)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise bad(key, value, valid, "not an integer", error)
    if isinstance(value, str):
        word = value.strip()
        try:
            return int(word)
        except ValueError:
            try:
                number = float(word)
            except ValueError:
                raise bad(key, value, valid, "not a number", error) from None
            return parse_int(key, number, valid, error)
    raise bad(key, value, valid, f"a {type(value).__name__}", error)


def parse_positive_int(key: str, value, example: str, error: type[BadValue] = BadValue) -> int:
    valid = f"a positive int ({example})"
    number = parse_int(key, value, valid, error)
    if number < 1:
        raise bad(key, value, valid, error=error)
    return number


def parse_float(key: str, value, valid: str, error: type[BadValue] = BadValue) -> float:
    if isinstance(value, bool):
        raise bad(key, value, valid, "a boolean is not a number", error)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise bad(key, value, valid, "not a number", error) from None
    else:
        raise bad(key, value, valid, f"a {type(value).__name__}", error)
    if not math.isfinite(number):
        raise bad(key, value, valid, "not finite", error)
    return number


def parse_dtype(key: str, value):
    """"auto" or a torch dtype (imports torch only when a dtype is asked for)."""
    import torch

    table = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if isinstance(value, torch.dtype) and value in table.values():
        return value
    if isinstance(value, str) and value.strip().lower() in table:
        return table[value.strip().lower()]
    raise bad(key, value, ", ".join(DTYPE_NAMES))


def dtype_name(dtype) -> str:
    """The DTYPE_NAMES spelling of "auto" or a torch dtype."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def parse_model_args(args: str | Mapping | None) -> dict:
    """lmms-eval's ``k=v,k=v`` model_args string as lmms-eval itself parses it (typed values), or a dict as is.

    Using lmms-eval's own parser means every key lmms-quant validates is the key lmms-eval will pass.
    """
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    from lmms_eval.utils import simple_parse_args_string

    return simple_parse_args_string(str(args))


def format_value(value) -> str:
    """One value as a model_args string spells it (booleans lower-case, as lmms-eval reads them)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


__all__ = ["BadValue", "DTYPE_NAMES", "bad", "dtype_name", "format_value", "is_unset", "parse_bool",
           "parse_dtype", "parse_float", "parse_int", "parse_model_args", "parse_positive_int", "text",
           "unquote"]

"""The one definition of each input check: numbers, counts, ratios, names from a set, known fields.

Every check returns the value in its canonical type or raises ``UserError`` with one line that
names ``what`` was wrong (a flag, a field path such as ``models[1].shallow_ratio``, a
parameter) and the value given. Search spaces, specs, recipes, attacks, protocols and commands
all validate through these, so one rule reads the same wherever it fails.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from rm_sweep.errors import UserError


def number(value: Any, what: str, *, integer: bool = False) -> int | float:
    """``value`` as a finite float (or an int), rejecting bools, text, NaN and infinities.

    YAML 1.1 reads ``5e-4`` (no dot) and ``1.0e23`` (no sign) as text: such text is named as the
    likely cause, with the number written as YAML reads it.
    """
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            pass
        else:
            raise UserError(f"{what}: {value!r} is text, not a number (YAML reads an exponent only after a dot "
                            f"and with a sign: write {_yaml_float(parsed)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise UserError(f"{what} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def positive(value: Any, what: str, *, integer: bool = False, minimum: float = 0, strict: bool = True,
             maximum: float = math.inf) -> int | float:
    """``number(value)`` that is > ``minimum`` (``strict``) or >= it, and <= ``maximum``."""
    value = number(value, what, integer=integer)
    if value > maximum:
        raise UserError(f"{what} must be a number <= {maximum:.4g}, got {value!r}")
    if value < minimum or (strict and value == minimum):
        kind = "an integer" if integer else "a number"
        if minimum == 0 and strict:
            requirement = f"a positive {'integer' if integer else 'number'}"
        else:
            requirement = f"{kind} {'>' if strict else '>='} {minimum:g}"
        raise UserError(f"{what} must be {requirement}, got {value!r}")
    return value


INT64_MAX = 2**63 - 1  # the largest count the store's int64 columns hold


def positive_int(value: Any, what: str, maximum: int = INT64_MAX) -> int:
    """A count: an integer >= 1 and at most ``maximum`` (by default what the store's int64 columns hold)."""
    return int(positive(value, what, integer=True, maximum=maximum))


def seed(value: Any, what: str = "seed") -> int:
    """A random seed: an integer in [0, 2**63), what torch's and NumPy's generators take."""
    checked = number(value, what, integer=True)
    if not 0 <= checked < 2**63:
        raise UserError(f"{what} must be an integer in [0, 2**63), got {value!r}")
    return int(checked)


def ratio(value: Any, what: str) -> float:
    """A drop ratio: a number in [0, 1)."""
    value = number(value, what)
    if not 0 <= value < 1:
        raise UserError(f"{what}: {value!r} is outside [0, 1)")
    return float(value)


def choice(value: Any, choices: Collection[str], what: str) -> str:
    """``value`` if it is one of ``choices``; otherwise an error suggesting the closest one."""
    if not isinstance(value, str) or value not in choices:  # a YAML list or map is no name (nor hashable)
        raise UserError(f"unknown {what} {value!r}; {_hint(value, choices)}")
    return value


def known_fields(fields: Mapping[str, Any], known: Iterable[str], where: str = "") -> Mapping[str, Any]:
    """``fields`` if every key is in ``known``; otherwise an error at ``where.key``."""
    known = list(known)
    for key in fields:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            raise UserError(f"{path}: unknown field ({_hint(key, known)})")
    return fields


def _yaml_float(value: float) -> str:
    """``value`` as YAML 1.1 reads a float: 5.0e-4, 1.0e+23, 0.5."""
    if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e6:
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent):+d}"


def _hint(value: Any, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"did you mean {close[0]}?" if close else f"choose from {', '.join(choices)}"


__all__ = ["INT64_MAX", "choice", "known_fields", "number", "positive", "positive_int", "ratio", "seed"]

"""Integer and flag arguments of the mask language: exact values only, never silently truncated or coerced.

Integers: Python and numpy integers, and integral floats (``8.0`` is 8, so lengths computed
with ``/`` still work), within int64 (masks are int64 arrays). Rejected with an error naming
the argument: ``8.9``, NaN, inf, bools (also inside a list of lengths), strings, ``None``,
values beyond int64. Flags (``causal``): ``True`` / ``False`` only (``"False"`` is a string,
and a true one).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

INT64_MAX = 2**63 - 1


def as_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (Python or numpy); a ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")


def as_int(name: str, value: Any) -> int:
    """``value`` as an ``int``; a ValueError naming ``name`` if it is not an exact integer."""
    if getattr(value, "ndim", None) == 0:
        value = value.item()  # 0-d numpy / torch scalars
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer; got {value!r}, which would be truncated: round it explicitly")
    out = int(value)
    if abs(out) > INT64_MAX:
        raise ValueError(f"{name}={out} is beyond int64 (|{name}| <= 2**63 - 1), the integers masks are computed in")
    return out


def as_int_array(name: str, values: Any) -> np.ndarray:
    """An int64 array of ``values`` (any shape); a ValueError naming ``name`` on a non-integral entry."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers; got {values!r}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        if arr.size == 0:
            return arr.astype(np.int64)
        big = [v for v in arr.ravel() if isinstance(v, numbers.Integral) and abs(int(v)) > INT64_MAX]
        if big:
            raise ValueError(f"{name} holds {big[0]}, beyond int64 (2**63 - 1), the integers masks are computed in")
        raise ValueError(f"{name} must hold integers; got {values!r}")
    if arr.dtype.kind == "b" or (isinstance(values, (list, tuple)) and _holds_bool(values)):
        raise ValueError(f"{name} must hold integers, not booleans (True is not a length); got {values!r}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must hold integers; entry {arr[bad].flat[0].item()!r} would be truncated: "
                             f"round it explicitly")
    return arr.astype(np.int64)


def _holds_bool(values: Any) -> bool:
    """Whether a (nested) list holds a bool, which numpy would silently turn into 0 / 1 beside ints."""
    return any(isinstance(v, (bool, np.bool_)) or (isinstance(v, (list, tuple)) and _holds_bool(v)) for v in values)

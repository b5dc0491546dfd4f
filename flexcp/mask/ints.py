"""Integer arguments of the mask language: exact integers only, never silently truncated.

Accepted: Python and numpy integers, and integral floats (``8.0`` is 8, so lengths computed
with ``/`` still work). Rejected with an error naming the argument: ``8.9``, NaN, inf,
bools, strings, ``None``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def as_int(name: str, value: Any) -> int:
    """``value`` as an ``int``; a ValueError naming ``name`` if it is not an exact integer."""
    if getattr(value, "ndim", None) == 0:
        value = value.item()  # 0-d numpy / torch scalars
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise ValueError(f"{name} must be an integer; got {value!r}, which would be truncated: round it explicitly")
    return int(value)


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
        raise ValueError(f"{name} must hold integers; got {values!r}")
    if arr.dtype.kind == "b":
        raise ValueError(f"{name} must hold integers, not booleans; got {values!r}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must hold integers; entry {arr[bad].flat[0].item()!r} would be truncated: "
                             f"round it explicitly")
    return arr.astype(np.int64)

"""Mask types of one attention slice: which keys each row of a slice sees (defined in ``AttnMaskType``)."""

from __future__ import annotations

import numbers
from enum import Enum

import numpy as np


class AttnMaskType(str, Enum):
    """How a slice's rows see its keys; a ``str`` so it compares equal to the seed's strings.

    With row ``i`` and key ``j`` counted from the slice start and ``sq``/``sk`` its lengths:
    FULL keeps every ``j``; CAUSAL (bottom-right aligned) keeps ``j <= i + sk - sq``;
    INV_CAUSAL (top-left aligned) keeps ``j >= i``; BI_CAUSAL keeps both.
    """

    FULL = "full"
    CAUSAL = "causal"
    INV_CAUSAL = "inv_causal"
    BI_CAUSAL = "bi_causal"

    @property
    def code(self) -> int:
        """Integer code used by kernels (the order of MagiAttention's ``attn_type_map``)."""
        return _CODES[self]

    @classmethod
    def parse(cls, value: "AttnMaskType | str | int") -> "AttnMaskType":
        """Accept an enum, its string value (any case) or its integer code (Python or numpy integer, 0-3)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and 0 <= value < len(_ORDER):
            return _ORDER[int(value)]
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(
            f"mask_types: unknown mask type {value!r}; use one of "
            f"{[m.value for m in cls]} (or AttnMaskType members, or integer codes 0-3 in that order)"
        )

    def __str__(self) -> str:
        return self.value


_ORDER = (AttnMaskType.FULL, AttnMaskType.CAUSAL, AttnMaskType.INV_CAUSAL, AttnMaskType.BI_CAUSAL)
_CODES = {m: i for i, m in enumerate(_ORDER)}
FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL = range(4)

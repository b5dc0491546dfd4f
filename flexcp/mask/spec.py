"""AttnMaskSpec: a mask as a list of typed rectangles (the seed's dataclass, extended)."""

from __future__ import annotations

import functools
import hashlib
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .geometry import SliceTable, find_overlap, row_key_counts, slice_areas
from .ints import as_int
from .types import AttnMaskType

Range = tuple[int, int]

MAX_SEQLEN = 2**31
"""Most tokens a mask may cover (q or k): areas, up to ``total_seqlen x total_seqlen_k`` cells, are exact
int64 counts, and 2**31 tokens of q alone (one head of 64 bf16 features) would be 256 GiB."""


def _as_ranges(name: str, ranges: Any) -> tuple[Range, ...]:
    if hasattr(ranges, "tolist"):  # torch tensors and numpy arrays
        ranges = ranges.tolist()
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
        raise ValueError(f"{name} must be a list of (start, end) pairs, e.g. [(0, 8)]; got {ranges!r}")
    out = []
    for n, r in enumerate(ranges):
        try:
            start, end = r
            out.append((as_int("start", start), as_int("end", end)))
        except (TypeError, ValueError) as exc:
            why = f" ({exc})" if "integer" in str(exc) else ""
            raise ValueError(f"{name}[{n}] = {r!r} is not a (start, end) pair of ints{why}") from None
    return tuple(out)


@dataclass(frozen=True)
class AttnMaskSpec:
    """Backend-agnostic description of an attention mask as AttnSlice rectangles.

    Slice ``n`` lets query rows ``q_ranges[n] = [start, end)`` attend keys
    ``k_ranges[n]`` under ``mask_types[n]`` (see :class:`AttnMaskType`). A row's keys
    are the union over its slices; no cell may be covered twice; rows without slices
    attend to nothing. ``total_seqlen_k`` defaults to ``total_seqlen`` (self-attention).
    Ranges are stored as tuples and types as :class:`AttnMaskType` (which compare
    equal to the seed's strings); structural errors raise at construction, the full
    check (bounds, overlaps) in :meth:`validate`.
    """

    q_ranges: Sequence[Range]
    k_ranges: Sequence[Range]
    mask_types: Sequence[AttnMaskType]
    total_seqlen: int
    total_seqlen_k: int | None = field(default=None)

    def __post_init__(self) -> None:
        q = _as_ranges("q_ranges", self.q_ranges)
        k = _as_ranges("k_ranges", self.k_ranges)
        if isinstance(self.mask_types, (str, bytes)) or not isinstance(self.mask_types, Iterable):
            raise ValueError(f"mask_types must be a list with one type per slice, e.g. ['causal']; "
                             f"got {self.mask_types!r}")
        types = tuple(AttnMaskType.parse(t) for t in self.mask_types)
        if not (len(q) == len(k) == len(types)):
            raise ValueError(
                f"q_ranges, k_ranges and mask_types must have one entry per slice; "
                f"got {len(q)}, {len(k)} and {len(types)}"
            )
        total = as_int("total_seqlen", self.total_seqlen)
        total_k = total if self.total_seqlen_k is None else as_int("total_seqlen_k", self.total_seqlen_k)
        if total < 0 or total_k < 0:
            raise ValueError(f"total_seqlen={total} and total_seqlen_k={total_k} must be >= 0")
        object.__setattr__(self, "q_ranges", q)
        object.__setattr__(self, "k_ranges", k)
        object.__setattr__(self, "mask_types", types)
        object.__setattr__(self, "total_seqlen", total)
        object.__setattr__(self, "total_seqlen_k", total_k)
        # the spec as a one-element int64 CPU tensor, what the kernels' custom op carries: to torch.compile
        # a tensor attribute is a graph input, so a new mask of the same length does not recompile
        object.__setattr__(self, "handle", torch.tensor([self.digest()], dtype=torch.int64))
        _register(self)

    def __reduce__(self):
        # rebuilt through __init__ (so the copy registers its handle in the receiving process)
        return type(self), (self.q_ranges, self.k_ranges, [t.value for t in self.mask_types], self.total_seqlen,
                            self.total_seqlen_k)

    def digest(self) -> int:
        """60-bit digest of the fingerprint: the spec's ``handle`` (equal specs, equal handles)."""
        return int(self._fingerprint[-1][:15], 16)

    # ----------------------------------------------------------------- views
    @cached_property
    def table(self) -> SliceTable:
        """The slices as numpy arrays (what kernels, dispatch and planning consume)."""
        return SliceTable.from_arrays(
            np.asarray(self.q_ranges, dtype=np.int64).reshape(-1, 2),
            np.asarray(self.k_ranges, dtype=np.int64).reshape(-1, 2),
            [t.code for t in self.mask_types],
        )

    def __len__(self) -> int:
        return len(self.q_ranges)

    def fingerprint(self) -> tuple:
        """Hashable identity used to cache the built key across layers (equal specs, equal prints)."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> tuple:
        t = self.table
        digest = hashlib.blake2b(digest_size=16)
        for arr in (t.qs, t.qe, t.ks, t.ke, t.types):
            digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return ("flexcp.mask/1", self.total_seqlen, self.total_seqlen_k, len(self), digest.hexdigest())

    def area(self) -> int:
        """Exact number of unmasked (q, k) cells.

        Validates first (cached): on overlapping slices the sum of slice areas would count shared
        cells twice, and an exact union would need per-cell work, so overlaps are an error here too.
        """
        return int(slice_areas(self.validate().table).sum())

    def row_key_counts(self) -> np.ndarray:
        """Number of keys each of the ``total_seqlen`` rows attends to."""
        return row_key_counts(self.table, self.total_seqlen)

    def to_dense(self, device: Any = None):
        """Boolean ``[total_seqlen, total_seqlen_k]`` mask. O(S^2): tests and debugging only."""
        import torch

        mask = torch.zeros(self.total_seqlen, self.total_seqlen_k, dtype=torch.bool, device=device)
        t = self.table
        lo, hi = t.lo, t.hi
        for n in range(len(t)):
            qs, qe, ks, ke = int(t.qs[n]), int(t.qe[n]), int(t.ks[n]), int(t.ke[n])
            i = torch.arange(qs, qe, device=device)[:, None]
            j = torch.arange(ks, ke, device=device)[None, :]
            d = j - i
            mask[qs:qe, ks:ke] |= (d >= int(max(lo[n], -(2**62)))) & (d <= int(min(hi[n], 2**62)))
        return mask

    # ------------------------------------------------------------ validation
    def validate(self) -> "AttnMaskSpec":
        """Check bounds and that no cell is covered twice; returns ``self`` for chaining.

        Raises ``ValueError`` naming the offending slice and how to fix it.
        """
        if self.__dict__.get("_validated"):
            return self
        for name, total in (("total_seqlen", self.total_seqlen), ("total_seqlen_k", self.total_seqlen_k)):
            if total > MAX_SEQLEN:
                raise ValueError(
                    f"{name}={total} is beyond the {MAX_SEQLEN} (2**31) tokens a mask may cover: mask areas are "
                    f"exact int64 counts of up to total_seqlen x total_seqlen_k cells, and q/k/v for that many "
                    f"tokens fit no device; split the batch into sequences of at most 2**31 tokens")
        t = self.table
        for name, start, end, total in (
            ("q_ranges", t.qs, t.qe, self.total_seqlen),
            ("k_ranges", t.ks, t.ke, self.total_seqlen_k),
        ):
            bad = np.nonzero((start < 0) | (end < start) | (end > total))[0]
            if len(bad):
                n = int(bad[0])
                raise ValueError(
                    f"{name}[{n}] = ({int(start[n])}, {int(end[n])}) is invalid: ranges are [start, end) "
                    f"with 0 <= start <= end <= {total} (total_seqlen{'_k' if name == 'k_ranges' else ''})"
                )
        pair = find_overlap(t)
        if pair is not None:
            a, b = pair
            raise ValueError(
                f"slices {a} and {b} cover the same (q, k) cells: slice {a} = q{self.q_ranges[a]} x "
                f"k{self.k_ranges[a]} {self.mask_types[a].value}, slice {b} = q{self.q_ranges[b]} x "
                f"k{self.k_ranges[b]} {self.mask_types[b].value}; split them so each cell is covered once"
            )
        object.__setattr__(self, "_validated", True)
        return self

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_table(cls, table: SliceTable, total_seqlen: int, total_seqlen_k: int | None = None) -> "AttnMaskSpec":
        """Build a spec from slice arrays (as produced by the geometry helpers)."""
        q = np.stack([table.qs, table.qe], axis=1).tolist()
        k = np.stack([table.ks, table.ke], axis=1).tolist()
        return cls(q, k, [int(x) for x in table.types], total_seqlen, total_seqlen_k)


_LIVE: dict[int, list] = {}
"""Live specs by digest (weak references): what :func:`spec_of_handle` finds; a spec is forgotten when it dies."""


def _register(spec: AttnMaskSpec) -> None:
    d = spec.digest()
    refs = [r for r in _LIVE.get(d, ()) if r() is not None]
    refs.append(weakref.ref(spec, functools.partial(_forget, d)))
    _LIVE[d] = refs


def _forget(digest: int, dead: weakref.ref) -> None:
    refs = [r for r in _LIVE.get(digest, ()) if r is not dead and r() is not None]
    if refs:
        _LIVE[digest] = refs
    else:
        _LIVE.pop(digest, None)


def spec_of_handle(handle: torch.Tensor) -> AttnMaskSpec:
    """A live spec whose ``handle`` this is (any of equal ones); a clear error if none is alive in this process."""
    d = int(handle.reshape(-1)[0])
    for ref in _LIVE.get(d, ()):
        spec = ref()
        if spec is not None:
            return spec
    raise ValueError("this AttnMaskSpec handle names no live spec in this process; pass the spec itself "
                     "(keep it alive while attention runs)")

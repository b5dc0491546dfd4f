"""Constructors for the mask families users train with (packed, prefix tree, windows, blocks).

Each family is one function decorated with ``@family``: that makes it a static constructor
of ``AttnMaskSpec`` (``AttnMaskSpec.varlen(...)``) and a name exported by ``flexcp.mask``,
so adding a family touches this file alone (and ``spec.py`` never imports this module).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from .geometry import clip_band
from .ints import INT64_MAX, as_bool, as_int, as_int_array
from .spec import AttnMaskSpec
from .types import AttnMaskType


F = TypeVar("F", bound=Callable[..., Any])
FAMILIES: dict[str, Callable[..., Any]] = {}


def family(fn: F) -> F:
    """Register ``fn`` as a mask family: ``AttnMaskSpec.<name>`` and ``flexcp.mask.<name>``."""
    FAMILIES[fn.__name__] = fn
    setattr(AttnMaskSpec, fn.__name__, staticmethod(fn))
    return fn


def _lengths(name: str, values: Sequence[int]) -> np.ndarray:
    if isinstance(values, Iterable) and not hasattr(values, "shape"):
        values = list(values)  # generators
    arr = as_int_array(name, values).reshape(-1)
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative; got {arr.tolist()}")
    if len(arr) and int(arr.max()) > INT64_MAX // len(arr) and sum(arr.tolist()) > INT64_MAX:
        raise ValueError(f"{name} add up to {sum(arr.tolist())} tokens, beyond int64 (2**63 - 1), the integers "
                         "masks are computed in")
    return arr


@family
def causal(seqlen: int) -> AttnMaskSpec:
    """A single full causal sequence of ``seqlen`` tokens."""
    seqlen = as_int("seqlen", seqlen)
    if seqlen < 0:
        raise ValueError(f"seqlen must be >= 0; got {seqlen}")
    if seqlen == 0:
        return AttnMaskSpec([], [], [], 0)
    return AttnMaskSpec([(0, seqlen)], [(0, seqlen)], [AttnMaskType.CAUSAL], seqlen)


@family
def varlen(seqlens: Sequence[int], causal: bool = True) -> AttnMaskSpec:
    """Block-diagonal mask for packed documents; empty documents are skipped."""
    causal = as_bool("causal", causal)
    lens = _lengths("seqlens", seqlens)
    ends = np.cumsum(lens)
    starts = ends - lens
    keep = lens > 0
    ranges = np.stack([starts[keep], ends[keep]], axis=1).tolist()
    kind = AttnMaskType.CAUSAL if causal else AttnMaskType.FULL
    return AttnMaskSpec(ranges, ranges, [kind] * len(ranges), int(ends[-1]) if len(ends) else 0)


@family
def prefix_tree(
    node_lengths: Sequence[int], sample_paths: Sequence[Sequence[int]]
) -> tuple[AttnMaskSpec, list[list[tuple[int, int]]]]:
    """Prefix-tree mask over the flat layout ``[node_0 | node_1 | ...]``.

    Each sample is a root-to-leaf path of node indices; its tokens are the causal
    concatenation of its nodes. Every node attends CAUSAL to itself and FULL to each
    ancestor on its path; rectangles shared by several samples are emitted once, in
    the order: a node's self rectangle, then its ancestors root first. Returns the spec
    and, per sample, the flat token ranges of its nodes in path order.
    """
    lens = _lengths("node_lengths", node_lengths)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n_nodes = len(lens)
    parent: dict[int, int | None] = {}
    seen: set[tuple[int, int]] = set()
    q_ranges, k_ranges, types = [], [], []
    sample_ranges: list[list[tuple[int, int]]] = []
    if isinstance(sample_paths, (str, bytes)) or not isinstance(sample_paths, Iterable):
        raise ValueError(f"sample_paths must be a list of paths (lists of node indices), e.g. [[0, 1]]; "
                         f"got {sample_paths!r}")
    for s, path in enumerate(sample_paths):
        if isinstance(path, (str, bytes)) or not isinstance(path, Iterable):
            raise ValueError(f"sample_paths[{s}] = {path!r} is not a path: sample_paths is a list of paths, each a "
                             f"list of node indices root -> leaf, e.g. [[0, 1]] for one sample through nodes 0 and 1")
        path = [as_int(f"sample_paths[{s}]", p) for p in path]
        if len(set(path)) != len(path):
            raise ValueError(f"sample_paths[{s}] = {path} visits a node twice; a path goes root -> leaf once")
        for depth, node in enumerate(path):
            if not 0 <= node < n_nodes:
                raise ValueError(f"sample_paths[{s}] names node {node}; valid nodes are 0..{n_nodes - 1}")
            up = path[depth - 1] if depth else None
            if parent.setdefault(node, up) != up:
                raise ValueError(
                    f"sample_paths[{s}] gives node {node} the parent {up}, another path gave {parent[node]}; "
                    f"paths must form a tree (each node has one parent)"
                )
            node_range = (int(offs[node]), int(offs[node + 1]))
            for anc in [node] + path[:depth]:
                if (node, anc) in seen or lens[node] == 0 or lens[anc] == 0:
                    continue
                seen.add((node, anc))
                q_ranges.append(node_range)
                k_ranges.append((int(offs[anc]), int(offs[anc + 1])))
                types.append(AttnMaskType.CAUSAL if anc == node else AttnMaskType.FULL)
        sample_ranges.append([(int(offs[n]), int(offs[n + 1])) for n in path])
    return AttnMaskSpec(q_ranges, k_ranges, types, int(offs[-1])), sample_ranges


@family
def sliding_window(seqlens: Sequence[int], window: int, causal: bool = True) -> AttnMaskSpec:
    """Per-document sliding window: row ``i`` sees keys ``j`` with ``i - window < j <= i``.

    With ``causal=False`` the window is two-sided (``|i - j| < window``). The HF
    convention: ``window`` counts the row's own key. Built from diagonal bands cut
    into at most three typed slices per document, never a per-element mask.
    """
    window, causal = as_int("window", window), as_bool("causal", causal)
    if window < 1:
        raise ValueError(f"window must be >= 1 (keys per row, self included); got {window}")
    lens = _lengths("seqlens", seqlens)
    ends = np.cumsum(lens)
    starts = ends - lens
    hi = np.zeros_like(lens) if causal else np.full_like(lens, window - 1)
    table, _ = clip_band(starts, ends, starts, ends, np.full_like(lens, -(window - 1)), hi)
    return AttnMaskSpec.from_table(table, int(ends[-1]) if len(ends) else 0)


@family
def block_causal(block_sizes: Sequence[int]) -> AttnMaskSpec:
    """Blocks attend FULL to themselves and every earlier block (chunked/video generation)."""
    lens = _lengths("block_sizes", block_sizes)
    ends = np.cumsum(lens)
    starts = ends - lens
    keep = lens > 0
    q = np.stack([starts[keep], ends[keep]], axis=1).tolist()
    k = [(0, int(e)) for e in ends[keep]]
    return AttnMaskSpec(q, k, [AttnMaskType.FULL] * len(q), int(ends[-1]) if len(ends) else 0)


def _flat_ints(name: str, values: Any) -> np.ndarray:
    arr = as_int_array(name, values)
    return arr.reshape(-1) if name != "position_ids" else arr


@family
def from_cu_seqlens(cu_seqlens: Any, cu_seqlens_padded: Any = None) -> AttnMaskSpec:
    """Causal packed documents from cumulative lengths ``[0, l0, l0+l1, ...]``.

    With ``cu_seqlens_padded`` (the THD layout where each document is padded), document
    ``n`` starts at ``cu_seqlens_padded[n]``; its real ``cu_seqlens[n+1]-cu_seqlens[n]``
    tokens attend causally and its padding rows attend to nothing.
    """
    cu = _flat_ints("cu_seqlens", cu_seqlens)
    if len(cu) < 1 or cu[0] != 0 or (np.diff(cu) < 0).any():
        raise ValueError(f"cu_seqlens must start at 0 and never decrease; got {cu.tolist()}")
    lens = np.diff(cu)
    if cu_seqlens_padded is None:
        return varlen(lens.tolist())
    cup = _flat_ints("cu_seqlens_padded", cu_seqlens_padded)
    if len(cup) != len(cu) or cup[0] != 0 or (np.diff(cup) < lens).any():
        raise ValueError(
            "cu_seqlens_padded must have one entry per cu_seqlens entry, start at 0 and give every "
            f"document at least its real length; got {cup.tolist()} for cu_seqlens {cu.tolist()}"
        )
    keep = lens > 0
    starts = cup[:-1][keep]
    ranges = np.stack([starts, starts + lens[keep]], axis=1).tolist()
    return AttnMaskSpec(ranges, ranges, [AttnMaskType.CAUSAL] * len(ranges), int(cup[-1]))


@family
def from_position_ids(position_ids: Any) -> AttnMaskSpec:
    """Causal packed documents from HF-style ``position_ids`` (``[S]`` or ``[B, S]``).

    A document starts at index 0 of each row and wherever the position resets to 0;
    rows of a batch are laid out one after another.
    """
    pos = _flat_ints("position_ids", position_ids)
    if pos.ndim == 1:
        pos = pos[None, :]
    if pos.ndim != 2:
        raise ValueError(f"position_ids must be [S] or [B, S]; got shape {tuple(pos.shape)}")
    b, s = pos.shape
    starts = pos == 0
    starts[:, :1] = True  # [:, :1], not [:, 0]: S may be 0
    flat_starts = np.nonzero(starts.reshape(-1))[0]
    bounds = np.concatenate([flat_starts, [b * s]])
    return varlen(np.diff(bounds).tolist())


__all__ = sorted(FAMILIES)

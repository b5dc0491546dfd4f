"""``backend="auto"``: each part of a mask runs on the backend the measured cost table says is fastest,
within a memory budget.

``prepare`` keeps the slice table; the route is decided on first use per (dtype, heads,
head dim, softcap, device type), since what a backend can run depends on them. The router
knows no backend's internals: it asks each backend that can run the inputs for its
:class:`~.backend.Offer` (the parts of the table it runs, costed by its row of ``costs.py``)
and combines the answers into options:

* a *whole* option per backend of ``whole`` whose offer holds every cell (torch_sdpa offers
  only a single full/causal rectangle; cuDNN its launches; Triton the table);
* one *split*: each part the group backend (``split[0]``, cuDNN) offers runs there or on the
  rest backend (``split[1]``, Triton), whichever the rest's offer for that part says is cheaper;
  what the rest takes runs as one call. Parts merge by lse (forward) and are summed
  (backward) in float32 (float64 for float64 inputs), which costs time and memory too.

Options are taken cheapest first; one whose predicted extra memory (``extra_memory_bytes`` of
its parts, plus the split's merge buffers) exceeds the budget is skipped, so the next one
runs instead of running out of memory. The budget is ``memory_budget`` times the bytes of q, k
and v (default 4, environment variable ``FLEXCP_MEMORY_BUDGET``), and never below 256 MiB.
The rest backend's whole option is always admissible: Triton needs only its row statistics.
A route of several parts is checked to hold exactly the mask's cells, once per mask
(``mask.cover``). Without CUDA, or with no GPU backend able to run the inputs, the reference
runs everything. The distributed stages use this same router.

Inputs too large for a backend (the GPU kernels index with 32 bits: q and k below 2**31
elements, which 32 heads x 64 pass past 1,048,576 tokens) run in groups of KV heads, each
group routed as a call of its own: heads are independent, so the results are the same, and
the copies of one group's q/k/v and results are the extra memory, which one KV head per
group keeps smallest (1/heads of the call's).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mask.cover import cells, check_cover
from ..mask.geometry import SliceTable
from .backend import AttnBackend, Offer, get_backend, qkv_bytes, stat_dtype
from .compose import GradSum, merge_into
from .costs import COSTS, Cost

BUDGET_ENV = "FLEXCP_MEMORY_BUDGET"
DEFAULT_BUDGET = 4.0
"""Extra memory a route may need, in multiples of the bytes of q, k and v. A whole-mask Triton call
needs a few percent of that (its row statistics); a split's float32 merge buffers need about 4x
for 16-bit inputs, so at the default a split runs only where its parts need nearly nothing
else; a backend's workspace may take about as much again as the call's own tensors (q, k, v,
out and the gradients are about 2x). The issue this answers: cuDNN's padded backward workspace
took 23x (8.7 GiB on a 32k pack) up to an out-of-memory error at 256k (docs/benchmarks.md)."""
MIN_BUDGET_BYTES = 256 << 20
"""Budget floor: small calls keep their fastest route (fixed workspaces of a few MiB do not matter)."""


def memory_budget_factor(value: float | str | None = None) -> float:
    """The budget in multiples of q/k/v bytes: ``value``, else ``$FLEXCP_MEMORY_BUDGET``, else 4; ``inf`` disables it."""
    source = "memory_budget"
    if value is None:
        value, source = os.environ.get(BUDGET_ENV, "").strip() or DEFAULT_BUDGET, BUDGET_ENV
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = float("nan")
    if not factor > 0:  # also catches nan
        raise ValueError(
            f"{source}={value!r}: the router's memory budget must be a positive number, in multiples of "
            f"the bytes of q, k and v (default {DEFAULT_BUDGET:g}; 'inf' disables the budget)"
        )
    return factor


@dataclass
class Part:
    """One backend's share of the mask: its slices, schedule and modeled fwd+bwd seconds."""

    backend: AttnBackend
    table: SliceTable
    prep: Any
    est_s: float

    def describe(self) -> dict:
        return {"backend": self.backend.name, "slices": len(self.table), "cells": cells(self.table),
                "est_ms": round(self.est_s * 1e3, 4)}  # fmt: skip


@dataclass
class Route:
    parts: list
    options: dict  # option name -> modeled seconds (for reports)
    extra_bytes: int = 0  # predicted extra memory of this route
    over_budget: dict = field(default_factory=dict)  # option name -> predicted bytes, for options skipped
    budget_bytes: int = 0

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.parts]


@dataclass
class AutoPrep:
    table: SliceTable
    tq: int
    tk: int
    device: torch.device
    routes: dict = field(default_factory=dict, repr=False)
    head_groups: dict = field(default_factory=dict, repr=False)  # route key -> groups of KV heads per call


@dataclass
class _Option:
    """A candidate route: modeled seconds and (backend name, sub-table, est seconds) per part."""

    seconds: float
    parts: list


class AutoBackend(AttnBackend):
    """Routes mask parts by measured cost within a memory budget; see the module docstring."""

    name = "auto"

    def __init__(
        self,
        costs: dict[str, Cost] | None = None,
        whole: tuple[str, ...] = ("torch_sdpa", "cudnn", "triton"),
        split: tuple[str, str] = ("cudnn", "triton"),
        device_types: tuple[str, ...] = ("cuda",),
        memory_budget: float | None = None,
    ) -> None:
        """``whole``: backends costed for the whole mask; ``split``: (group backend, rest backend);
        ``memory_budget``: multiples of q/k/v bytes (None: ``$FLEXCP_MEMORY_BUDGET`` or 4, read per decision)."""
        self.costs = costs or COSTS
        self.whole = whole
        self.split = split
        self.device_types = device_types
        self.memory_budget = None if memory_budget is None else memory_budget_factor(memory_budget)

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> AutoPrep:
        return AutoPrep(table.nonempty(), int(tq), int(tk), torch.device(device))

    def label(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str:
        runnable = self._runnable(q, k, softcap)
        return f"auto ({'/'.join(runnable)})" if runnable else "reference"

    def route(self, prep: AutoPrep, q: torch.Tensor, k: torch.Tensor, softcap: float) -> Route:
        """The route for these inputs (decided once per dtype / heads / head dim / softcap)."""
        key = self._route_key(q, k, softcap)
        if key not in prep.routes:
            prep.routes[key] = self._decide(prep, q, k, softcap)
        return prep.routes[key]

    def head_groups(self, prep: AutoPrep, q: torch.Tensor, k: torch.Tensor, softcap: float) -> int:
        """Into how many groups of KV heads a call of these inputs is split (1: none), decided once per shape.

        One group per KV head when a backend that runs one KV head's share refuses the whole
        call (for its size); one KV head per call keeps the copies a group needs smallest.
        """
        key = self._route_key(q, k, softcap)
        if key not in prep.head_groups:
            hq, hkv = q.shape[1], k.shape[1]
            whole = set(self._runnable(q, k, softcap))
            one = set(self._runnable(q[:, : hq // hkv], k[:, :1], softcap))
            prep.head_groups[key] = 1 if one <= whole else hkv
        return prep.head_groups[key]

    @staticmethod
    def _route_key(q: torch.Tensor, k: torch.Tensor, softcap: float) -> tuple:
        return (q.dtype, q.shape[1], k.shape[1], q.shape[2], softcap > 0, q.device.type)

    def budget_bytes(self, tq: int, tk: int, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> float:
        """The most extra memory a route of a call of this shape may need."""
        factor = self.memory_budget if self.memory_budget is not None else memory_budget_factor()
        own = qkv_bytes(tq, tk, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)
        return max(factor * own, MIN_BUDGET_BYTES)

    def extra_memory_bytes(self, prep: AutoPrep, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """The prediction of the route decided for this shape (the most of any softcap / device), else the default."""
        decided = [r.extra_bytes for key, r in prep.routes.items() if key[:4] == (dtype, heads_q, heads_kv, head_dim)]
        if decided:
            return max(decided)
        return super().extra_memory_bytes(prep, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype)

    def _runnable(self, q, k, softcap) -> dict[str, AttnBackend]:
        out = {}
        if q.device.type in self.device_types:
            for name in dict.fromkeys(self.whole + self.split):
                try:
                    b = get_backend(name)
                except ValueError:
                    continue
                if b.unsupported(q, k, softcap) is None and name in self.costs:
                    out[name] = b
        return out

    # ------------------------------------------------------------------ decision
    def _decide(self, prep: AutoPrep, q, k, softcap) -> Route:
        table = prep.table
        shape = dict(heads_q=q.shape[1], heads_kv=k.shape[1], head_dim=q.shape[2])
        runnable = self._runnable(q, k, softcap)
        offers = {name: b.offer(table, prep.tq, prep.tk, self.costs[name], **shape) for name, b in runnable.items()}
        options = self._options(prep, table, offers, runnable, shape) if len(table) else {}
        if not options:  # nothing to run (any runnable backend will do), or nothing here runs it all: the reference
            ref = next(iter(runnable.values())) if runnable and not len(table) else get_backend("reference")
            return Route([Part(ref, table, ref.prepare(table, prep.tq, prep.tk, prep.device), 0.0)], {})
        budget = self.budget_bytes(prep.tq, prep.tk, dtype=q.dtype, **shape)
        fallback = self.split[1]
        over: dict[str, int] = {}
        for name in sorted(options, key=lambda n: options[n].seconds):
            parts = [Part(runnable[b], sub, runnable[b].prepare(sub, prep.tq, prep.tk, prep.device), est)
                     for b, sub, est in options[name].parts]  # fmt: skip
            need = self._extra_bytes(parts, prep, q.dtype, shape)
            if need <= budget or name == fallback:
                break
            over[name] = need
        else:  # every option is over budget and the fallback cannot run: the one that needs least
            name = min(over, key=over.get)
            parts = [Part(runnable[b], sub, runnable[b].prepare(sub, prep.tq, prep.tk, prep.device), est)
                     for b, sub, est in options[name].parts]  # fmt: skip
            need = over.pop(name)
        if len(parts) > 1:
            check_cover(table, [p.table for p in parts], f"backend='auto' route {name!r}")
        return Route(parts, {n: o.seconds for n, o in options.items()}, need, over, int(min(budget, 2**62)))

    def _options(self, prep: AutoPrep, table: SliceTable, offers: dict[str, Offer], runnable: dict, shape: dict) -> dict:
        """Every candidate route by name: each backend of ``whole`` whose offer holds all cells, and the split."""
        area = cells(table)
        options = {name: _Option(offers[name].total_s, [(name, table, offers[name].total_s)])
                   for name in self.whole if name in offers and offers[name].cells() == area}  # fmt: skip
        group, rest = self.split
        if group not in offers or rest not in offers or len(offers[group].parts) < 2:
            return options
        cost = self.costs[rest]
        mine, theirs = [], []
        for part, on_group in zip(offers[group].parts, offers[group].seconds):
            o = runnable[rest].offer(part, prep.tq, prep.tk, cost, **shape)
            on_rest = sum(o.seconds) if o.cells() == cells(part) else math.inf
            (mine if on_group <= on_rest else theirs).append((part, on_group, on_rest))
        if mine and theirs:
            # the two parts' outputs merge over the rows: the cost of a launch sharing rows
            merge = prep.tq * shape["heads_q"] * self.costs[group].shared_row_ns * 1e-9
            g_s = offers[group].call_s + sum(c for _, c, _ in mine)
            r_s = offers[rest].call_s + sum(c for _, _, c in theirs)
            options[f"{group}+{rest}"] = _Option(g_s + r_s + merge, [
                (group, SliceTable.concat([p for p, _, _ in mine]), g_s),
                (rest, SliceTable.concat([p for p, _, _ in theirs]), r_s),
            ])  # fmt: skip
        return options

    @staticmethod
    def _extra_bytes(parts: list, prep: AutoPrep, dtype: torch.dtype, shape: dict) -> int:
        """A route's predicted extra memory: its parts run one after another, so the most any needs;
        several parts add the merge buffers (forward: a stat-dtype out accumulator and one part's
        out; backward: stat-dtype sums of dq, dk, dv and one part's gradients)."""
        need = max(p.backend.extra_memory_bytes(p.prep, dtype=dtype, **shape) for p in parts)
        if len(parts) > 1:
            need += 2 * qkv_bytes(prep.tq, prep.tk, dtype=stat_dtype(dtype), **shape)
        return int(need)

    # ----------------------------------------------------------------- contract
    def forward(self, q, k, v, prep: AutoPrep, softmax_scale, softcap, out_dtype=None):
        groups = self.head_groups(prep, q, k, softcap)
        if groups > 1:
            return _by_head_groups(groups, q, k, (q,), (k, v), 2, lambda qs, kvs: self.forward(
                *qs, *kvs, prep, softmax_scale, softcap, out_dtype))
        route = self.route(prep, q, k, softcap)
        if len(route.parts) == 1:
            p = route.parts[0]
            return p.backend.forward(q, k, v, p.prep, softmax_scale, softcap, out_dtype)
        out = lse = None
        for p in route.parts:
            o, l = p.backend.forward(q, k, v, p.prep, softmax_scale, softcap, stat_dtype(q.dtype))
            if out is None:
                out, lse = o, l
            else:
                merge_into(out, lse, o, l)
        return out.to(out_dtype or q.dtype), lse

    def backward(self, do, q, k, v, out, lse, prep: AutoPrep, softmax_scale, softcap, grad_dtype=None):
        groups = self.head_groups(prep, q, k, softcap)
        if groups > 1:
            return _by_head_groups(groups, q, k, (do, q, out, lse), (k, v), 1, lambda qs, kvs: self.backward(
                qs[0], qs[1], *kvs, qs[2], qs[3], prep, softmax_scale, softcap, grad_dtype))
        route = self.route(prep, q, k, softcap)
        if len(route.parts) == 1:
            p = route.parts[0]
            return p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap, grad_dtype)
        sums = [GradSum(x.shape, x.device, q.dtype) for x in (q, k, v)]
        for p in route.parts:  # float32 partials, summed, converted once
            for acc, g in zip(sums, p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap)):
                acc.add(g)
        return tuple(s.result().to(grad_dtype or s.dtype) for s in sums)


def _by_head_groups(groups: int, q: torch.Tensor, k: torch.Tensor, per_q_head: tuple, per_kv_head: tuple,
                    q_results: int, call) -> tuple[torch.Tensor, ...]:
    """``call`` on each of ``groups`` groups of KV heads (with their query heads); results joined along heads.

    ``per_q_head`` / ``per_kv_head`` are split along dim 1 by query / KV heads and made contiguous
    (a group's own compact tensors keep its element offsets small). The first ``q_results``
    results are per query head, the rest per KV head; each group's result is written into its
    heads of one tensor for the whole call.
    """
    hq, hkv = q.shape[1], k.shape[1]
    joined: list[torch.Tensor] = []
    for g in range(groups):
        qh = slice(g * hq // groups, (g + 1) * hq // groups)
        kh = slice(g * hkv // groups, (g + 1) * hkv // groups)
        results = call([x[:, qh].contiguous() for x in per_q_head], [x[:, kh].contiguous() for x in per_kv_head])
        heads = [(qh, hq) if i < q_results else (kh, hkv) for i in range(len(results))]
        if not joined:
            joined = [r.new_empty((r.shape[0], n, *r.shape[2:])) for r, (_, n) in zip(results, heads)]
        for whole, r, (sl, _) in zip(joined, results, heads):
            whole[:, sl] = r
        del results
    return tuple(joined)

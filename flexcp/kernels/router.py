"""``backend="auto"``: each slice group runs on the backend the measured cost table says is fastest.

``prepare`` keeps the slice table; the route is decided on first use per (dtype, heads,
head dim, softcap), since what a backend can run depends on them. On CUDA the router
costs (costs.py) every whole-mask option a backend can run (torch's cuDNN SDPA for one
full/causal rectangle, the cuDNN backend, Triton) and one split option: the cuDNN
backend's launches (slice groups of one band shape with disjoint query rows) each go to
cuDNN or Triton, whichever the table says is cheaper, and what Triton takes runs as one
Triton call. Parts of a split are merged by lse (forward) and summed (backward), so one
mask can use two backends in one call. Without CUDA, or with no GPU backend able to run
the inputs, the reference runs everything. The distributed stages use this same router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..mask.geometry import SliceTable, slice_areas
from ..mask.types import FULL, CAUSAL
from .backend import AttnBackend, get_backend, stat_dtype
from .compose import GradSum, merge_into
from .costs import COSTS, FLOPS_PER_CELL, Cost


@dataclass
class Part:
    """One backend's share of the mask: its slices, schedule and modeled fwd+bwd seconds."""

    backend: AttnBackend
    table: SliceTable
    prep: Any
    est_s: float

    def describe(self) -> dict:
        return {"backend": self.backend.name, "slices": len(self.table), "cells": int(slice_areas(self.table).sum()),
                "est_ms": round(self.est_s * 1e3, 4)}  # fmt: skip


@dataclass
class Route:
    parts: list
    options: dict  # option name -> modeled seconds (for reports)

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.parts]


@dataclass
class AutoPrep:
    table: SliceTable
    tq: int
    tk: int
    device: torch.device
    routes: dict = field(default_factory=dict, repr=False)


def _kind_flops(table: SliceTable, hd: int) -> dict:
    """fwd+bwd flops by band kind (full / causal / band) of ``table``, per head."""
    area = slice_areas(table).astype(np.float64) * FLOPS_PER_CELL * hd
    kinds = np.where(table.types == FULL, 0, np.where(table.types == CAUSAL, 1, 2))
    return {name: float(area[kinds == i].sum()) for i, name in enumerate(("full", "causal", "band"))}


def _sig_kind(sig) -> str:
    return {(None, None): "full", (None, 0): "causal"}.get(sig, "band")


class AutoBackend(AttnBackend):
    """Routes slice groups by measured cost; see the module docstring."""

    name = "auto"

    def __init__(
        self,
        costs: dict[str, Cost] | None = None,
        whole: tuple[str, ...] = ("torch_sdpa", "cudnn", "triton"),
        split: tuple[str, str] = ("cudnn", "triton"),
        device_types: tuple[str, ...] = ("cuda",),
    ) -> None:
        """``whole``: backends costed for the whole mask; ``split``: (group backend, rest backend)."""
        self.costs = costs or COSTS
        self.whole = whole
        self.split = split
        self.device_types = device_types

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> AutoPrep:
        return AutoPrep(table.nonempty(), int(tq), int(tk), torch.device(device))

    def label(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str:
        runnable = self._runnable(q, k, softcap)
        return f"auto ({'/'.join(runnable)})" if runnable else "reference"

    def route(self, prep: AutoPrep, q: torch.Tensor, k: torch.Tensor, softcap: float) -> Route:
        """The route for these inputs (decided once per dtype / heads / head dim / softcap)."""
        key = (q.dtype, q.shape[1], k.shape[1], q.shape[2], softcap > 0, q.device.type)
        if key not in prep.routes:
            prep.routes[key] = self._decide(prep, q, k, softcap)
        return prep.routes[key]

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

    def _decide(self, prep: AutoPrep, q, k, softcap) -> Route:
        table, heads, hd = prep.table, q.shape[1], q.shape[2]
        gqa = q.shape[1] != k.shape[1]
        runnable = self._runnable(q, k, softcap)
        if not runnable or len(table) == 0:
            ref = get_backend("reference") if not runnable else next(iter(runnable.values()))
            return Route([Part(ref, table, ref.prepare(table, prep.tq, prep.tk, prep.device), 0.0)], {})
        flops = {kind: f * heads for kind, f in _kind_flops(table, hd).items()}
        options: dict[str, tuple[float, list]] = {}
        for name in self.whole:
            if name not in runnable:
                continue
            if name == "torch_sdpa":
                from .torch_sdpa import single_rect

                if single_rect(table) is None:
                    continue
            cost = self.costs[name]
            options[name] = (cost.seconds(flops, len(table), heads, gqa=gqa), [(name, table)])
        if self.split[0] in runnable:
            options.update(self._split_option(runnable, table, prep, heads, hd, gqa))
            # the group backend's whole-mask cost counts each of its launches
            options[self.split[0]] = (options.pop("_group_whole")[0], [(self.split[0], table)])
        name = min(options, key=lambda n: options[n][0])
        parts = []
        for backend_name, sub in options[name][1]:
            b = runnable[backend_name]
            est = self.costs[backend_name].seconds({kk: f * heads for kk, f in _kind_flops(sub, hd).items()}, len(sub), heads, gqa=gqa)
            parts.append(Part(b, sub, b.prepare(sub, prep.tq, prep.tk, prep.device), est))
        return Route(parts, {n: v[0] for n, v in options.items()})

    def _split_option(self, runnable, table, prep, heads, hd, gqa) -> dict:
        """Each launch of the cuDNN plan (a slice group) on the group backend or the rest backend, whichever costs less."""
        from .cudnn.backend import launch_table
        from .cudnn.plan import launch_rows_overlap, plan_launches, to_entries

        group, rest = self.split
        g_cost, r_cost = self.costs[group], self.costs.get(rest) if rest in runnable else None
        mine, theirs = [], []
        launches = plan_launches(to_entries(table), prep.tk)
        for la, shared in zip(launches, launch_rows_overlap(launches, prep.tq)):
            f = {_sig_kind(la.sig): la.area() * FLOPS_PER_CELL * hd * heads}
            span = la.row_span[1] - la.row_span[0]
            on_group = g_cost.seconds(f, len(la), heads, gqa=gqa) + shared * span * heads * g_cost.shared_row_ns * 1e-9
            on_rest = r_cost.seconds(f, len(la), heads, launches=0, gqa=gqa) if r_cost else float("inf")
            (mine if on_group <= on_rest else theirs).append((la, on_group, on_rest))
        out = {"_group_whole": (sum(c for _, c, _ in mine + theirs), None)}
        if not mine or not theirs:
            return out  # the whole-mask options cover this
        merge = prep.tq * heads * g_cost.shared_row_ns * 1e-9  # the two parts' outputs merge over the rows
        split = sum(c for _, c, _ in mine) + sum(t for _, _, t in theirs) + r_cost.launch_us * 1e-6 + merge
        parts = [(group, SliceTable.concat([launch_table(la) for la, _, _ in mine])),
                 (rest, SliceTable.concat([launch_table(la) for la, _, _ in theirs]))]  # fmt: skip
        out[f"{group}+{rest}"] = (split, parts)
        return out

    # ----------------------------------------------------------------- contract
    def forward(self, q, k, v, prep: AutoPrep, softmax_scale, softcap, out_dtype=None):
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
        route = self.route(prep, q, k, softcap)
        if len(route.parts) == 1:
            p = route.parts[0]
            return p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap, grad_dtype)
        sums = [GradSum(x.shape, x.device, q.dtype) for x in (q, k, v)]
        for p in route.parts:  # float32 partials, summed, converted once
            for acc, g in zip(sums, p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap)):
                acc.add(g)
        return tuple(s.result().to(grad_dtype or s.dtype) for s in sums)

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
from .backend import AttnBackend, get_backend
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

    def __init__(self, costs: dict[str, Cost] | None = None, gpu_backends: tuple[str, ...] = ("torch_sdpa", "cudnn", "triton")) -> None:
        self.costs = costs or COSTS
        self.gpu_backends = gpu_backends

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> AutoPrep:
        return AutoPrep(table.nonempty(), int(tq), int(tk), torch.device(device))

    def route(self, prep: AutoPrep, q: torch.Tensor, k: torch.Tensor, softcap: float) -> Route:
        """The route for these inputs (decided once per dtype / heads / head dim / softcap)."""
        key = (q.dtype, q.shape[1], k.shape[1], q.shape[2], softcap > 0, q.device.type)
        if key not in prep.routes:
            prep.routes[key] = self._decide(prep, q, k, softcap)
        return prep.routes[key]

    def _runnable(self, q, k, softcap) -> dict[str, AttnBackend]:
        out = {}
        if q.is_cuda:
            for name in self.gpu_backends:
                try:
                    b = get_backend(name)
                except ValueError:
                    continue
                if b.unsupported(q, k, softcap) is None and name in self.costs:
                    out[name] = b
        return out

    def _decide(self, prep: AutoPrep, q, k, softcap) -> Route:
        table, heads, hd = prep.table, q.shape[1], q.shape[2]
        runnable = self._runnable(q, k, softcap)
        if not runnable or len(table) == 0:
            ref = get_backend("reference") if not runnable else next(iter(runnable.values()))
            return Route([Part(ref, table, ref.prepare(table, prep.tq, prep.tk, prep.device), 0.0)], {})
        flops = {kind: f * heads for kind, f in _kind_flops(table, hd).items()}
        options: dict[str, tuple[float, list]] = {}
        if "torch_sdpa" in runnable:
            from .torch_sdpa import single_rect

            if single_rect(table) is not None:
                options["torch_sdpa"] = (self.costs["torch_sdpa"].seconds(flops, 1, heads), [("torch_sdpa", table)])
        if "triton" in runnable:
            options["triton"] = (self.costs["triton"].seconds(flops, len(table), heads), [("triton", table)])
        if "cudnn" in runnable:
            options.update(self._cudnn_options(runnable, table, prep, heads, hd))
        name = min(options, key=lambda n: options[n][0])
        parts = []
        for backend_name, sub in options[name][1]:
            b = runnable[backend_name]
            est = self.costs[backend_name].seconds({kk: f * heads for kk, f in _kind_flops(sub, hd).items()}, len(sub), heads)
            parts.append(Part(b, sub, b.prepare(sub, prep.tq, prep.tk, prep.device), est))
        return Route(parts, {n: v[0] for n, v in options.items()})

    def _cudnn_options(self, runnable, table, prep, heads, hd) -> dict:
        """The whole mask on cuDNN, and (with Triton) the per-launch split."""
        from .cudnn.backend import launch_table
        from .cudnn.plan import plan_launches, to_entries

        launches = plan_launches(to_entries(table), prep.tk)
        c_cost, t_cost = self.costs["cudnn"], self.costs.get("triton")
        whole = 0.0
        mine, theirs = [], []
        for la in launches:
            f = {_sig_kind(la.sig): la.area() * FLOPS_PER_CELL * hd * heads}
            on_cudnn = c_cost.seconds(f, len(la), heads)
            whole += on_cudnn
            on_triton = t_cost.seconds(f, len(la), heads, launches=0) if t_cost and "triton" in runnable else float("inf")
            (mine if on_cudnn <= on_triton else theirs).append((la, on_cudnn, on_triton))
        options = {"cudnn": (whole, [("cudnn", table)])}
        if mine and theirs:
            t_part = SliceTable.concat([launch_table(la) for la, _, _ in theirs])
            c_part = SliceTable.concat([launch_table(la) for la, _, _ in mine])
            split = sum(c for _, c, _ in mine) + sum(t for _, _, t in theirs) + t_cost.launch_us * 1e-6
            options["cudnn+triton"] = (split, [("cudnn", c_part), ("triton", t_part)])
        return options

    # ----------------------------------------------------------------- contract
    def forward(self, q, k, v, prep: AutoPrep, softmax_scale, softcap, out_dtype=None):
        route = self.route(prep, q, k, softcap)
        if len(route.parts) == 1:
            p = route.parts[0]
            return p.backend.forward(q, k, v, p.prep, softmax_scale, softcap, out_dtype)
        out = lse = None
        for p in route.parts:
            o, l = p.backend.forward(q, k, v, p.prep, softmax_scale, softcap, torch.float32)
            if out is None:
                out, lse = o, l
            else:
                merge_into(out, lse, o, l)
        return out.to(out_dtype or q.dtype), lse

    def backward(self, do, q, k, v, out, lse, prep: AutoPrep, softmax_scale, softcap):
        route = self.route(prep, q, k, softcap)
        if len(route.parts) == 1:
            p = route.parts[0]
            return p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap)
        sums = [GradSum(x.shape, x.device) for x in (q, k, v)]
        for p in route.parts:
            for acc, g in zip(sums, p.backend.backward(do, q, k, v, out, lse, p.prep, softmax_scale, softcap)):
                acc.add(g)
        return tuple(s.result() for s in sums)

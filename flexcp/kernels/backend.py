"""The contract every single-device attention backend implements, and the backend registry.

A backend computes attention of THD tensors over a slice mask, in two stateless steps
that the single-device autograd function and the distributed attention both drive:
``forward`` returns ``(out, lse)``; ``backward`` recomputes probabilities from the
*final* ``lse`` (which may merge several calls, e.g. one per CP stage) and returns this
call's share of ``(dq, dk, dv)``: in float32 for callers that accumulate partials, or in
the inputs' dtype (``grad_dtype``) for callers that use them as they are, so kernels that
write 16-bit gradients skip two conversion passes. Statistics and gradients are float64 for
float64 inputs (:func:`stat_dtype`), so float64 in is float64-exact out. ``prepare`` turns the slice table into
whatever host/device schedule the backend wants and is reusable across calls.
Two questions let the router (``backend="auto"``) choose without knowing any backend's
internals: ``offer`` says which parts of a slice table a backend runs and what each costs, and
``extra_memory_bytes`` predicts the device memory a call needs beyond its own tensors, which
the router keeps under a budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..mask.geometry import SliceTable, slice_areas
from .costs import Cost, flops_by_kind


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of lse, merged partials and gradient partials: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def qkv_bytes(tq: int, tk: int, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of q ``[tq, heads_q, head_dim]`` plus k and v ``[tk, heads_kv, head_dim]`` in ``dtype``."""
    return (int(tq) * heads_q + 2 * int(tk) * heads_kv) * head_dim * dtype.itemsize


def finiteness_gate(v: torch.Tensor) -> torch.Tensor:
    """A one-element float32 device tensor that is not finite when V holds a NaN/inf; no host sync.

    cuDNN's kernels multiply masked-out probabilities (exact zeros) by V inside a launch, so
    one non-finite value would reach rows that do not attend it (measured on cuDNN 9.19).
    The cuDNN-based backends therefore run as usual and then hand this gate to their
    fallback's ``*_into`` methods, which recompute the call (confining the value to the rows
    that attend it) only when the gate is not finite. The gate is V's float32 sum: one
    reduction, no sync (a host check cost 10-40% of a call, measured on the H200); a sum that
    overflows from finite values is a harmless false alarm (the exact path runs).
    """
    return v.sum(dtype=torch.float32).reshape(1)


def gate_open(gate: torch.Tensor | None) -> bool:
    """Host-side reading of :func:`finiteness_gate` (one sync), for backends without a device-side gate."""
    return gate is None or not bool(torch.isfinite(gate).all())


@dataclass(frozen=True)
class Offer:
    """What a backend runs of a slice table (:meth:`AttnBackend.offer`), with modeled fwd+bwd seconds.

    ``parts`` are sub-tables holding disjoint cells of the asked table (cells the backend cannot
    run are in none); ``seconds[i]`` is part ``i``'s time inside one call of the backend and
    ``call_s`` that call's overhead, however many parts it runs. A backend that runs a mask as
    pieces (cuDNN's launches) offers one part per piece, so the router may move pieces elsewhere.
    """

    parts: tuple = ()
    seconds: tuple = ()
    call_s: float = 0.0

    @property
    def total_s(self) -> float:
        """Modeled seconds of one call running every part."""
        return self.call_s + sum(self.seconds)

    def cells(self) -> int:
        return int(sum(int(slice_areas(p).sum()) for p in self.parts))


class AttnBackend(ABC):
    """One way of computing ``(out, lse)`` and its gradients for a slice mask."""

    name: str = "?"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str | None:
        """Why these inputs cannot run here (None when they can)."""
        return None

    def label(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str:
        """What runs inputs like these, for reports (the router names the backends it may route to)."""
        return self.name

    @abstractmethod
    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> Any:
        """Build the reusable schedule for ``table`` over ``tq`` query and ``tk`` key rows."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prep: Any,
        softmax_scale: float,
        softcap: float,
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``out [tq, hq, d]`` (``out_dtype`` or q's dtype; 0 on empty rows) and ``lse [tq, hq]`` in ``stat_dtype(q.dtype)`` (-inf on empty rows)."""

    @abstractmethod
    def backward(
        self,
        do: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        prep: Any,
        softmax_scale: float,
        softcap: float,
        grad_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This call's ``(dq, dk, dv)`` in ``grad_dtype`` (None: ``stat_dtype(q.dtype)``), from the final ``out``/``lse``."""

    def offer(self, table: SliceTable, tq: int, tk: int, cost: Cost, *, heads_q: int, heads_kv: int,
              head_dim: int) -> Offer:
        """The parts of ``table`` (over ``tq`` x ``tk`` rows) this backend runs, each costed by ``cost``.

        Default: all of it as one part, in one call (``cost.launch_us`` once). Asked only of backends
        whose ``unsupported`` is None for the inputs at hand.
        """
        work = cost.seconds(flops_by_kind(table, head_dim, heads_q), len(table), heads_q, launches=0,
                            gqa=heads_q != heads_kv)
        return Offer((table,), (work,), cost.launch_us * 1e-6)

    def extra_memory_bytes(self, prep: Any, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """Predicted peak device bytes of one forward+backward call with ``prep`` beyond q, k, v, out, lse,
        dout and the gradients themselves (workspaces, padding, float32 accumulators).

        The router (``backend="auto"``) never chooses a route whose prediction exceeds its memory
        budget. Default, conservative for backends that do not say: a ``stat_dtype`` copy of q, k, v
        and one of their gradients (what a backend that computes in float32 and accumulates
        float32 partials holds), read from ``prep.tq`` / ``prep.tk``; backends whose schedule lacks
        them, or that know better, override it.
        """
        return 2 * qkv_bytes(prep.tq, prep.tk, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                             dtype=stat_dtype(dtype))

    def forward_into(self, q, k, v, prep: Any, softmax_scale: float, softcap: float,
                     out: torch.Tensor, lse: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """Write ``forward`` into ``out``/``lse`` when ``gate`` (see :func:`finiteness_gate`) is open or None."""
        if gate_open(gate):
            o, l = self.forward(q, k, v, prep, softmax_scale, softcap, out.dtype)
            out.copy_(o), lse.copy_(l)

    def backward_into(self, do, q, k, v, out, lse, prep: Any, softmax_scale: float, softcap: float,
                      grads: tuple, gate: torch.Tensor | None = None) -> None:
        """Write ``backward`` into ``grads = (dq, dk, dv)`` when ``gate`` is open or None."""
        if gate_open(gate):
            for g, part in zip(grads, self.backward(do, q, k, v, out, lse, prep, softmax_scale, softcap, grads[0].dtype)):
                g.copy_(part)


_REGISTRY: dict[str, Callable[[], AttnBackend]] = {}
_INSTANCES: dict[str, AttnBackend] = {}


def register_backend(name: str, factory: Callable[[], AttnBackend]) -> None:
    """Make ``factory()`` available as ``backend=name`` (created lazily, once)."""
    _REGISTRY[name] = factory


def get_backend(name: str) -> AttnBackend:
    """The backend registered as ``name``; a clear error lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def available_backends() -> list[str]:
    return sorted(_REGISTRY)

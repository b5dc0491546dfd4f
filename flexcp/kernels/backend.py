"""The contract every single-device attention backend implements, and the backend registry.

A backend computes attention of THD tensors over a slice mask, in two stateless steps
that the single-device autograd function and the distributed attention both drive:
``forward`` returns ``(out, lse)``; ``backward`` recomputes probabilities from the
*final* ``lse`` (which may merge several calls, e.g. one per CP stage) and returns this
call's share of ``(dq, dk, dv)`` in float32. Statistics and gradients are float64 for
float64 inputs (:func:`stat_dtype`), so float64 in is float64-exact out. ``prepare`` turns the slice table into
whatever host/device schedule the backend wants and is reusable across calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from ..mask.geometry import SliceTable


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of lse, merged partials and gradient partials: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(v: torch.Tensor) -> bool:
    """Whether V is free of NaN/inf (one reduction and one host sync).

    cuDNN's kernels multiply masked-out probabilities (exact zeros) by V inside a launch, so
    one non-finite value would reach rows that do not attend it (measured on cuDNN 9.19).
    The cuDNN-based backends check V once per call and run such a call on their fallback
    (Triton), which confines the value to the rows that attend it; the backward sees the
    same V, so it takes the same route.
    """
    return bool(torch.isfinite(v).all())


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This call's ``(dq, dk, dv)`` in ``stat_dtype(q.dtype)``, using the final ``out``/``lse`` of the rows."""


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

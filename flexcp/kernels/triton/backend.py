"""TritonBackend: the GPU attention backend over arbitrary slice masks.

``prepare`` keeps the slice geometry; the per-launch work lists (schedule.py) are
built lazily for the tile shapes the chosen kernel configuration uses, copied to the
device once and cached on the prep object. Importing this module needs neither Triton
nor a GPU; the kernels are imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch

from ...mask.geometry import SliceTable
from ..backend import AttnBackend
from .configs import KernelConfig, default_configs
from .schedule import Schedule, forward_schedule, transposed_schedule

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class DeviceSchedule:
    """A :class:`Schedule`'s arrays on the device, plus its tile shape."""

    blocks: torch.Tensor
    order: torch.Tensor
    full: torch.Tensor
    masked: torch.Tensor
    block: int
    tile: int
    num_blocks: int

    @staticmethod
    def upload(s: Schedule, device: torch.device) -> "DeviceSchedule":
        # an empty list still gets one element: kernels need a valid pointer
        def put(a):
            return torch.from_numpy(a.reshape(-1) if a.size else np.zeros(1, dtype=np.int32)).to(device)

        return DeviceSchedule(
            put(s.blocks), put(s.order), put(s.full), put(s.masked), block=s.block, tile=s.tile, num_blocks=s.num_blocks
        )


@dataclass
class TritonPrep:
    """Slice geometry of one call plus lazily built device schedules keyed by tile shape."""

    table: SliceTable
    tq: int
    tk: int
    device: torch.device
    _cache: dict = field(default_factory=dict, repr=False)

    def schedule(self, kind: str, cfg: KernelConfig) -> DeviceSchedule:
        """``kind`` is ``"q"`` (query blocks: forward, dQ) or ``"k"`` (key blocks: dK/dV)."""
        key = (kind, cfg.block, cfg.tile)
        if key not in self._cache:
            if kind == "q":
                s = forward_schedule(self.table, self.tq, cfg.block, cfg.tile)
            else:
                s = transposed_schedule(self.table, self.tk, cfg.block, cfg.tile)
            self._cache[key] = DeviceSchedule.upload(s, self.device)
        return self._cache[key]

    @property
    def empty(self) -> bool:
        return len(self.table) == 0 or self.tk == 0


class TritonBackend(AttnBackend):
    """Flexible attention in Triton over any slice mask, forward and backward.

    The backward is always deterministic (bitwise reproducible): dK/dV and dQ come from
    separate kernels in which every output element has one writer, no atomics.
    ``configs`` overrides the tile shapes (a function ``(dtype, head_dim) -> LaunchConfigs``),
    for tuning and benchmarks.
    """

    name = "triton"

    def __init__(self, configs=None) -> None:
        self._configs = configs or default_configs

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, softcap: float) -> str | None:
        if q.device.type != "cuda" and not _interpreting():
            return "the triton backend needs CUDA tensors"
        if q.dtype not in SUPPORTED_DTYPES:
            return f"the triton backend supports {SUPPORTED_DTYPES}, got {q.dtype}"
        if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            return f"the triton backend supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
        for name, x in (("q", q), ("k", k)):
            if x.numel() > _INT32_LIMIT:
                return f"{name} has {x.numel()} elements; the triton backend indexes with int32 (< 2**31)"
        return None

    def prepare(self, table: SliceTable, tq: int, tk: int, device: torch.device) -> TritonPrep:
        return TritonPrep(table.nonempty(), int(tq), int(tk), torch.device(device))

    def extra_memory_bytes(self, prep: TritonPrep, *, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """The backward's float32 row statistics (lse in log2 and delta, ``[tq, heads_q]`` each); the kernels
        write out and the gradients directly and keep their accumulators on chip; the block schedules
        are int32 lists of a few entries per tile (kilobytes to a few MiB, not counted)."""
        return 2 * prep.tq * heads_q * 4

    def forward(self, q, k, v, prep: TritonPrep, softmax_scale, softcap, out_dtype=None):
        tq, hq, d = q.shape
        out = torch.empty(tq, hq, d, dtype=out_dtype or q.dtype, device=q.device)
        lse = torch.empty(tq, hq, dtype=torch.float32, device=q.device)
        self.forward_into(q, k, v, prep, softmax_scale, softcap, out, lse)
        return out, lse

    def forward_into(self, q, k, v, prep: TritonPrep, softmax_scale, softcap, out, lse, gate=None) -> None:
        """The forward written into ``out``/``lse``; with ``gate``, only when it is open (decided on the device)."""
        from .fwd import launch_forward

        _check_inputs(self, q, k, v, softcap, softmax_scale)
        if q.shape[0] == 0:
            return
        if prep.empty:
            if gate is None:
                out.zero_(), lse.fill_(float("-inf"))
            return  # a gated call changes nothing here: no row attends a key
        cfg = self._configs(q.dtype, q.shape[-1]).fwd
        launch_forward(q, k, v, out, lse, prep.schedule("q", cfg), float(softmax_scale), float(softcap), cfg, gate)

    def backward(self, do, q, k, v, out, lse, prep: TritonPrep, softmax_scale, softcap, grad_dtype=None):
        # the schedules cover every row and key, so the kernels write every element (in grad_dtype)
        gdt = grad_dtype or torch.float32
        grads = tuple(torch.empty(x.shape, dtype=gdt, device=x.device) for x in (q, k, v))
        self.backward_into(do, q, k, v, out, lse, prep, softmax_scale, softcap, grads)
        return grads

    def backward_into(self, do, q, k, v, out, lse, prep: TritonPrep, softmax_scale, softcap, grads, gate=None) -> None:
        """The backward written into ``grads = (dq, dk, dv)`` (any float dtype); with ``gate``, only when it is open."""
        from .bwd import backward_rowstats, launch_dkdv, launch_dq

        _check_inputs(self, q, k, v, softcap, softmax_scale)
        dq, dk, dv = grads
        if prep.empty or q.shape[0] == 0:
            if gate is None:
                for g in grads:
                    g.zero_()
            return
        do = _last_dim_contiguous(do.to(q.dtype))
        lse2, delta = backward_rowstats(do, _last_dim_contiguous(out), lse, gate)
        cfgs = self._configs(q.dtype, q.shape[-1])
        scale, cap = float(softmax_scale), float(softcap)
        launch_dkdv(q, k, v, do, lse2, delta, dk, dv, prep.schedule("k", cfgs.dkdv), scale, cap, cfgs.dkdv, gate)
        launch_dq(q, k, v, do, lse2, delta, dq, prep.schedule("q", cfgs.dq), scale, cap, cfgs.dq, gate)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(backend: AttnBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float, scale: float) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be THD [t, h, d] with v.shape == k.shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) with equal head dims")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0 for the triton backend; got {scale}")
    why = backend.unsupported(q, k, softcap)
    if why:
        raise ValueError(why)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (call .contiguous())")


__all__ = ["TritonBackend", "TritonPrep"]

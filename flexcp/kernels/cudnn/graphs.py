"""cuDNN frontend graphs (classic graph API) for ragged SDPA, forward and backward, cached by bucket.

One graph runs every launch of one :class:`GraphKey`: the signature's diagonal band,
the bucketed entry count and maximum lengths, the heads, head dim, dtype and scale.
Tensors are THD (``[b, h, s, d]`` dims over ``[tokens, heads, dim]`` memory) located by
int64 ragged element offsets; the softmax stats are float32 ``[tokens, heads]`` rows
(the layout of flexcp's lse), also ragged, so the forward writes lse in place and the
backward reads the *final* (merged) lse of the rows. Backward graphs size cuDNN's workspace by
the key's token totals (``max_total_seq_len_q/kv``) where the policy in workspace.py allows.

Importing this module needs neither cuDNN nor a GPU; ``cudnn`` is imported on first use.
"""

from __future__ import annotations

import atexit
import gc
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .plan import UNBOUNDED, Signature
from .workspace import Shape, Versions, parse_frontend

_IMPORT_ERROR: str | None = None


def cudnn_module() -> Any:
    """The ``cudnn`` frontend module, or None (``why_unavailable`` says why)."""
    global _IMPORT_ERROR
    try:
        import cudnn  # noqa: PLC0415 - optional dependency

        return cudnn
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libcudnn is not
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        return None


def why_unavailable() -> str | None:
    """None when the cuDNN frontend imports, else the reason and the fix."""
    if cudnn_module() is not None:
        return None
    return f"the cudnn backend needs nvidia-cudnn-frontend (pip install 'flexcp[cudnn]'); import failed: {_IMPORT_ERROR}"


@dataclass(frozen=True)
class GraphKey:
    """Everything a built graph depends on: its shape (entries, bucketed lengths, heads, head dim and,
    for backward graphs sized by tokens, the totals), direction, band signature, dtype, scale, device."""

    backward: bool
    sig: Signature
    shape: Shape
    dtype: torch.dtype
    scale: float
    device: int


@dataclass
class Built:
    graph: Any
    tensors: dict
    workspace: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    build_s: float = 0.0
    first_build_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


class GraphCache:
    """Built graphs by :class:`GraphKey`, least recently used evicted past ``size`` (one rule)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.stats = CacheStats()
        self._graphs: "OrderedDict[GraphKey, Built]" = OrderedDict()
        self._handles: dict[int, Any] = {}
        _LIVE.add(self)

    def __len__(self) -> int:
        return len(self._graphs)

    def handle(self, device: int) -> Any:
        """The cuDNN handle of ``device``, bound to torch's current stream."""
        cudnn = cudnn_module()
        if device not in self._handles:
            with torch.cuda.device(device):
                self._handles[device] = cudnn.create_handle()
        h = self._handles[device]
        cudnn.set_stream(h, torch.cuda.current_stream(device).cuda_stream)
        return h

    def versions(self, device: int) -> Versions:
        """cuDNN's backend and frontend versions and ``device``'s SM major (the workspace policy's inputs)."""
        cudnn = cudnn_module()
        major = torch.cuda.get_device_capability(device)[0]
        return Versions(int(cudnn.backend_version()), parse_frontend(getattr(cudnn, "__version__", "0.0")), major)

    def get(self, key: GraphKey) -> Built:
        if key in self._graphs:
            self._graphs.move_to_end(key)
            self.stats.hits += 1
            return self._graphs[key]
        t0 = time.perf_counter()
        built = (_build_backward if key.backward else _build_forward)(key, self.handle(key.device))
        dt = time.perf_counter() - t0
        if self.stats.misses == 0:
            self.stats.first_build_s = dt
        self.stats.misses += 1
        self.stats.build_s += dt
        self._graphs[key] = built
        if len(self._graphs) > self.size:
            self._graphs.popitem(last=False)
        return built

    def run(self, key: GraphKey, bindings: dict[str, torch.Tensor]) -> None:
        """Execute the graph of ``key`` with tensors bound by name."""
        built = self.get(key)
        ws = torch.empty(max(built.workspace, 1), dtype=torch.uint8, device=torch.device("cuda", key.device))
        pack = {built.tensors[name]: t for name, t in bindings.items()}
        built.graph.execute(pack, ws, handle=self.handle(key.device))

    def clear(self) -> None:
        self._graphs.clear()
        self.stats = CacheStats()


_LIVE: "weakref.WeakSet[GraphCache]" = weakref.WeakSet()


def _release_at_exit() -> None:
    """Drop every cache's built graphs and collect while the interpreter is whole.

    Graphs are nanobind objects of the cuDNN frontend; alive at interpreter teardown they made
    nanobind print dozens of "leaked function" lines after every script that used the cudnn
    backend. (The handles are plain integers; the process's exit releases them.)
    """
    for cache in list(_LIVE):
        cache.clear()
    gc.collect()


atexit.register(_release_at_exit)


def mask_args(cudnn: Any, sig: Signature, max_k: int) -> dict:
    """The band of ``sig`` as the graph API's preferred masking arguments (TOP_LEFT alignment)."""
    left, right = sig
    if left is None and right is None:
        return {}
    args = {"diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT}
    if left is not None:
        args["diagonal_band_left_bound"] = int(left)
    args["diagonal_band_right_bound"] = int(max_k if right == UNBOUNDED else right)
    return args


def _types(cudnn: Any, dtype: torch.dtype) -> Any:
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]


class _Declare:
    """Tensor declarations of one graph in flexcp's THD layout."""

    def __init__(self, cudnn: Any, graph: Any, key: GraphKey) -> None:
        self.cudnn, self.g, self.key = cudnn, graph, key
        self.tensors: dict[str, Any] = {}

    def _add(self, name: str, t: Any) -> Any:
        self.tensors[name] = t
        return t

    def dims(self, heads: int, rows: int) -> tuple[list, list]:
        d = self.key.shape.head_dim
        return [self.key.shape.batch, heads, rows, d], [rows * heads * d, d, heads * d, 1]

    def offsets(self, name: str) -> Any:
        i64 = self.cudnn.data_type.INT64
        return self._add(name, self.g.tensor(name=name, dim=[self.key.shape.batch + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i64))

    def lengths(self, name: str) -> Any:
        i32 = self.cudnn.data_type.INT32
        return self._add(name, self.g.tensor(name=name, dim=[self.key.shape.batch, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32))

    def thd(self, name: str, heads: int, rows: int, offsets: str) -> Any:
        dim, stride = self.dims(heads, rows)
        t = self.g.tensor(name=name, dim=dim, stride=stride, data_type=_types(self.cudnn, self.key.dtype))
        t.set_ragged_offset(self.tensors[offsets] if offsets in self.tensors else self.offsets(offsets))
        return self._add(name, t)

    def qkv(self) -> tuple[Any, Any, Any]:
        """The q, k, v inputs every graph starts from."""
        s = self.key.shape
        return self.thd("q", s.hq, s.max_q, "off_q"), self.thd("k", s.hkv, s.max_k, "off_k"), self.thd("v", s.hkv, s.max_k, "off_v")

    def stats_layout(self) -> tuple[list, list]:
        b, h, s = self.key.shape.batch, self.key.shape.hq, self.key.shape.max_q
        return [b, h, s, 1], [s * h, 1, h, 1]

    def output(self, name: str, t: Any, heads: int, rows: int, offsets: str) -> None:
        dim, stride = self.dims(heads, rows)
        t.set_output(True).set_dim(dim).set_stride(stride).set_data_type(_types(self.cudnn, self.key.dtype))
        t.set_ragged_offset(self.tensors[offsets] if offsets in self.tensors else self.offsets(offsets))
        self._add(name, t)


def _new_graph(cudnn: Any, key: GraphKey, handle: Any) -> Any:
    f32 = cudnn.data_type.FLOAT
    return cudnn.pygraph(io_data_type=_types(cudnn, key.dtype), intermediate_data_type=f32, compute_data_type=f32, handle=handle)


def _finish(g: Any, tensors: dict) -> Built:
    cudnn = cudnn_module()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return Built(g, tensors, int(g.get_workspace_size()))


def _build_forward(key: GraphKey, handle: Any) -> Built:
    cudnn = cudnn_module()
    g = _new_graph(cudnn, key, handle)
    dec = _Declare(cudnn, g, key)
    q, k, v = dec.qkv()
    o, stats = g.sdpa(
        name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=key.scale, use_padding_mask=True,
        seq_len_q=dec.lengths("seq_q"), seq_len_kv=dec.lengths("seq_k"), **mask_args(cudnn, key.sig, key.shape.max_k),
    )  # fmt: skip
    dec.output("o", o, key.shape.hq, key.shape.max_q, "off_o")
    dim, stride = dec.stats_layout()
    stats.set_output(True).set_data_type(cudnn.data_type.FLOAT).set_dim(dim).set_stride(stride)
    stats.set_ragged_offset(dec.offsets("off_stats"))
    dec.tensors["stats"] = stats
    return _finish(g, dec.tensors)


def _build_backward(key: GraphKey, handle: Any) -> Built:
    cudnn = cudnn_module()
    g = _new_graph(cudnn, key, handle)
    dec = _Declare(cudnn, g, key)
    q, k, v = dec.qkv()
    o = dec.thd("o", key.shape.hq, key.shape.max_q, "off_o")
    do = dec.thd("do", key.shape.hq, key.shape.max_q, "off_do")
    dim, stride = dec.stats_layout()
    stats = g.tensor(name="stats", dim=dim, stride=stride, data_type=cudnn.data_type.FLOAT)
    stats.set_ragged_offset(dec.offsets("off_stats"))
    dec.tensors["stats"] = stats
    s = key.shape
    by_tokens = {"max_total_seq_len_q": s.total_q, "max_total_seq_len_kv": s.total_k} if s.total_q else {}
    dq, dk, dv = g.sdpa_backward(
        name="sdpa_backward", q=q, k=k, v=v, o=o, dO=do, stats=stats, attn_scale=key.scale, use_padding_mask=True,
        seq_len_q=dec.lengths("seq_q"), seq_len_kv=dec.lengths("seq_k"), **mask_args(cudnn, key.sig, key.shape.max_k),
        **by_tokens,
    )  # fmt: skip
    dec.output("dq", dq, key.shape.hq, key.shape.max_q, "off_dq")
    dec.output("dk", dk, key.shape.hkv, key.shape.max_k, "off_dk")
    dec.output("dv", dv, key.shape.hkv, key.shape.max_k, "off_dv")
    return _finish(g, dec.tensors)

"""Run a function on N processes joined by a gloo process group, or NCCL with one GPU per rank (test helper).

`run_spawned(fn, world_size, *args, **kwargs)` calls `fn(rank, world_size, *args, **kwargs)` on every
rank and returns the per-rank results in rank order, or re-raises the first failure with the child's
traceback in the message. It never hangs: collectives time out after `PG_TIMEOUT_S` in the children,
and the parent gives up after `timeout` seconds.

Start-up cost: importing torch takes seconds per process, so workers are forked from a
multiprocessing forkserver that has torch preloaded (fresh interpreters, not copies of the pytest
process), and the workers with their process group are kept per world size and reused by later
calls. A pool is torn down when a rank dies, times out, or fails while another rank is still busy
(it may be stuck in a collective); when every rank answers, even with errors, it is reused. State a
function leaves in a worker (module caches, extra groups) is seen by later calls of the same world
size; a test that needs pristine processes calls `shutdown_pools()` first.

`fn` must be a module-level function. Test folders need no `__init__.py`: the child imports `fn`'s
module by name, else loads it from its file, with that file's folder put on `sys.path`.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

PG_TIMEOUT_S = 60.0  # a collective waiting longer than this raises in the child instead of hanging
START_TIMEOUT_S = 120.0  # starting N workers on a small, busy CI machine
FAILURE_GRACE_S = 1.0  # after a failure, how long the other ranks get to answer before the pool is dropped


class RankFailedError(RuntimeError):
    """A rank died, timed out, or raised an exception whose type cannot be rebuilt in the parent."""


def run_spawned(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, pg_backend: str = "gloo", **kwargs: Any
) -> list:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` ranks; return results in rank order.

    ``pg_backend="nccl"`` joins them over NCCL instead of gloo, rank ``r`` on GPU ``r``.

    Arguments and results travel by pickle (tensors by value). The first failure to reach the parent
    (not necessarily the lowest failing rank: match messages rank-independently) is re-raised with the
    child's exception type where it can be rebuilt from a message (else RankFailedError), the message
    naming the rank and carrying the child's full traceback.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    name = getattr(fn, "__name__", "<lambda>")
    if not callable(fn) or name == "<lambda>" or getattr(fn, "__qualname__", None) != name:
        raise ValueError(f"fn must be a module-level function (picklable by name), got {fn!r}")
    if pg_backend not in ("gloo", "nccl"):
        raise ValueError(f"pg_backend must be 'gloo' or 'nccl' (one GPU per rank), got {pg_backend!r}")
    slot = (world_size, pg_backend)
    pool = _pools.get(slot)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _pools[slot] = _Pool(world_size, pg_backend)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except _TaskFailed as failed:
        if not failed.pool_reusable:
            pool.close()
            _pools.pop(slot, None)
        raise failed.error from None
    except BaseException:
        pool.close()
        _pools.pop(slot, None)
        raise


def shutdown_pools() -> None:
    """Stop every worker pool (the next `run_spawned` starts fresh processes)."""
    for pool in list(_pools.values()):
        pool.close()
    _pools.clear()


_pools: dict[tuple[int, str], "_Pool"] = {}
atexit.register(shutdown_pools)


class _TaskFailed(Exception):
    def __init__(self, error: BaseException, pool_reusable: bool) -> None:
        self.error, self.pool_reusable = error, pool_reusable


class _Pool:
    """`world_size` workers, each with one duplex pipe to the parent."""

    def __init__(self, world_size: int, pg_backend: str = "gloo") -> None:
        self.world_size = world_size
        self.tmpdir = tempfile.mkdtemp(prefix="flexcp_gloo_")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            store_path = os.path.join(self.tmpdir, "store")
            proc = ctx.Process(target=_worker_main, args=(rank, world_size, store_path, child_end, pg_backend), daemon=True)
            proc.start()
            child_end.close()
            self.conns.append(parent_end)
            self.procs.append(proc)
        try:
            self._collect(f"{pg_backend} process group start-up", START_TIMEOUT_S)
        except _TaskFailed as failed:
            self.close()
            raise failed.error from None

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> list:
        module = sys.modules.get(fn.__module__)
        fn_ref = (fn.__module__, fn.__qualname__, getattr(module, "__file__", None))
        # args are unpickled only after fn's module is imported: they may hold classes defined there
        payload = pickle.dumps((list(sys.path), fn_ref, pickle.dumps((args, kwargs))))
        for conn in self.conns:
            conn.send_bytes(payload)
        return self._collect(f"{fn.__module__}.{fn.__qualname__}", timeout)

    def _collect(self, what: str, timeout: float) -> list:
        """One reply per rank, in rank order; _TaskFailed on the first error, death or the deadline."""
        results: dict[int, Any] = {}
        first_error: BaseException | None = None
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self.conns))
        while pending:
            waitables = list(pending.values()) + [self.procs[r].sentinel for r in pending]
            ready = wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if first_error is not None:  # some rank is stuck, likely in a collective with the failed one
                    raise _TaskFailed(first_error, pool_reusable=False)
                error = RankFailedError(f"{what}: timed out after {timeout:g}s; ranks {sorted(pending)} did not answer")
                raise _TaskFailed(error, pool_reusable=False)
            for rank, conn in list(pending.items()):
                if not conn.poll():
                    continue
                try:
                    ok, body = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise _TaskFailed(self._death(what, rank), pool_reusable=False) from None
                del pending[rank]
                if ok:
                    results[rank] = pickle.loads(body)
                elif first_error is None:
                    first_error = _rebuild_error(what, rank, *body)
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            for rank in pending:
                if not self.procs[rank].is_alive():
                    raise _TaskFailed(first_error or self._death(what, rank), pool_reusable=False)
        if first_error is not None:  # every rank answered: the workers are idle and reusable
            raise _TaskFailed(first_error, pool_reusable=True)
        return [results[r] for r in range(self.world_size)]

    def _death(self, what: str, rank: int) -> RankFailedError:
        self.procs[rank].join(1.0)
        return RankFailedError(f"{what}: rank {rank} died (exit code {self.procs[rank].exitcode}) without a result")

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.procs, self.conns = [], []


def _rebuild_error(what: str, rank: int, exc_type_bytes: bytes | None, text: str, tb: str) -> BaseException:
    """The child's exception type, rebuilt from a message with the child's traceback; else RankFailedError."""
    message = f"{what} failed on rank {rank}: {text}\n\n--- traceback of rank {rank} ---\n{tb}"
    try:
        exc_type = pickle.loads(exc_type_bytes) if exc_type_bytes else RankFailedError
        if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
            exc_type = RankFailedError
        return exc_type(message)
    except Exception:
        return RankFailedError(message)


# ----------------------------------------------------------------------------------------- child side


def _worker_main(rank: int, world_size: int, store_path: str, conn: Connection, pg_backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share a few CI cores
        store = dist.FileStore(store_path, world_size)
        timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
        if pg_backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank
        dist.init_process_group(pg_backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        conn.send_bytes(pickle.dumps((True, pickle.dumps(None))))
    except BaseException as exc:
        conn.send_bytes(pickle.dumps((False, _describe(exc))))
        return
    while True:
        try:
            task = pickle.loads(conn.recv_bytes())
        except EOFError:
            break
        if task is None:
            break
        parent_path, fn_ref, packed = task
        sys.path[:0] = [p for p in parent_path if p not in sys.path]
        try:
            fn = _resolve(fn_ref)
            args, kwargs = pickle.loads(packed)
            reply = (True, pickle.dumps(fn(rank, world_size, *args, **kwargs)))
        except BaseException as exc:
            reply = (False, _describe(exc))
        conn.send_bytes(pickle.dumps(reply))
    dist.destroy_process_group()


def _resolve(fn_ref: tuple[str, str, str | None]) -> Callable[..., Any]:
    """Import `fn`'s module by name, else load it from its file (test folders have no __init__.py)."""
    module_name, qualname, path = fn_ref
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if path is None:
                raise
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(exc: BaseException) -> tuple[bytes | None, str, str]:
    try:
        exc_type = pickle.dumps(type(exc))
    except Exception:
        exc_type = None
    return exc_type, f"{type(exc).__name__}: {exc}", traceback.format_exc()

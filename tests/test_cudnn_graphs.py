"""The cuDNN graph cache on CPU: built graphs are released at exit while the interpreter is whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from flexcp.kernels.cudnn import graphs
from flexcp.kernels.cudnn.graphs import Built, GraphCache, GraphKey
from flexcp.kernels.cudnn.workspace import Shape


def fake_key(i: int) -> GraphKey:
    return GraphKey(True, (None, 0), Shape(1, 128, 128, 2, 2, 16, 128 * i, 128), torch.bfloat16, 0.25, 0)


def test_exit_hook_drops_every_cache_s_graphs():
    caches = [GraphCache(), GraphCache()]
    for i, cache in enumerate(caches):
        cache._graphs[fake_key(i + 1)] = Built(object(), {}, 0)
    graphs._release_at_exit()
    assert [len(c) for c in caches] == [0, 0]


def test_graphs_are_gone_before_interpreter_teardown():
    """A frontend object held by a cache in a reference cycle is collected by the exit hook, i.e.
    before an atexit hook registered earlier (hooks run last-in first-out) looks at it."""
    script = textwrap.dedent(
        """
        import atexit, weakref
        seen = {}
        atexit.register(lambda: print("alive" if seen["ref"]() is not None else "released"))
        import torch
        from flexcp.kernels.cudnn.graphs import Built, GraphCache, GraphKey
        from flexcp.kernels.cudnn.workspace import Shape

        class FrontendGraph:
            pass

        g = FrontendGraph()
        g.cycle = g
        seen["ref"] = weakref.ref(g)
        cache = GraphCache()
        cache._graphs[GraphKey(True, (None, 0), Shape(1, 128, 128, 2, 2, 16), torch.bfloat16, 0.25, 0)] = Built(g, {}, 0)
        del g
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "released"

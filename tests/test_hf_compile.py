"""``torch.compile`` of HF models with ``attn_implementation="magi"``: one graph, no recompiles, eager's numbers.

The compiled model is called first on a new packed batch (as a training run starts), at
cp = 1 (the model called directly with packed ``position_ids``) and at cp = 2 on gloo
(through ``magi_prepare_batch``, the key forwarded as ``magi_key``). The counting backend
runs AOTAutograd (the custom ops' fake implementations and autograd) and counts compiled
graphs: exactly one per forward means no graph break inside attention; a second batch with
another mask (same length) must not compile again; loss and gradients equal the eager model's.
At cp = 1 the mask is inferred once per step (forward and backward), not once per layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import flexcp.magi_attn_utils as mau  # noqa: E402
from flexcp.hf.step_key import STEP_KEYS  # noqa: E402
from hf_models import VOCAB, make_model  # noqa: E402
from multiproc import run_spawned  # noqa: E402


def _packed(lens: list[int], seed: int) -> dict:
    """A packed row of documents of ``lens`` tokens: ids, restarting positions, pre-shifted labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[torch.tensor(lens).cumsum(0) - 1] = -100
    return {"input_ids": ids[None], "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
            "labels": labels[None]}


BATCHES = ([13, 17, 10], [5, 20, 15])
"""Two steps: same length, different documents (a new mask)."""


def _step(model: torch.nn.Module, batch: dict, run=None) -> tuple[torch.Tensor, dict]:
    """Summed token loss of one forward/backward through ``run`` (default: ``model``) and ``model``'s gradients."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    logits = (model if run is None else run)(**kwargs, use_cache=False).logits.reshape(-1, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_err(a: tuple, b: tuple) -> float:
    (la, ga), (lb, gb) = a, b
    return max([float(abs(la - lb) / abs(lb))] + [float((ga[n] - g).abs().max() / (g.abs().max() + 1e-6))
                                                  for n, g in gb.items()])


@pytest.fixture(autouse=True)
def _fresh():
    mau.register_magi_attention()
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_magi_cp1_one_graph_no_recompile_equals_eager(arch: str) -> None:
    eager, compiled_model = make_model(arch, "magi"), make_model(arch, "magi")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=backend)
    for i, lens in enumerate(BATCHES):
        batch = _packed(lens, seed=i)
        before = STEP_KEYS.resolutions
        got = _step(compiled_model, batch, compiled)
        assert backend.frame_count == 1, f"batch {i}: {backend.frame_count} graphs (a break or a recompile)"
        # eager on copies of the tensors (new objects: the cache does not know them), each layer asking
        want = _step(eager, {k: v.clone() for k, v in batch.items()})
        assert STEP_KEYS.resolutions - before == 2, "the step's mask must be inferred once per step, not per layer"
        assert _max_err(got, want) < 1e-5
    assert not counters["graph_break"], dict(counters["graph_break"])


def _cp2_compiled(rank: int, world_size: int) -> dict:
    """Each rank: the compiled model on its shard of two prepared batches vs the eager model; counts and errors."""
    mau.register_magi_attention()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    eager, compiled_model = make_model("llama", "magi"), make_model("llama", "magi")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=backend)
    frames, errs = [], []
    for i, lens in enumerate(BATCHES):
        local = {}
        for model in (compiled_model, eager):
            local, key = mau.magi_prepare_batch(model, _packed(lens, seed=i), dist.group.WORLD)
            assert key.cp_size == world_size
        local.pop("shift_labels")
        errs.append(_max_err(_step(compiled_model, local, compiled), _step(eager, local)))
        frames.append(backend.frame_count)
    return {"frames": frames, "errs": errs, "breaks": len(counters["graph_break"])}


def test_compiled_magi_cp2_one_graph_no_recompile_equals_eager() -> None:
    for rank, res in enumerate(run_spawned(_cp2_compiled, 2, timeout=300)):
        assert res["frames"] == [1, 1], f"rank {rank}: graphs after each batch {res['frames']}"
        assert res["breaks"] == 0 and max(res["errs"]) < 1e-5, f"rank {rank}: {res}"


def test_compiled_kernel_attention_takes_a_new_mask_without_recompiling() -> None:
    """``flexcp.attention`` (the ``flexcp::attention`` op) compiled: one graph, a new spec of the same length reuses it."""
    from flexcp import attention
    from flexcp.mask import AttnMaskSpec

    def loss(q, k, v, spec):
        return attention(q, k, v, spec)[0].square().sum()

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    specs = (AttnMaskSpec([(0, 10), (10, 24)], [(0, 10), (10, 24)], ["causal", "causal"], 24),
             AttnMaskSpec([(0, 24), (4, 24)], [(0, 4), (4, 24)], ["full", "bi_causal"], 24))
    for spec in specs:
        got = torch.autograd.grad(compiled(q, k, v, spec), (q, k, v))
        want = torch.autograd.grad(loss(q, k, v, spec), (q, k, v))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert backend.frame_count == 1

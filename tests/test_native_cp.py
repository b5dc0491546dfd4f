"""NativeCPTrainer (flexcp.bench.native_cp): torch context_parallel wiring equals cp = 1 training.

torch's ring attention runs only the CUDA SDPA kernels, so on CPU the test keeps the real
``context_parallel`` (head-tail sharding of the buffers, in place) and swaps only its
SDPA dispatch (private ``_enable/_disable_context_parallel_dispatcher_impl``) for an exact
stand-in: all-gather K/V with autograd, causal mask on global positions. What is checked is
the trainer around it: sharded labels and positions, loss normalization, backward inside
the context, gradients summed over the CP group.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from multiproc import run_spawned

SEQ_LEN = 256


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 2; backward: all-reduce the gradient and keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.s = group, dist.get_rank(group), x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.s:(ctx.rank + 1) * ctx.s], None


def _stand_in_dispatcher(cpa, orig_sdpa):
    """``(enable, disable)`` replacing ``F.scaled_dot_product_attention`` by exact causal attention over the CP group."""
    import torch.nn.functional as F

    def enable(seq_dim: int, mesh) -> None:
        group, cp, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            assert is_causal and attn_mask is None and not enable_gqa
            s = q.shape[2]
            c = s // 2  # head-tail: rank i holds chunks i and 2 cp - 1 - i of 2 cp
            k, v = _GatherSeq.apply(k, group), _GatherSeq.apply(v, group)
            pos = torch.cat([torch.cat([torch.arange(i * c, (i + 1) * c), torch.arange((2 * cp - 1 - i) * c, (2 * cp - i) * c)])
                             for i in range(cp)])
            mask = pos[rank * s:(rank + 1) * s, None] >= pos[None, :]
            return orig_sdpa(q, k, v, attn_mask=mask, scale=scale)

        F.scaled_dot_product_attention = sdpa

    def disable() -> None:
        F.scaled_dot_product_attention = orig_sdpa

    return enable, disable


@contextlib.contextmanager
def _stand_in_ring(cp: int):
    """With cp > 1, torch's CP dispatcher swapped for the exact stand-in; everything restored afterwards."""
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental._context_parallel import _attention as cpa

    orig = (F.scaled_dot_product_attention, cpa._enable_context_parallel_dispatcher_impl,
            cpa._disable_context_parallel_dispatcher_impl)
    try:
        if cp > 1:
            cpa._enable_context_parallel_dispatcher_impl, cpa._disable_context_parallel_dispatcher_impl = (
                _stand_in_dispatcher(cpa, orig[0]))
        yield orig[0]
    finally:
        F.scaled_dot_product_attention = orig[0]
        cpa._enable_context_parallel_dispatcher_impl, cpa._disable_context_parallel_dispatcher_impl = orig[1:]


def _train(rank: int, world: int, cp: int) -> list[float]:
    """Two steps of the tiny preset on sequence 0: ``[loss1, grad_norm1, loss2]``."""
    import torch.nn.functional as F

    from flexcp.bench.native_cp import NativeCPTrainer
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    cfg = from_dict({
        "out_dir": "/tmp/flexcp_test_native_cp",
        "model": {"preset": "tiny", "attn_implementation": "sdpa", "activation_checkpointing": True},
        "data": {"kind": "recall", "seq_len": SEQ_LEN},
        "train": {"steps": 10, "lr": 1e-3, "warmup_steps": 0, "dtype": "fp32"},
        "checkpoint": {"resume": False, "export_hf": False},
        "logging": {"progress": "none"},
    })
    with _stand_in_ring(cp) as orig_sdpa:
        trainer = Trainer(cfg) if cp == 1 else NativeCPTrainer(cfg, cp)
        first = trainer.train_step()
        assert F.scaled_dot_product_attention is orig_sdpa, "the CP context must be closed after the step"
        second = trainer.train_step()
        return [first.loss, first.grad_norm, second.loss, first.tokens]


def test_native_cp2_matches_cp1():
    ref = run_spawned(_train, 1, 1, timeout=300)[0]
    got = run_spawned(_train, 2, 2, timeout=300)
    assert got[0] == got[1]  # both CP ranks report the global numbers
    assert got[0][3] == ref[3] == SEQ_LEN  # dp = 1 in both: one sequence per step
    assert got[0][:3] == pytest.approx(ref[:3], rel=1e-4)


def test_native_cp_rejects_bad_config():
    from flexcp.bench.native_cp import NativeCPTrainer
    from flexcp.train.config import from_dict

    cfg = from_dict({"model": {"preset": "tiny", "attn_implementation": "magi"}})
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        NativeCPTrainer(cfg, 2)


def _train_pack(rank: int, world: int, cp: int) -> list[float]:
    """One step on a pack of documents: native CP as one causal sequence (cp) or magi with a causal mask (cp = 1)."""
    import dataclasses
    import types
    from pathlib import Path

    from flexcp.bench.e2e_trainers import build_trainer, use_sequence
    from flexcp.bench.e2e_workloads import FixedSource, packed_documents
    from flexcp.bench.native_cp import NativeCPTrainer
    from flexcp.mask import AttnMaskSpec
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    def cfg(impl):
        return from_dict({
            "out_dir": "/tmp/flexcp_test_native_pack", "model": {"preset": "tiny", "attn_implementation": impl},
            "data": {"kind": "recall", "seq_len": SEQ_LEN}, "train": {"steps": 10, "dtype": "fp32"},
            "checkpoint": {"resume": False, "export_hf": False}, "logging": {"progress": "none"}})

    pack = packed_documents(SEQ_LEN, 256, seed=2)
    assert pack.spec.area() < SEQ_LEN * (SEQ_LEN + 1) // 2  # several documents
    with _stand_in_ring(cp):
        if cp == 1:  # the same tokens and positions under one causal mask
            trainer = Trainer(cfg("magi"))
            trainer.source = FixedSource(dataclasses.replace(pack, spec=AttnMaskSpec.causal(SEQ_LEN)))
        else:
            strict = NativeCPTrainer(cfg("sdpa"), cp)
            strict.source = FixedSource(pack)
            with pytest.raises(ValueError, match="packed_as_causal=True"):
                strict.train_step()
            args = types.SimpleNamespace(out=Path("/tmp/flexcp_test_native_pack"), chunk_size=64, cpu=True)
            trainer = build_trainer("native", cp, "tiny", {}, args)  # the e2e benchmark's native contender
            assert isinstance(trainer, NativeCPTrainer) and trainer.packed_as_causal
            use_sequence(trainer, pack)
        m = trainer.train_step()
        return [m.loss, m.grad_norm]


def test_native_cp_trains_a_pack_as_one_causal_sequence():
    ref = run_spawned(_train_pack, 1, 1, timeout=300)[0]
    got = run_spawned(_train_pack, 2, 2, timeout=300)
    assert got[0] == pytest.approx(ref, rel=1e-4)

"""cp = 2 and dp = 2 give the loss and gradients of cp = 1, step after step (gloo, CPU).

Activation checkpointing (recomputing each layer, its distributed attention included, in
backward) must not change them either.

The recipe normalizes each rank's loss sum by the step's global label count and FSDP2 sums
gradients over dp x cp, so every layout of the same global batch must agree: one process
with 2 accumulated micro-batches, cp = 2 with 2 accumulated micro-batches, and dp = 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multiproc import run_spawned

STEPS = 3


def _train(rank: int, world: int, cfg: dict) -> dict | None:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    trainer = Trainer(from_dict(cfg))
    losses, norms, grads = [], [], []
    for _ in range(STEPS):
        m = trainer.train_step()
        losses.append(m.loss)
        norms.append(m.grad_norm)
        grads.append({n: p.grad.full_tensor() for n, p in trainer.model.named_parameters()})
    compiled = getattr(trainer.model, "_compiled_call_impl", None) is not None
    return {"loss": losses, "norm": norms, "grads": grads, "compiled": compiled} if rank == 0 else None


def _data(tmp_path, kind: str) -> str:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "long", "context", "parallel", "mask"]
    text = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
    if kind == "jsonl":
        recs = [{"text": text(int(rng.integers(3, 25)))} for _ in range(30)]
        recs += [{"messages": [{"role": "user", "content": text(4)}, {"role": "assistant", "content": text(6)}]}] * 4
    else:
        recs = [{"prompt": text(int(rng.integers(4, 12))), "completions": [text(int(rng.integers(1, 8)))
                                                                            for _ in range(int(rng.integers(2, 5)))]}
                for _ in range(20)]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _cfg(tmp_path, kind: str, cp: int, dp: int, ac: bool = False) -> dict:
    return {
        "out_dir": str(tmp_path / f"run_{kind}_{cp}_{dp}_{ac}"),
        "model": {"preset": "tiny", "attn_implementation": "magi", "activation_checkpointing": ac},
        "data": {"kind": kind, "path": _data(tmp_path, kind), "seq_len": 256},
        "parallel": {"cp": cp, "dp": dp, "chunk_size": 32},
        "train": {"steps": 10, "grad_accum": 2 // dp, "lr": 1e-3, "warmup_steps": 0, "loss_chunk_tokens": 64},
        "checkpoint": {"resume": False},
        "logging": {"progress": "none"},
    }


@pytest.mark.parametrize("kind", ["jsonl", "rollouts"])
def test_cp2_and_dp2_match_cp1(tmp_path, kind):
    ref = run_spawned(_train, 1, _cfg(tmp_path, kind, cp=1, dp=1), timeout=300)[0]
    layouts = [(2, 1, False), (1, 2, False)] + ([(2, 1, True)] if kind == "jsonl" else [])  # + activation ckpt
    for cp, dp, ac in layouts:
        got = run_spawned(_train, 2, _cfg(tmp_path, kind, cp=cp, dp=dp, ac=ac), timeout=300)[0]
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-6, err_msg=f"loss, cp={cp} dp={dp}")
        np.testing.assert_allclose(got["norm"], ref["norm"], rtol=2e-5, err_msg=f"grad norm, cp={cp} dp={dp}")
        for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
            for name in r:
                torch.testing.assert_close(g[name], r[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"cp={cp} dp={dp} step {step + 1} {name}: {m}")
    assert ref["loss"][-1] < ref["loss"][0]  # it trains


def test_compiled_recipe_equals_eager(tmp_path):
    """``model.compile`` (the recipe's compile switch) runs the step compiled with the losses and gradients of eager."""
    runs = []
    for backend in ("off", "aot_eager"):
        (tmp_path / backend).mkdir()
        cfg = _cfg(tmp_path / backend, "jsonl", cp=1, dp=1)
        cfg["model"]["compile"] = backend
        runs.append(run_spawned(_train, 1, cfg, timeout=300)[0])
    assert not runs[0]["compiled"] and runs[1]["compiled"]
    np.testing.assert_allclose(runs[1]["loss"], runs[0]["loss"], rtol=1e-6)
    for g, r in zip(runs[1]["grads"], runs[0]["grads"]):
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=1e-5, atol=1e-7)

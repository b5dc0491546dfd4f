"""Exact resume from a torch.distributed.checkpoint checkpoint, and the HF export (cp = 2, gloo, CPU)."""

from __future__ import annotations

import numpy as np
import torch

from multiproc import run_spawned


def _cfg(out_dir: str) -> dict:
    return {
        "out_dir": out_dir,
        "model": {"preset": "tiny", "attn_implementation": "magi"},
        "data": {"kind": "recall", "seq_len": 256, "recall": {"num_pairs": 2}},
        "parallel": {"cp": 2, "chunk_size": 32},
        "train": {"steps": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "loss_chunk_tokens": 64},
        "checkpoint": {"every": 2, "resume": True, "export_hf": True},
        "logging": {"progress": "none"},
    }


def _losses(trainer) -> list[float]:
    return [m.loss for m in trainer.metrics.history]


def _straight(rank: int, world: int, out_dir: str) -> list[float]:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    trainer = Trainer(from_dict(_cfg(out_dir)))
    trainer.fit()
    return _losses(trainer)


def _interrupted(rank: int, world: int, out_dir: str) -> dict:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    first = Trainer(from_dict(_cfg(out_dir)))
    first.fit(steps=2)  # writes checkpoints/step_2 (checkpoint.every = 2), then the "crash"
    del first
    second = Trainer(from_dict(_cfg(out_dir)))  # a fresh model and optimizer, restored from step 2
    resumed = (second.resumed_from, second.progress.step, second.progress.data_index)
    second.fit()
    full = {n: p.full_tensor() for n, p in second.model.named_parameters()}
    return {"resumed": resumed, "losses": _losses(second), "params": full if rank == 0 else None}


def _from_checkpoint_dir(rank: int, world: int, hf_dir: str, out_dir: str) -> dict:
    """Fine-tune the exported model (model.path: from_pretrained + its saved tokenizer) at cp = 2."""
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    cfg = _cfg(out_dir)
    cfg["model"] = {"path": hf_dir, "attn_implementation": "magi"}
    trainer = Trainer(from_dict(cfg))
    weights = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}
    return {"tokenizer": type(trainer.tokenizer).__name__, "weights": weights, "loss": trainer.train_step().loss}


def test_resume_continues_exactly_and_exports(tmp_path):
    straight = run_spawned(_straight, 2, str(tmp_path / "straight"), timeout=300)[0]
    got = run_spawned(_interrupted, 2, str(tmp_path / "resumed"), timeout=300)[0]
    path, step, data_index = got["resumed"]
    assert path.endswith("step_00000002") and step == 2 and data_index == 4  # 2 steps x 2 micro-batches
    assert got["losses"] == straight[2:]  # bit-identical continuation
    assert not np.allclose(straight[2:], straight[:2])

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resumed" / "hf"))
    assert hf.config._attn_implementation != "magi"  # loads anywhere, flexcp not needed
    exported = hf.state_dict()
    for name, value in got["params"].items():
        torch.testing.assert_close(exported[name.removeprefix("lm.")], value, rtol=0, atol=0)

    again = run_spawned(_from_checkpoint_dir, 2, str(tmp_path / "resumed" / "hf"), str(tmp_path / "again"))[0]
    assert again["tokenizer"] == "ByteTokenizer" and np.isfinite(again["loss"])
    for name, value in got["params"].items():
        torch.testing.assert_close(again["weights"][name], value, rtol=0, atol=0)

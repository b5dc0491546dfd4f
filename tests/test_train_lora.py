"""LoRA (peft) in the recipe: cp = 2 matches cp = 1, only adapters train, both exports load with from_pretrained."""

from __future__ import annotations

import numpy as np
import torch

from multiproc import run_spawned

STEPS = 3


def _cfg(out_dir: str, cp: int, export: str = "merged") -> dict:
    return {
        "out_dir": out_dir,
        "model": {"preset": "tiny", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                             "export": export}},
        "data": {"kind": "recall", "seq_len": 256},
        "parallel": {"cp": cp, "chunk_size": 32},
        "train": {"steps": STEPS, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 0, "loss_chunk_tokens": 64},
        "checkpoint": {"resume": False},
        "logging": {"progress": "none", "tensorboard": False},
    }


def _train(rank: int, world: int, cfg: dict) -> dict | None:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    trainer = Trainer(from_dict(cfg))
    before = {n: p.full_tensor().clone() for n, p in trainer.model.named_parameters()}
    losses, grads = [], []
    for _ in range(STEPS):
        losses.append(trainer.train_step().loss)
        grads.append({n: p.grad.full_tensor() for n, p in trainer.model.named_parameters() if p.grad is not None})
    after = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}
    trainer.fit()  # all train.steps are done: it only saves the checkpoint and exports
    if rank:
        return None
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    return {"loss": losses, "grads": grads, "before": before, "after": after, "trainable": trainable}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_cp2_matches_cp1_and_exports(tmp_path):
    ref = run_spawned(_train, 1, _cfg(str(tmp_path / "cp1"), cp=1), timeout=300)[0]
    got = run_spawned(_train, 2, _cfg(str(tmp_path / "cp2"), cp=2, export="adapter"), timeout=300)[0]
    assert ref["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in ref["trainable"])
    assert got["trainable"] == ref["trainable"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-6)
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert sorted(r) == ref["trainable"]  # gradients exist for the adapters only
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{step} {name}: {m}")
    changed = {n for n, v in ref["after"].items() if not torch.equal(v, ref["before"][n])}
    assert changed and changed <= set(ref["trainable"])  # adapters train, the base stays frozen

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cp1" / "hf"))
    assert not any("lora" in n for n in merged.state_dict())
    # peft's own merge of the trained weights is what the merged export holds
    base = AutoModelForCausalLM.from_config(merged.config)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.load_state_dict({n.removeprefix("lm."): v for n, v in ref["after"].items()}, strict=False)
    want = peft_model.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")

    adapter_dir = tmp_path / "cp2" / "hf"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "base").is_dir()
    with_adapter = AutoModelForCausalLM.from_pretrained(str(adapter_dir))  # base from adapter_config + adapter
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    ids = torch.tensor([tok.encode("the value of K is 7")])
    torch.testing.assert_close(_logits(with_adapter, ids), _logits(merged, ids), rtol=1e-4, atol=1e-4)

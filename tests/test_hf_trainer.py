"""flexcp.hf: transformers.Trainer and TRL's SFTTrainer at cp = 2 equal the stock trainers at cp = 1.

A tiny random Llama and Qwen3 (attn "magi", fp32, CPU) train a few optimizer steps on the
same data with the same seed: through the stock ``Trainer`` / ``SFTTrainer`` on one process
(cp = 1, the "magi" drop-in with no setup) and through ``FlexCPTrainer`` /
``FlexCPSFTTrainer(cp_size=2)`` on two gloo ranks. The loss logged at every step, the eval
loss and the final weights must agree, while each rank's forward sees only its shard.
Covered: padded batches, packing (HF's DataCollatorWithFlattening, TRL's padding-free
packing), completion-only loss, LoRA, gradient accumulation, gradient checkpointing,
bf16 autocast, save and resume, the long-sequence levers; and the refusals at cp > 1.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import hf_trainer_cases as cases  # noqa: E402
from multiproc import run_spawned  # noqa: E402

TIMEOUT = 300.0
PARITY = {
    "llama-trainer-padded-accum-checkpointing": dict(arch="llama", kind="trainer", completion_only=True, grad_accum=2,
                                                     extra_args={"gradient_checkpointing": True}, evaluate=True),
    "qwen3-trainer-packed-lora": dict(arch="qwen3", kind="trainer", packing=True, lora=True),
    "llama-sft-packed-lora": dict(arch="llama", kind="sft", packing=True, lora=True, evaluate=True),
    "qwen3-sft-packed": dict(arch="qwen3", kind="sft", packing=True, evaluate=True),
    "qwen3-sft-completion-only-padded": dict(arch="qwen3", kind="sft", completion_only=True, batch=3),
}


def _reference(tmp_path, **kw) -> dict:
    return run_spawned(cases.train_run, 1, **kw, out_dir=str(tmp_path / "ref"), timeout=TIMEOUT)[0]


def _cp2(tmp_path, **kw) -> list[dict]:
    return run_spawned(cases.train_run, 2, cp=2, **kw, out_dir=str(tmp_path / "cp2"), timeout=TIMEOUT)


def _assert_same_weights(ref: dict, got: dict, atol: float) -> None:
    assert ref["weights"].keys() == got["weights"].keys()
    moved = max((ref["weights"][k] - ref["initial"][k]).abs().max().item() for k in ref["weights"])
    assert moved > 100 * atol  # training changed the weights far beyond the tolerance
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", list(PARITY))
def test_cp2_trainer_equals_cp1(case: str, tmp_path) -> None:
    kw = PARITY[case]
    ref = _reference(tmp_path, **kw)
    out = _cp2(tmp_path, **kw)
    assert len(ref["losses"]) == 5
    for rank in out:  # the logged loss is the global one on every rank
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), atol=2e-5, rtol=0)
        if kw.get("evaluate"):
            assert abs(rank["eval_loss"] - ref["eval_loss"]) < 2e-5
    _assert_same_weights(ref, out[0], atol=5e-5)
    _assert_same_weights(ref, out[1], atol=5e-5)
    for rank in out:  # CP really ran: each forward saw a shard, never the whole batch
        assert len(rank["tokens"]) == len(ref["tokens"])
        assert all(0 < t < full for t, full in zip(rank["tokens"], ref["tokens"]))


def test_cp2_compiled_trainer_equals_cp1_compiled(tmp_path) -> None:
    """TrainingArguments(torch_compile=True): compiled FlexCPTrainer at cp = 2 equals the compiled Trainer at cp = 1.

    (The plain Trainer on packed batches: TRL's SFTTrainer adds graphs of its own metrics that
    cost minutes to compile on CPU; FlexCPSFTTrainer shares the mixin.)
    """
    kw = dict(arch="llama", kind="trainer", packing=True, steps=3,
              extra_args={"torch_compile": True, "torch_compile_backend": "aot_eager"})
    ref = _reference(tmp_path, **kw)
    out = _cp2(tmp_path, **kw)
    assert ref["compiled"] and all(rank["compiled"] for rank in out)
    for rank in out:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), atol=2e-5, rtol=0)
        _assert_same_weights(ref, rank, atol=5e-5)


def test_cp2_trainer_with_every_lever_equals_the_plain_cp1_trainer(tmp_path) -> None:
    """tiled_mlp, tiled_loss and offload_activations change memory, not the run (packed, checkpointed)."""
    kw = dict(arch="llama", kind="trainer", packing=True, extra_args={"gradient_checkpointing": True}, evaluate=True)
    ref = _reference(tmp_path, **kw)
    out = _cp2(tmp_path, **kw, levers={"tiled_mlp": 4, "tiled_loss": 5, "offload_activations": True})
    for rank in out:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), atol=2e-5, rtol=0)
        assert abs(rank["eval_loss"] - ref["eval_loss"]) < 2e-5
        _assert_same_weights(ref, rank, atol=5e-5)


def test_cp2_bf16_autocast_tracks_cp1(tmp_path) -> None:
    kw = dict(arch="llama", kind="sft", packing=True, extra_args={"bf16": True})
    ref = _reference(tmp_path, **kw)
    out = _cp2(tmp_path, **kw)
    torch.testing.assert_close(torch.tensor(out[0]["losses"]), torch.tensor(ref["losses"]), atol=5e-3, rtol=0)
    assert all(w.dtype == torch.float32 for w in out[0]["weights"].values())


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_cp2_checkpoint_resume_continues_the_same_run(kind: str, tmp_path) -> None:
    kw = dict(kind=kind, steps=6, extra_args={"save_strategy": "steps", "save_steps": 3})
    full = run_spawned(cases.train_run, 2, cp=2, **kw, out_dir=str(tmp_path), timeout=TIMEOUT)
    assert {"checkpoint-3", "checkpoint-6"} <= set(os.listdir(tmp_path))
    resumed = run_spawned(cases.train_run, 2, cp=2, **kw, out_dir=str(tmp_path),
                          resume=str(tmp_path / "checkpoint-3"), timeout=TIMEOUT)
    assert resumed[0]["losses"] == full[0]["losses"]
    assert len(resumed[0]["tokens"]) == 3  # only steps 4..6 ran again
    for name, w in full[0]["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][name], w, atol=1e-6, rtol=0)


def test_cp2_refusals_are_clear_on_every_rank(tmp_path) -> None:
    for errors in run_spawned(cases.refusals, 2, str(tmp_path), timeout=TIMEOUT):
        assert "attn_implementation='magi'" in errors["not_magi"]
        assert "cp_size=3 must divide the number of processes (2)" in errors["cp_does_not_divide"]
        assert "evaluation computes the loss only" in errors["predict_logits"]
        assert "received different batches" in errors["different_batches"]
        assert errors["same_batches"] == "no error"


def test_readme_example_script_gives_the_same_run_at_cp1_and_cp2(tmp_path) -> None:
    argv = ["--max-steps", "4", "--max-length", "64"]
    ref = run_spawned(cases.run_example, 1, argv + ["--output-dir", str(tmp_path / "cp1")], timeout=TIMEOUT)[0]
    out = run_spawned(cases.run_example, 2, argv + ["--cp-size", "2", "--output-dir", str(tmp_path / "cp2")],
                      timeout=TIMEOUT)
    assert len(ref["losses"]) == 4 and ref["losses"][-1] < ref["losses"][0]
    for rank in [ref] + out:  # the synthetic pairs tokenize with the prompt as a prefix: no sample is cut
        assert not [w for w in rank["trl_warnings"] if "not a prefix" in w], rank["trl_warnings"]
    for rank in out:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), atol=2e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(rank["grad_norms"]), torch.tensor(ref["grad_norms"]), atol=1e-4, rtol=1e-4)
        assert rank["num_tokens"] == ref["num_tokens"]  # TRL's count of the global batch, not of padded shards
    assert (tmp_path / "cp2" / "model.safetensors").exists()


def test_readme_shows_the_example_script_as_shipped() -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    with open(os.path.join(root, "examples", "sft_cp.py")) as f:
        code = f.read().split('"""\n\n', 1)[1]  # the script below its docstring
    with open(os.path.join(root, "README.md")) as f:
        assert f"```python\n{code}```" in f.read()

"""attn_implementation="magi" equals "eager" with the equivalent mask: logits, loss, parameter gradients.

Five tiny random-init architectures (Llama, Qwen2, Qwen3, Mistral with a sliding window,
Gemma 2 with logit softcapping and alternating sliding windows) times four batches (one
causal sequence, packed documents, batch > 1 with padding, a prefix tree), at cp = 1 in
process (through magi_prepare_batch and by calling the model directly) and at cp = 2 on
gloo, where each rank's per-shard loss and gradients, summed over CP, equal cp = 1.
Labels are pre-shifted (labels[i] is the target of token i) and the loss is a sum.
The eager reference builds its own masks (position resets, padding, sliding windows);
only the prefix tree gets an explicit 4-D mask from spec.to_dense() (tests only).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import flexcp  # noqa: E402
import flexcp.magi_attn_utils as mau  # noqa: E402
from hf_models import ARCHS, CASES, VOCAB, make_case, make_model  # noqa: E402
from multiproc import run_spawned  # noqa: E402

def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def reference(arch: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Eager model: flat logits [T, V], summed loss, parameter gradients."""
    model = make_model(arch, "eager")
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if "attn_spec" in batch:  # prefix tree: the 4-D masks eager needs, from the spec and real positions
        full = batch["attn_spec"].to_dense()
        pos = batch["position_ids"][0]
        window = ARCHS[arch][2].get("sliding_window")
        sliding = full & (pos[:, None] - pos[None, :] < window) if window else full
        masks = {"full_attention": _additive(full), "sliding_attention": _additive(sliding)}
        kwargs["attention_mask"] = masks if arch == "gemma2" else masks["sliding_attention" if window else "full_attention"]
    logits = model(**kwargs, use_cache=False).logits.reshape(-1, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1), reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _grads(model: torch.nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run_prepared(arch: str, batch: dict, cp_group) -> tuple[torch.Tensor, torch.Tensor, dict, flexcp.DistAttnKey]:
    """magi through magi_prepare_batch: local logits, local summed loss, local gradients, key."""
    model = make_model(arch, "magi")
    new_batch, key = mau.magi_prepare_batch(model, batch, cp_group)
    labels = new_batch.pop("labels")
    logits = model(**new_batch, use_cache=False).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, labels[0], reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), _grads(model), key


def _covered(batch: dict) -> torch.Tensor:
    """Tokens that are not padding (the rows eager and magi must agree on)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].reshape(-1).bool()
    return torch.ones(batch["input_ids"].numel(), dtype=torch.bool)


def compare(ref: tuple, logits: torch.Tensor, loss: torch.Tensor, grads: dict, covered: torch.Tensor) -> dict:
    """Max abs errors of logits (non-padding rows), loss, and every gradient relative to its scale."""
    r_logits, r_loss, r_grads = ref
    grad_err = max(float((grads[n] - g).abs().max() / (g.abs().max() + 1e-6)) for n, g in r_grads.items())
    return {"logits": float((logits[covered] - r_logits[covered]).abs().max()),
            "loss": float(abs(loss - r_loss) / abs(r_loss)), "grads": grad_err}


def assert_close(errs: dict, what: str) -> None:
    assert errs["logits"] < 5e-6 and errs["loss"] < 1e-6 and errs["grads"] < 2e-5, f"{what}: {errs}"


@pytest.fixture(autouse=True)
def _registered():
    mau.register_magi_attention()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a busy CI machine
    yield
    torch.set_num_threads(threads)
    mau.set_active_attn_spec(None)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_magi_equals_eager_cp1(arch: str, case: str) -> None:
    batch = make_case(case)
    ref = reference(arch, batch)
    logits, loss, grads, _ = run_prepared(arch, batch, None)
    assert_close(compare(ref, logits, loss, grads, _covered(batch)), f"{arch}/{case} prepared")

    # the model called directly (cp = 1, no prepare): the mask comes from the call's own inputs
    model = make_model(arch, "magi")
    mau._set_cp_group_on_attention(model, None)
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if case == "tree":
        mau.set_active_attn_spec(batch["attn_spec"])
    logits = model(**kwargs, use_cache=False).logits.reshape(-1, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1), reduction="sum")
    loss.backward()
    assert_close(compare(ref, logits.detach(), loss.detach(), _grads(model), _covered(batch)), f"{arch}/{case} direct")


def _cp2_all_cases(rank: int, world_size: int) -> dict:
    """Every arch and case on this rank; rank 0 returns global logits, summed loss and summed gradients."""
    mau.register_magi_attention()
    group = dist.group.WORLD
    results = {}
    for arch in sorted(ARCHS):
        for case in CASES:
            logits, loss, grads, key = run_prepared(arch, make_case(case), group)
            assert key.cp_size == world_size and logits.shape[0] < make_case(case)["input_ids"].numel()
            full_logits = flexcp.undispatch(logits, key)
            for t in [loss, *grads.values()]:
                dist.all_reduce(t)
            results[(arch, case)] = (full_logits, loss, grads)
    return results if rank == 0 else {}


def test_magi_cp2_per_shard_loss_and_grads_sum_to_cp1() -> None:
    results = run_spawned(_cp2_all_cases, 2, timeout=300)[0]
    assert len(results) == len(ARCHS) * len(CASES)
    for (arch, case), (logits, loss, grads) in results.items():
        batch = make_case(case)
        assert_close(compare(reference(arch, batch), logits, loss, grads, _covered(batch)), f"cp=2 {arch}/{case}")

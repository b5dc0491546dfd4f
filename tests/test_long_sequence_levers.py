"""Tiled MLP, tiled LM head + loss and activation offload: the same results as the plain model, less memory."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcp.hf import ActivationOffload, HostArena, linear_cross_entropy, recompute_norms, tile_loss, tile_mlp
from flexcp.train.model import enable_activation_checkpointing


def _model(kind="llama", dtype=torch.float64, softcap=None):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    shape = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=softcap))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return model.to(dtype).train()


def _grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=6, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["llama", "qwen2", "gemma2"]), tokens=st.integers(2, 90), chunk=st.integers(1, 40),
       checkpointing=st.booleans())
def test_tiled_mlp_is_exact_in_float64(kind, tokens, chunk, checkpointing):
    model = _model(kind)
    if checkpointing:
        enable_activation_checkpointing(model)
    ids = torch.randint(0, 50, (1, tokens))
    plain, g0 = _grads(model, ids)
    assert tile_mlp(model, chunk) == 2
    tiled, g1 = _grads(model, ids)
    # the same operations per row: the forward bit for bit; gradients to float64 rounding (the MLP weights'
    # are sums over chunks, and BLAS may order a one-row product's sum differently)
    assert torch.equal(plain.logits, tiled.logits)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-12, atol=1e-14)
    tile_mlp(model, 0)
    assert "_flexcp_plain_forward" not in model.model.layers[0].mlp.__dict__


def test_tiled_mlp_bf16_is_close_and_keeps_only_the_input():
    model = _model("llama", torch.bfloat16)
    ids = torch.randint(0, 50, (2, 64))
    plain, g0 = _grads(model, ids)
    tile_mlp(model, 16)
    tiled, g1 = _grads(model, ids)
    torch.testing.assert_close(plain.logits, tiled.logits)
    for name in g0:
        torch.testing.assert_close(g0[name].float(), g1[name].float(), rtol=2e-2, atol=2e-2)
    assert (2, 64, 96) not in _saved_shapes(model, ids)  # no intermediate_size-wide tensor kept for the sequence


def _saved_shapes(model, ids) -> set[tuple]:
    """Shapes of the tensors the forward saves for backward."""
    shapes = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.add(tuple(t.shape)) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return shapes


@pytest.mark.parametrize("when,fits,tiled", [("needed", True, False), ("needed", False, True), ("always", True, True)])
def test_tile_mlp_needed_runs_untiled_where_the_intermediates_fit(monkeypatch, when, fits, tiled):
    import flexcp.hf.tiled_mlp as tm

    monkeypatch.setattr(tm, "fits_untiled", lambda module, x: fits)
    model = _model()
    tile_mlp(model, 8, when=when)
    # the untiled MLP keeps its intermediate_size-wide (96) activations for backward; the tiled one does not
    assert ((1, 40, 96) not in _saved_shapes(model, torch.randint(0, 50, (1, 40)))) == tiled


def _float32_hidden_saved(model, ids) -> int:
    """How many float32 [1, T, hidden] tensors the forward saves (HF's RMSNorm saves such copies)."""
    found = []
    hook = lambda t: found.append(t.dtype == torch.float32 and tuple(t.shape) == (*ids.shape, 32)) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(found)


@pytest.mark.parametrize("kind,norms", [("llama", 5), ("gemma2", 9)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputed_norms_are_bit_exact_and_keep_no_float32_copy(kind, norms, checkpointing):
    model = _model(kind, torch.bfloat16)
    if checkpointing:
        enable_activation_checkpointing(model)
    ids = torch.randint(0, 50, (1, 24))
    plain, g0 = _grads(model, ids)
    assert checkpointing or _float32_hidden_saved(model, ids) >= norms
    assert recompute_norms(model) == norms  # the final norm and every norm of the two layers
    got, g1 = _grads(model, ids)
    assert torch.equal(plain.logits, got.logits)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    assert _float32_hidden_saved(model, ids) == 0


def test_tile_mlp_refuses_bad_chunks_and_models():
    with pytest.raises(ValueError, match="chunk_tokens"):
        tile_mlp(_model(), -1)
    with pytest.raises(ValueError, match="decoder layers"):
        tile_mlp(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="when"):
        tile_mlp(_model(), 8, when="sometimes")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 60), chunk=st.integers(1, 25), softcap=st.sampled_from([0.0, 3.0]), bias=st.booleans(),
       ignored=st.floats(0, 1))
def test_linear_cross_entropy_matches_the_plain_loss_in_float64(n, chunk, softcap, bias, ignored):
    torch.manual_seed(n)
    h = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 11, (n,))
    y[torch.rand(n) < ignored] = -100
    loss, hits = linear_cross_entropy(h, w, y, chunk, bias=b, softcap=softcap)
    grads = torch.autograd.grad(loss, [h, w] + ([b] if bias else []))
    logits = F.linear(h, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [h, w] + ([b] if bias else []))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert hits.item() == int(((logits.argmax(-1) == y) & (y != -100)).sum())


@pytest.mark.parametrize("kind,softcap", [("llama", None), ("gemma2", 2.0)])
@pytest.mark.parametrize("how", ["labels", "num_items", "shift_labels"])
def test_tile_loss_is_the_models_own_loss_without_logits(kind, softcap, how):
    model = _model(kind, softcap=softcap)
    ids = torch.randint(0, 50, (2, 17))
    labels = ids.clone()
    labels[0, :5] = -100
    kw = {"labels": labels}
    if how == "num_items":
        kw["num_items_in_batch"] = torch.tensor(23)
    if how == "shift_labels":
        kw = {"labels": labels, "shift_labels": F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()}
    model.zero_grad(set_to_none=True)
    ref = model(input_ids=ids, use_cache=False, **kw)
    ref.loss.backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    tile_loss(model, chunk_tokens=7)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False, **kw)
    out.loss.backward()
    assert out.logits.shape == (2, 17, 0)
    # HF's loss upcasts logits with .float(), float64 ones included; the tiled loss keeps float64
    torch.testing.assert_close(out.loss, ref.loss.double(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], rtol=1e-5, atol=1e-7)
    model.eval()  # evaluation builds logits as before
    assert model(input_ids=ids, labels=labels, use_cache=False).logits.shape == (2, 17, 50)


def _train(model, ids, offload):
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # the second step reuses the first step's host memory
        with offload() if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_offload_gives_the_same_gradients_and_reuses_exact_host_memory():
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 50, (1, 40))
    ref = _train(model, ids, None)
    off = ActivationOffload("cpu", min_bytes=0)
    got = _train(model, ids, off)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    # checkpointed layer inputs (and the rotary tables, once) went to the host; the arena holds one step's bytes
    assert off.saved_bytes >= 2 * 40 * 32 * 8
    assert off.arena.used_bytes <= off.host_bytes <= off.arena.used_bytes + 512 * len(off.arena.blocks) + 1
    assert off.host_bytes < 2 * off.saved_bytes + 512 * len(off.arena.blocks)


def test_offload_copies_a_tensor_saved_twice_once_and_never_mistakes_a_new_tensor_for_a_freed_one():
    """A new tensor where a freed one was (same address, shape and version) is a new save, not the old copy.

    The new tensors are built over one storage, so the case is certain, not up to the allocator.
    """
    storage = torch.empty(1000, dtype=torch.float64).untyped_storage()
    vals = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fresh(i: int) -> torch.Tensor:  # a new tensor over `storage`: same address, version 1 after the copy
        t = torch.empty(0, dtype=torch.float64).set_(storage, 0, (1000,), (1,))
        return t.copy_(vals * (i + 1))

    x = torch.randn(1000, dtype=torch.float64).requires_grad_()
    off = ActivationOffload("cpu", min_bytes=0)
    with off():
        shared = x * 0.5
        loss = shared.sin().sum() + shared.cos().sum()  # one tensor saved twice
        for i in range(4):
            h = fresh(i)
            loss = loss + (x * h).sum()  # saves h for x's gradient
            del h
    loss.backward()
    expected = 0.5 * ((x * 0.5).cos() - (x * 0.5).sin()) + vals * (1 + 2 + 3 + 4)
    torch.testing.assert_close(x.grad, expected.detach(), rtol=1e-12, atol=1e-12)
    assert off.saved_bytes == 5 * 1000 * 8  # shared once, each h once


def test_host_arena_is_exact_and_reused():
    arena = HostArena(pin=False)
    a, b = arena.take(1000), arena.take(24)
    assert a.numel() == 1000 and b.numel() == 24 and arena.capacity_bytes == 1024 + 512
    arena.reset()
    arena.take(1000), arena.take(24)
    assert arena.capacity_bytes == 1024 + 512 and len(arena.blocks) == 2  # the same blocks again
    arena.reset()
    arena.take(10)
    arena.reset()  # far less used than held: one block of what the step used
    assert arena.capacity_bytes == 512 and len(arena.blocks) == 1

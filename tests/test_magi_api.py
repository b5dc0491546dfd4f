"""flexcp.magi_attn_utils: every seed name with its signature and documented behaviour, and what flexcp adds.

HF-model parity over architectures and masks lives in test_hf_parity.py; this file covers
the API surface, config/mesh handling, batch preparation, the custom-model attn func, key
lookup (explicit, most-recent fallback, derived), refusals, and that the magi path never
allocates O(S^2).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import flexcp  # noqa: E402
import flexcp.magi_attn_utils as mau  # noqa: E402
from flexcp.mask import AttnMaskSpec, causal, sliding_window, varlen  # noqa: E402
from multiproc import run_spawned  # noqa: E402
from reference_attention import dense_attention  # noqa: E402
from hf_models import VOCAB, make_case, make_model  # noqa: E402

SEED_SIGNATURES = {
    "_build_self_key": ["cp_group", "seqlen", "num_heads_q", "num_heads_kv", "head_dim", "device"],
    "_flex_key_for": ["cp_group", "spec", "num_heads_q", "num_heads_kv", "head_dim"],
    "_get_head_config": ["model"],
    "_iter_language_model_attention": ["model"],
    "_packed_cp_doc_seqlens": ["batch", "total_len"],
    "_self_key_for": ["cp_group", "seqlen", "num_heads_q", "num_heads_kv", "head_dim", "device"],
    "_set_cp_group_on_attention": ["model", "cp_group"],
    "build_flex_key": ["spec", "num_heads_q", "num_heads_kv", "head_dim", "cp_group"],
    "get_active_attn_spec": [],
    "get_active_cp_group": [],
    "get_cp_group": ["device_mesh"],
    "is_magi_available": [],
    "magi_prepare_batch": ["model", "batch", "cp_group", "chunk_size"],
    "magi_prepare_packed_cp": ["model", "batch", "cp_group"],
    "magi_prepare_vlm": ["model", "batch", "cp_group"],
    "make_magi_attn_func": ["softmax_scale"],
    "register_magi_attention": [],
    "set_active_attn_spec": ["spec"],
    "set_active_cp_group": ["cp_group"],
    "setup_magi": ["cfg", "device_mesh", "label"],
}


@pytest.fixture(autouse=True)
def _clean_state():
    mau.register_magi_attention()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mau.set_active_attn_spec(None)
    mau.set_active_cp_group(None)


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


# ------------------------------------------------------------------------------- API surface
def test_every_seed_name_with_its_signature() -> None:
    for name, params in SEED_SIGNATURES.items():
        assert _params(getattr(mau, name)) == params, name
    assert inspect.signature(mau.magi_prepare_batch).parameters["chunk_size"].default == mau.DEFAULT_CHUNK_SIZE == 512
    assert inspect.signature(mau.setup_magi).parameters["label"].default == ""
    assert inspect.signature(mau.make_magi_attn_func).parameters["softmax_scale"].default is None
    assert _params(mau.MagiState.prepare_llm_batch) == ["model", "batch", "device_mesh", "is_thd", "pad_id", "num_chunks"]
    assert _params(mau.MagiState.prepare_vlm_batch) == ["model", "batch"]
    assert mau.MagiState() == mau.MagiState(enabled=False, custom=False, cp_group=None, cp_size=1)
    assert isinstance(mau.MagiState.hf_dispatch, property)
    assert mau.AttnMaskSpec is AttnMaskSpec
    spec = AttnMaskSpec(q_ranges=[[0, 4]], k_ranges=[[0, 4]], mask_types=["causal"], total_seqlen=4)
    assert spec.fingerprint() == AttnMaskSpec.causal(4).fingerprint() == causal(4).fingerprint()
    assert AttnMaskSpec.varlen([2, 3]).total_seqlen == 5 and len(AttnMaskSpec.prefix_tree([2, 3], [[0, 1]])) == 2
    assert isinstance(mau._FLEX_KEY_CACHE, dict) and isinstance(mau._MAGI_SELF_KEY_LEN, dict)
    assert mau.logger.name == "flexcp.magi_attn_utils" and mau.is_magi_available() is True


def test_active_state_accessors_reflect_in_module_globals() -> None:
    spec = varlen([3, 5])
    mau.set_active_attn_spec(spec)
    assert mau._ACTIVE_ATTN_SPEC is spec and mau.get_active_attn_spec() is spec
    mau.set_active_attn_spec(None)
    assert mau._ACTIVE_ATTN_SPEC is None
    marker = object()
    mau.set_active_cp_group(marker)
    assert mau._ACTIVE_CP_GROUP is marker and mau.get_active_cp_group() is marker
    with pytest.raises(ValueError, match="AttnMaskSpec"):
        mau.set_active_attn_spec("causal")


def test_register_is_idempotent_and_registers_attention_and_mask_functions(monkeypatch) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["magi"] is mau.hf_attention.magi_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["magi"] is mau.hf_attention.magi_mask_function

    calls = []
    monkeypatch.setattr(AttentionInterface, "register", classmethod(lambda cls, k, v: calls.append(k)))
    mau.register_magi_attention()
    assert calls == []  # already registered: no-op
    monkeypatch.setattr(mau, "_MAGI_REGISTERED", False)
    monkeypatch.setattr(AttentionMaskInterface, "register", classmethod(lambda cls, k, v: calls.append("mask:" + k)))
    mau.register_magi_attention()
    mau.register_magi_attention()
    assert calls == ["magi", "mask:magi"] and mau._MAGI_REGISTERED


# ------------------------------------------------------------------------- mesh, config, model
class _Mesh:
    def __init__(self, names):
        self.mesh_dim_names = names

    def __getitem__(self, name):
        return SimpleNamespace(get_group=lambda: f"group:{name}")


def test_get_cp_group_reads_the_cp_mesh_dim() -> None:
    assert mau.get_cp_group(None) is None
    assert mau.get_cp_group(_Mesh(("dp", "cp"))) == "group:cp"
    assert mau.get_cp_group(_Mesh(("dp",))) is None


def test_head_config_and_language_model_attention_of_a_vlm() -> None:
    llama = make_model("llama", "eager")
    assert mau._get_head_config(llama) == (4, 2, 16)
    assert mau._get_head_config(SimpleNamespace(module=llama)) == (4, 2, 16)
    vlm_cfg = SimpleNamespace(text_config=SimpleNamespace(num_attention_heads=8, num_key_value_heads=None, hidden_size=256))
    assert mau._get_head_config(SimpleNamespace(config=vlm_cfg)) == (8, 8, 32)
    with pytest.raises(ValueError, match="num_attention_heads"):
        mau._get_head_config(SimpleNamespace(config=SimpleNamespace()))

    class VisionAttention(torch.nn.Module):
        pass

    vlm = torch.nn.Module()
    vlm.model = torch.nn.Module()
    vlm.model.visual = torch.nn.ModuleList([VisionAttention()])
    vlm.model.language_model = llama.model
    text = list(mau._iter_language_model_attention(vlm))
    assert len(text) == 2 and all(type(m).__name__ == "LlamaAttention" for m in text)
    assert len(list(mau._iter_language_model_attention(llama))) == 2
    mau._set_cp_group_on_attention(vlm, None)
    assert hasattr(vlm.model.visual[0], "cp_group") and all(hasattr(m, "cp_group") for m in text)


class _DottedCfg:
    def __init__(self, values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


@pytest.mark.parametrize(
    "cfg, custom",
    [
        ({"model": {"attn_implementation": "magi"}}, False),
        (_DottedCfg({"model.attn_implementation": "magi"}), False),
        (SimpleNamespace(model=SimpleNamespace(attn_implementation="magi")), False),  # dataclass configs
        ({"model": {"backend": {"attn": "magi"}}}, True),
        (_DottedCfg({"model.backend.attn": "magi"}), True),
    ],
)
def test_setup_magi_enables_from_config(cfg, custom) -> None:
    mau.set_active_cp_group("stale")
    state = mau.setup_magi(cfg, None, label="test")
    assert state == mau.MagiState(enabled=True, custom=custom, cp_group=None, cp_size=1)
    assert state.hf_dispatch is (not custom)
    assert mau._MAGI_REGISTERED and (mau.get_active_cp_group() is None if custom else mau.get_active_cp_group() == "stale")


def test_setup_magi_disabled_when_not_configured() -> None:
    for cfg in ({"model": {"attn_implementation": "sdpa"}}, {}, _DottedCfg({})):
        assert mau.setup_magi(cfg, None) == mau.MagiState()
    assert not mau.MagiState().hf_dispatch


# ---------------------------------------------------------------------------- batch preparation
def _loss_logits(model, batch) -> torch.Tensor:
    batch = {k: v for k, v in batch.items() if k != "labels"}
    return model(**batch, use_cache=False).logits.reshape(-1, VOCAB)


def test_prepare_llm_batch_hf_path_packs_cu_seqlens_like_position_resets() -> None:
    state = mau.setup_magi({"model": {"attn_implementation": "magi"}}, None)
    model = make_model("mistral", "magi")
    packed = make_case("packed")
    ctx, by_pos = state.prepare_llm_batch(model, dict(packed), None, False, 0, 1)
    assert ctx is nullcontext and isinstance(by_pos["magi_key"], flexcp.DistAttnKey)
    assert set(by_pos) == {"input_ids", "position_ids", "labels", "shift_labels", "magi_key"}
    by_cu = {"input_ids": packed["input_ids"], "labels": packed["labels"],
             "cu_seqlens": torch.tensor([0, 13, 30, 40, -1000, -1000])}
    _, by_cu = state.prepare_llm_batch(model, by_cu, None, True, 0, 1)
    assert torch.equal(by_cu["position_ids"], packed["position_ids"]) and torch.equal(by_cu["labels"], by_pos["labels"])
    assert torch.allclose(_loss_logits(model, by_pos), _loss_logits(model, by_cu))


def test_chunk_size_from_config_reaches_the_key() -> None:
    assert mau.setup_magi({"model": {"attn_implementation": "magi"}}, None).chunk_size == mau.DEFAULT_CHUNK_SIZE
    state = mau.setup_magi({"model": {"attn_implementation": "magi"}, "magi": {"chunk_size": 16}}, None)
    assert state.chunk_size == 16
    _, batch = state.prepare_llm_batch(make_model("llama", "magi"), dict(make_case("packed")), None, False, 0, 1)
    assert batch["magi_key"].chunk_size == 16 and batch["input_ids"].shape[1] % 16 == 0
    with pytest.raises(ValueError, match="chunk_size"):
        mau.setup_magi({"model": {"attn_implementation": "magi"}, "magi": {"chunk_size": -4}}, None)


def test_prepare_batch_padding_labels_and_other_fields() -> None:
    model = make_model("llama", "magi")
    batch = dict(make_case("batch"), loss_mask=torch.ones(3, 14))
    batch["labels"][1, -1] = 7  # a label on a padding token is dropped
    new_batch, key = mau.magi_prepare_batch(model, batch, None)
    assert new_batch["input_ids"].shape == (1, 42) and new_batch["loss_mask"].shape == (1, 42)
    assert "attention_mask" not in new_batch and new_batch["magi_key"] == key
    assert (new_batch["labels"][0][~batch["attention_mask"].reshape(-1).bool()] == -100).all()
    assert new_batch["position_ids"][0].tolist() == list(range(14)) * 3  # HF's default positions per row
    with pytest.raises(ValueError, match="needs position_ids"):
        mau.magi_prepare_batch(model, {"input_ids": torch.zeros(1, 9, dtype=torch.long), "attn_spec": varlen([4, 5])}, None)
    with pytest.raises(ValueError, match="cover the batch's 9 flat tokens"):
        mau.magi_prepare_batch(model, {"input_ids": torch.zeros(1, 9, dtype=torch.long), "attn_spec": varlen([4])}, None)


def test_packed_cp_doc_seqlens_sentinels_padding_and_span() -> None:
    batch = {"cu_seqlens": torch.tensor([0, 3, 5, -1000]), "cu_seqlens_padded": torch.tensor([0, 4, 8, -1000])}
    assert mau._packed_cp_doc_seqlens(batch, 8) == [4, 4]
    assert mau._packed_cp_doc_seqlens({"cu_seqlens": torch.tensor([0, 3, 5, -1000])}, 5) == [3, 2]
    with pytest.raises(ValueError, match="span 8 tokens but the flat input has 9"):
        mau._packed_cp_doc_seqlens(batch, 9)


def test_magi_prepare_packed_cp_at_cp1() -> None:
    model = make_model("llama", "eager")
    ids = torch.arange(8)
    batch = {"input_ids": ids, "labels": ids + 1, "cu_seqlens": torch.tensor([0, 3, 5, -1000]),
             "cu_seqlens_padded": torch.tensor([0, 4, 8, -1000])}
    new_batch, key = mau.magi_prepare_packed_cp(model, batch, None)
    assert set(new_batch) == {"input_ids", "position_ids", "labels", "qkv_format"} and new_batch["qkv_format"] == "thd"
    assert torch.equal(new_batch["input_ids"], ids)  # cp = 1: identity, no padding (build_flex_key)
    assert new_batch["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert new_batch["labels"].tolist() == [1, 2, 3, -100, 5, 6, -100, -100]
    assert mau.get_active_attn_spec() is None and flexcp.get_most_recent_key(None) == key


def test_prepare_vlm_stamps_language_attention_and_builds_the_key_from_the_query() -> None:
    state = mau.MagiState(enabled=True)
    model = make_model("llama", "magi")
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, :3] = 0
    ctx, out = state.prepare_vlm_batch(model, batch)
    assert ctx is nullcontext and out is batch
    assert all(m._magi_self_key and m.cp_group is None for m in mau._iter_language_model_attention(model))
    ref = make_model("llama", "eager")
    real = batch["attention_mask"].reshape(-1).bool()
    got = model(**batch, use_cache=False).logits.reshape(-1, VOCAB)[real]
    assert torch.allclose(got, ref(**batch, use_cache=False).logits.reshape(-1, VOCAB)[real], atol=5e-6)


def test_to_thd_for_the_custom_path_at_cp1() -> None:
    state = mau.MagiState(enabled=True, custom=True)
    batch = {"input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])}
    ctx, thd = state.prepare_llm_batch(None, batch, None, True, 0, 1)
    assert ctx is nullcontext and thd["qkv_format"] == "thd" and thd["input_ids"].shape == (12,)
    assert thd["cu_seqlens"].tolist() == [0, 4, 9] and thd["cu_seqlens_padded"].tolist() == [0, 7, 12]
    assert thd["labels"].tolist() == [0, 1, 2, 3, -100, -100, -100, 7, 8, 9, 10, 11]
    assert "attention_mask" not in thd
    assert state.prepare_llm_batch(None, batch, None, False, 0, 1)[1] is batch  # custom, not THD: unchanged


# ------------------------------------------------------------------------------------- keys
def test_key_builders_and_caches() -> None:
    key = mau.build_flex_key(varlen([700, 300]), 4, 2, 16, None)
    assert flexcp.get_position_ids(key).tolist() == list(range(1000))  # cp = 1: no padding
    assert mau._flex_key_for(None, varlen([700, 300]), 4, 2, 16) is mau._flex_key_for(None, varlen([700, 300]), 4, 2, 16)
    assert mau._FLEX_KEY_CACHE[id(None)][1] == key
    assert mau._flex_key_for(None, varlen([600, 400]), 4, 2, 16) != key
    self_key = mau._self_key_for(None, 33, 4, 2, 16, "cpu")
    assert mau._MAGI_SELF_KEY_LEN[id(None)] == 33 and self_key.mask == causal(33).fingerprint()
    mau.build_flex_key(varlen([3, 30]), 4, 2, 16, None)  # another key in between is not mistaken for it
    assert mau._self_key_for(None, 33, 4, 2, 16, "cpu") == self_key == mau._build_self_key(None, 33, 4, 2, 16, None)


# --------------------------------------------------------------------------- custom attn func
def test_make_magi_attn_func_falls_back_to_causal_sdpa_without_a_cp_group() -> None:
    fn = mau.make_magi_attn_func(softmax_scale=0.3)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    want, _ = dense_attention(q, k, v, causal(12), softmax_scale=0.3)
    assert torch.allclose(fn(q, k, v), want.float(), atol=1e-5)
    out = fn(q.view(2, 6, 4, 8), k.view(2, 6, 2, 8), v.view(2, 6, 2, 8))
    want, _ = dense_attention(q, k, v, varlen([6, 6]), softmax_scale=0.3)
    assert out.shape == (2, 6, 4, 8) and torch.allclose(out.reshape(12, 4, 8), want.float(), atol=1e-5)


def _custom_checks(rank: int, world_size: int) -> dict:
    """cp = 1 on a size-1 subgroup, then cp = 2: the custom attn func against dense attention."""
    own = [dist.new_group([r]) for r in range(world_size)][rank]
    fn = mau.make_magi_attn_func()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    errs = {}
    mau.set_active_cp_group(own)
    cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    errs["cu_seqlens"] = (fn(q, k, v, cu_seqlens=cu), varlen([5, 9, 6]), {})
    errs["window"] = (fn(q, k, v, cu_seqlens=cu, window_size=(2, 0)), sliding_window([5, 9, 6], 3), {})
    errs["softcap"] = (fn(q, k, v, softcap=0.5), causal(20), {"softcap": 0.5})
    bshd = fn(*(x.view(2, 10, x.shape[1], 8) for x in (q, k, v))).reshape(20, 4, 8)
    errs["bshd"] = (bshd, varlen([10, 10]), {})
    tree, _ = AttnMaskSpec.prefix_tree([8, 5, 7], [[0, 1], [0, 2]])
    mau.set_active_attn_spec(tree)
    errs["active_spec"] = (fn(q, k, v), tree, {})
    mau.set_active_attn_spec(None)
    mau.set_active_cp_group(dist.group.WORLD)  # cp = 2: dispatch with magi_prepare_packed_cp, attend the shard
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    batch = {"input_ids": torch.arange(20), "cu_seqlens": cu}
    _, key = mau.magi_prepare_packed_cp(model, batch, dist.group.WORLD)
    local = fn(*(flexcp.dispatch(x, key) for x in (q, k, v)))
    errs["cp2"] = (flexcp.undispatch(local, key), varlen([5, 9, 6]), {})
    window = fn(*(flexcp.dispatch(x, key) for x in (q, k, v)), window_size=(3, 0))
    errs["cp2_window"] = (flexcp.undispatch(window, key), sliding_window([5, 9, 6], 4), {})
    state = mau.MagiState(enabled=True, custom=True, cp_group=dist.group.WORLD, cp_size=2)
    rows = {"input_ids": torch.arange(20).view(2, 10), "position_ids": torch.tensor([list(range(4)) + list(range(6))] * 2)}
    _, local_batch = state.prepare_llm_batch(model, rows, None, True, 0, 1)
    key = flexcp.get_most_recent_key(dist.group.WORLD)
    assert torch.equal(flexcp.undispatch(local_batch["input_ids"], key), torch.arange(20))
    recipe = fn(*(flexcp.dispatch(x, key) for x in (q, k, v)))
    errs["cp2_recipe"] = (flexcp.undispatch(recipe, key), varlen([4, 6, 4, 6]), {})
    out = {}
    for name, (got, spec, kw) in errs.items():
        want, _ = dense_attention(q, k, v, spec, **kw)
        out[name] = float((got - want).abs().max())
    try:
        fn(q[:7], k[:7], v[:7])
    except ValueError as exc:
        out["no_key_error"] = str(exc)
    return out


def _hf_cp2_fallbacks(rank: int, world_size: int) -> dict:
    """cp = 2 HF model: explicit key, most-recent fallback without magi_key, and no key at all."""
    mau.register_magi_attention()
    model = make_model("mistral", "magi")
    new_batch, key = mau.magi_prepare_batch(model, make_case("packed"), dist.group.WORLD)
    new_batch.pop("labels")
    explicit = model(**new_batch, use_cache=False).logits
    new_batch.pop("magi_key")
    fallback = model(**new_batch, use_cache=False).logits
    result = {"fallback_err": float((explicit - fallback).abs().max())}
    try:
        model(input_ids=new_batch["input_ids"], position_ids=new_batch["position_ids"] + 1, use_cache=False)
    except ValueError as exc:
        result["error"] = str(exc)
    return result


def test_custom_attn_func_and_hf_fallbacks_at_cp1_and_cp2() -> None:
    for out in run_spawned(_custom_checks, 2, timeout=120):
        assert "no dist-attn key for this step at cp = 2" in out.pop("no_key_error")
        assert max(out.values()) < 1e-10, out  # float64 inputs: float64-exact at cp = 2
    for out in run_spawned(_hf_cp2_fallbacks, 2, timeout=120):
        assert out["fallback_err"] == 0.0 and "no dist-attn key for this step at cp = 2" in out["error"]


# ------------------------------------------------------------------- key lookup and refusals
def test_most_recent_key_fallback_only_for_the_prepared_batch() -> None:
    model = make_model("mistral", "magi")
    tree = make_case("tree")
    new_batch, key = mau.magi_prepare_batch(model, tree, None)
    new_batch.pop("labels")
    explicit = model(**new_batch, use_cache=False).logits
    new_batch.pop("magi_key")
    assert torch.equal(model(**new_batch, use_cache=False).logits, explicit)  # same batch: the prepared tree key
    other_pos = torch.arange(33)[None]  # another batch of the same length: its own (causal) mask, not the tree
    direct = model(input_ids=new_batch["input_ids"], position_ids=other_pos, use_cache=False).logits
    ref = make_model("mistral", "eager")(input_ids=new_batch["input_ids"], position_ids=other_pos, use_cache=False).logits
    assert torch.allclose(direct, ref, atol=5e-6) and not torch.allclose(direct, explicit, atol=1e-3)


def test_refusals() -> None:
    model = make_model("llama", "magi")
    ids = torch.randint(0, VOCAB, (1, 12))
    mau._set_cp_group_on_attention(model, None)
    with pytest.raises(ValueError, match="dense attention mask"):
        model(input_ids=ids, attention_mask=torch.zeros(1, 1, 12, 12), use_cache=False)
    _, key = mau.magi_prepare_batch(model, {"input_ids": torch.randint(0, VOCAB, (1, 20))}, None)
    with pytest.raises(ValueError, match="magi_key was built for 20 local tokens"):
        model(input_ids=ids, magi_key=key, use_cache=False)
    with pytest.raises(ValueError, match="carries its own mask"):
        model(input_ids=ids, attention_mask=torch.tensor([[0] + [1] * 11]), magi_key=key, use_cache=False)
    mau.set_active_attn_spec(varlen([5, 6]))
    with pytest.raises(ValueError, match="active spec .* covers 11 tokens"):
        model(input_ids=ids, use_cache=False)
    mau.set_active_attn_spec(None)
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16)
    with pytest.raises(ValueError, match="KV cache"):
        mau.hf_attention.magi_attention_forward(layer, q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match="dropout"):
        mau.hf_attention.magi_attention_forward(layer, q, q[:, :2], q[:, :2], dropout=0.1)


# ----------------------------------------------------------------------------- no O(S^2)
class _MaxNumel(TorchDispatchMode):
    """Largest tensor any op creates, except inside the attention kernel (``paused``: tiles are its business)."""

    def __init__(self):
        super().__init__()
        self.largest, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not self.paused:
                self.largest = max(self.largest, t.numel())
        return out


def test_magi_path_never_allocates_a_square_mask(monkeypatch) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for name in ("sdpa", "eager"):  # HF's dense mask builders must not run for "magi"
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, None)
    assert mau.hf_attention.magi_mask_function(1, 8, 8, attention_mask=torch.ones(1, 8, dtype=torch.bool)) is None
    pad = torch.tensor([[True] * 7 + [False]])
    assert mau.hf_attention.magi_mask_function(1, 8, 8, attention_mask=pad) is pad  # O(tokens), for the key
    s = 2048
    model = make_model("gemma2", "magi")
    pos = torch.cat([torch.arange(1000), torch.arange(s - 1000)])[None]
    batch = {"input_ids": torch.randint(0, VOCAB, (1, s)), "position_ids": pos, "labels": torch.randint(0, VOCAB, (1, s))}
    seen = _MaxNumel()
    kernel = mau.hf_attention.calc_attn

    def paused_kernel(*args, **kwargs):
        seen.paused = True
        try:
            return kernel(*args, **kwargs)
        finally:
            seen.paused = False

    monkeypatch.setattr(mau.hf_attention, "calc_attn", paused_kernel)
    with seen:  # the whole HF path: batch prep, masks, keys (incl. the sliding-window key), the forward
        new_batch, _ = mau.magi_prepare_batch(model, batch, None)
        labels = new_batch.pop("labels")
        logits = model(**new_batch, use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits, labels[0], reduction="sum")
    assert s * VOCAB <= seen.largest < s * s // 8, seen.largest  # the logits are the largest tensor

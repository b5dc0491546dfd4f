"""The recipe's loss equals the HF model's own logits + cross-entropy, logit transforms included."""

import pytest
import torch
import torch.nn.functional as F

from flexcp.train.loss import CausalLMLoss


def _gemma2(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=64, final_logit_softcapping=softcap)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("softcap", [None, 0.5])
@pytest.mark.parametrize("chunk_tokens", [4, 64])
def test_loss_matches_hf_logits(softcap, chunk_tokens):
    model = _gemma2(softcap)
    ids = torch.randint(0, 64, (1, 12))
    pos = torch.arange(12)[None]
    labels = torch.randint(0, 64, (1, 12))
    labels[0, :3] = -100
    loss, _ = CausalLMLoss(model, chunk_tokens=chunk_tokens)(ids, pos, labels)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
    expected = F.cross_entropy(logits, labels[0], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_logit_scaling_is_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=64)
    cfg.logits_scaling = 2.0
    with pytest.raises(ValueError, match="logits_scaling"):
        CausalLMLoss(LlamaForCausalLM(cfg))

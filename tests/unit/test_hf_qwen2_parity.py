"""The dense HF EVE model (decoupling none) behaves like the installed transformers' own
Qwen2ForCausalLM with the same weights: logits, loss, ``output_hidden_states``,
``output_attentions`` (eager), ``return_dict=False``, sdpa == eager, gradient checkpointing."""

import pytest
import torch

from eve_megatron.hf import config_map
from eve_megatron.hf.configuration_eve_qwen2 import EVEQwen2Config
from eve_megatron.hf.modeling_eve_qwen2 import EVEQwen2ForCausalLM
from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.config import model_fields

TOL = 1e-5


def _pair(attn: str):
    """A random Qwen2ForCausalLM (transformers) and the dense EVE model holding its weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = model_fields(eve_config("tiny", decoupling="none"))
    cfg = config_map.hf_config(fields, "float32")
    qwen_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                 "max_position_embeddings", "tie_word_embeddings")
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(attn_implementation=attn,
                                        **{k: cfg[k] for k in qwen_keys})).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():  # O(1) weights, norms not constant
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
    eve = EVEQwen2ForCausalLM(EVEQwen2Config(attn_implementation=attn, **cfg)).eval()
    missing, unexpected = eve.load_state_dict(qwen.state_dict(), strict=False)
    assert not unexpected and all(m.startswith("model.vision_tower.") for m in missing)
    return qwen, eve


def _close(a, b):
    return (a - b).abs().max() <= TOL * b.abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_outputs_match_qwen2(attn):
    qwen, eve = _pair(attn)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    kw = dict(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True,
              output_attentions=attn == "eager")
    with torch.no_grad():
        want, got = qwen(**kw), eve(**kw)
        want_t, got_t = qwen(**kw, return_dict=False), eve(**kw, return_dict=False)
    real = mask.bool()
    assert _close(got.logits[real], want.logits[real]) and _close(got.loss, want.loss)
    assert len(got.hidden_states) == len(want.hidden_states) == 5
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert _close(g[real], w[real])
    if attn == "eager":
        assert len(got.attentions) == len(want.attentions) == 4
        for g, w in zip(got.attentions, want.attentions):
            assert g.shape == w.shape and _close(g[0], w[0])
    else:
        assert got.attentions is None
    assert len(got_t) == len(want_t) and isinstance(got_t, tuple)
    for g, w in zip(got_t, want_t):  # (loss, logits, cache, hidden states[, attentions])
        if isinstance(w, torch.Tensor):
            assert g.shape == w.shape
        elif isinstance(w, tuple) and w and isinstance(w[0], torch.Tensor):
            assert len(g) == len(w)
    assert not _close(got.logits[real] * 1.001, want.logits[real])  # the check can fail


def test_sdpa_equals_eager_and_gradient_checkpointing():
    _, eager = _pair("eager")
    _, sdpa = _pair("sdpa")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _close(sdpa(input_ids=ids).logits, eager(input_ids=ids).logits)
    sdpa.train()
    sdpa(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in sdpa.named_parameters() if p.grad is not None}
    sdpa.zero_grad()
    sdpa.gradient_checkpointing_enable()
    sdpa(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert grads and all(_close(p.grad, grads[n]) for n, p in sdpa.named_parameters() if n in grads)

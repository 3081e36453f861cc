"""Attention backends: flex == sdpa (forward and every gradient, fp32, <= 1e-5) on random packs
with GQA; the flex block mask equals the document-causal rule; backend resolution and errors."""

import pytest
import torch

from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.core_attention import (SDPACoreAttention, backend_available,
                                                    block_causal_mask, resolve_attention_backend)
from eve_megatron.models.eve.flex_attention import FlexCoreAttention, document_block_mask
from eve_megatron.models.eve.routing import build_packed_seq_params
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from tests.reference_eve import (RefShape, make_batch, make_weights, model_batch, reference_step,
                                 rel_err, to_megatron)

TOL = 1e-5


def _random_pack(b, s, seed):
    """``cu_seqlens`` of rows cut into random segments (every row start a boundary)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    for row in range(b):
        t = 0
        while t < s:
            t = min(s, t + int(torch.randint(1, s // 2 + 2, (1,), generator=g)))
            bounds.append(row * s + t)
    return torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("b,s,block,seed", [(2, 48, 8, 0), (3, 70, 16, 1), (1, 33, 128, 2)])
def test_flex_block_mask_is_the_document_causal_rule(b, s, block, seed):
    params = build_packed_seq_params(torch.zeros(b, s, dtype=torch.bool), _random_pack(b, s, seed),
                                     routed=False)
    truth = block_causal_mask(params)[:, 0]  # [b, s, s] token-level rule
    mask = document_block_mask(params.segment_ids, b, s, "cpu", block=block)
    n = -(-s // block)
    blocks = torch.nn.functional.pad(truth, (0, n * block - s, 0, n * block - s))
    blocks = blocks.view(b, n, block, n, block)
    used = blocks.any(4).any(2)  # block (i, j) holds a visible pair
    listed = mask.to_dense()[:, 0].bool()
    assert torch.equal(listed, used)  # no visible pair is skipped, no empty block is visited
    full_counts = mask.full_kv_num_blocks[:, 0]
    for r in range(b):
        for i in range(n):
            for j in mask.full_kv_indices[r, 0, i, :int(full_counts[r, i])].tolist():
                q_rows = slice(i * block, min(s, (i + 1) * block))
                assert truth[r, q_rows, j * block:(j + 1) * block].all()  # "full" really is


def test_flex_equals_sdpa_forward_and_gradients_with_gqa():
    cfg = eve_config("tiny")
    b, s, heads, groups, hn = 2, 80, 4, 2, 16
    params = build_packed_seq_params(torch.zeros(b, s, dtype=torch.bool), _random_pack(b, s, 5),
                                     routed=False)
    params.flex_block_mask = document_block_mask(params.segment_ids, b, s, "cpu", block=16)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(s, b, heads, hn, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    upstream = torch.randn(s, b, heads * hn, generator=g)
    outs, grads = [], []
    for backend in (SDPACoreAttention(cfg), FlexCoreAttention(cfg)):
        out = backend(q, k, v, packed_seq_params=params)
        (out * upstream).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert rel_err(outs[1], outs[0]) <= TOL
    for flex, sdpa in zip(grads[1], grads[0]):
        assert rel_err(flex, sdpa) <= TOL
    assert rel_err(outs[1], outs[0] * 1.001) > TOL  # the comparison can fail


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_model_with_backend_matches_reference(megatron_world, backend):
    shape = RefShape(decoupling="all")
    weights = make_weights(shape, seed=21)
    model = EVEModel(eve_config("tiny", decoupling="all", core_attention_impl=backend))
    load_full_state_dict(model, to_megatron(weights, shape))
    batch = make_batch(shape, 2, 96, seed=4)
    ref_logits, ref_loss, ref_grads = reference_step(shape, weights, batch)
    mb = model_batch(batch)
    inputs = {k: v for k, v in mb.items() if k not in ("labels", "loss_mask")}
    per_token = model(**inputs, labels=mb["labels"])
    assert rel_err(per_token, ref_loss) <= TOL
    (per_token.sum() / mb["loss_mask"].sum()).backward()
    grads = gather_full(model, grads=True)
    assert max(rel_err(grads[k], ref_grads[k]) for k in ref_grads) <= TOL


def test_backend_resolution_and_clear_errors():
    cuda = torch.cuda.is_available()
    assert resolve_attention_backend("auto") == ("sdpa" if not cuda else
                                                 resolve_attention_backend("auto"))
    assert resolve_attention_backend("flex") == "flex" and backend_available("flex")
    if not cuda:
        for name, hint in (("torch_varlen", "CUDA"), ("flash_attn", "flash-attn"),
                           ("te", "transformer-engine")):
            with pytest.raises(RuntimeError, match=hint):
                resolve_attention_backend(name, "transformer_engine")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        backend_available("xformers")
    with pytest.raises(ValueError, match="core_attention_impl must be one of"):
        eve_config("tiny", core_attention_impl="xformers")

"""GPU checks: the model on CUDA against the CPU reference; optional kernels when installed."""

import importlib.util

import pytest
import torch

from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from tests.reference_eve import RefShape, make_batch, make_weights, model_batch, reference_step, rel_err, to_megatron

pytestmark = pytest.mark.gpu


def _run(cfg, shape, seed=31, dtype=torch.float32):
    weights = make_weights(shape, seed=seed)
    model = EVEModel(cfg).cuda()
    load_full_state_dict(model, {k: v.to(dtype) for k, v in to_megatron(weights, shape).items()})
    batch = make_batch(shape, 2, 128, seed=seed)
    ref = reference_step(shape, weights, batch)
    mb = {k: v.cuda() if torch.is_tensor(v) else v for k, v in model_batch(batch).items()}
    inputs = {k: v for k, v in mb.items() if k not in ("labels", "loss_mask")}
    logits = model(**inputs).float().cpu()
    per_token = model(**inputs, labels=mb["labels"])
    (per_token.sum() / mb["loss_mask"].sum()).backward()
    grads = {k: v.cpu() for k, v in gather_full(model, grads=True).items()}
    return (logits, per_token.float().cpu(), grads), ref


def _errors(ours, ref):
    logits, per_token, grads = ours
    ref_logits, ref_loss, ref_grads = ref
    worst = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
    return rel_err(logits, ref_logits), rel_err(per_token, ref_loss), worst


@pytest.mark.parametrize("decoupling", ["all", "none"])
def test_cuda_fp32_matches_reference(megatron_world, decoupling):
    shape = RefShape(decoupling=decoupling)
    ours, ref = _run(eve_config("tiny", decoupling=decoupling), shape)
    assert max(_errors(ours, ref)) <= 1e-5


def test_cuda_bf16_close_to_reference(megatron_world):
    shape = RefShape()
    cfg = eve_config("tiny", bf16=True, params_dtype=torch.bfloat16)
    ours, ref = _run(cfg, shape, dtype=torch.bfloat16)
    logits_err, loss_err, grad_err = _errors(ours, ref)
    assert logits_err <= 3e-2 and loss_err <= 3e-2 and grad_err <= 1e-1


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cuda_fp32_attention_backends_match_reference(megatron_world, backend):
    """sdpa (one causal call per packed sample on GPU) and compiled flex, fp32, <= 1e-5."""
    shape = RefShape()
    ours, ref = _run(eve_config("tiny", core_attention_impl=backend), shape)
    assert max(_errors(ours, ref)) <= 1e-5


@pytest.mark.parametrize("backend", ["torch_varlen", "flex", "sdpa"])
def test_cuda_bf16_attention_backends_close_to_reference(megatron_world, backend):
    """torch's varlen flash kernel runs in bf16 only; flex and sdpa alongside for scale."""
    if backend == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    shape = RefShape()
    cfg = eve_config("tiny", bf16=True, params_dtype=torch.bfloat16, core_attention_impl=backend)
    ours, ref = _run(cfg, shape, dtype=torch.bfloat16)
    logits_err, loss_err, grad_err = _errors(ours, ref)
    assert logits_err <= 3e-2 and loss_err <= 3e-2 and grad_err <= 1e-1


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attn_matches_reference(megatron_world):
    shape = RefShape()
    cfg = eve_config("tiny", bf16=True, params_dtype=torch.bfloat16, core_attention_impl="flash_attn")
    ours, ref = _run(cfg, shape, dtype=torch.bfloat16)
    assert max(_errors(ours, ref)[:2]) <= 3e-2


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs TE")
@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_transformer_engine_backend(megatron_world, fp8):
    shape = RefShape()
    cfg = eve_config("tiny", bf16=True, params_dtype=torch.bfloat16,
                     transformer_impl="transformer_engine", core_attention_impl="te", fp8=fp8)
    ours, ref = _run(cfg, shape, dtype=torch.bfloat16)
    assert max(_errors(ours, ref)[:2]) <= (1e-1 if fp8 else 3e-2)
